"""Concurrent joins, user deletions and ride creations through two instances
of each service: every check-then-act is one atomic write, so the final state
obeys every rule however the requests interleave."""
from __future__ import annotations

import random
import threading

import pytest

from bus import ops
from test_rideshare_support import RideShare, future_ts, pw

ROUNDS = 8


@pytest.fixture(scope="module")
def rs(tmp_path_factory):
    with RideShare.start(tmp_path_factory.mktemp("rideshare-conc"), slaves=2, instances=2) as r:
        yield r


def run_threads(targets) -> list[BaseException]:
    errors: list[BaseException] = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # reported by the test
                errors.append(exc)
        return run
    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "threads did not finish in time"
    return errors


def db_state(rs, lsn: int) -> tuple[dict, dict, list]:
    """Users, rides and memberships as the master has them (min_lsn: at least every write we saw)."""
    db = rs.cluster.client(tenant="rideshare")
    users = {r["username"] for r in db.read(ops.select("users"), min_lsn=lsn).result}
    rides = {r["ride_id"]: r for r in db.read(ops.select("rides"), min_lsn=lsn).result}
    members = db.read(ops.select("ride_members"), min_lsn=lsn).result
    return users, rides, members


def assert_invariants(rs, c, lsn: int) -> None:
    users, rides, members = db_state(rs, lsn)
    for r in rides.values():
        assert r["created_by"] in users, f"ride {r} has a creator who does not exist"
    seen = set()
    for m in members:
        key = (m["ride_id"], m["username"])
        assert key not in seen, f"{key} listed twice"
        seen.add(key)
        assert m["ride_id"] in rides, f"member {m} of a ride that does not exist"
        assert m["username"] in users, f"member {m} does not exist"
        assert m["username"] != rides[m["ride_id"]]["created_by"], f"creator {m} joined own ride"
        assert m["created_by"] == rides[m["ride_id"]]["created_by"]
    # and through the API
    r = c.users("GET", headers={"X-Stratus-Min-LSN": str(lsn)})
    assert r.status_code in (200, 204)
    assert (set(r.json()) if r.status_code == 200 else set()) == users
    for rid in rides:
        r = c.rides("GET", f"/api/v1/rides/{rid}", headers={"X-Stratus-Min-LSN": str(lsn)})
        assert r.status_code == 200
        members_api = r.json()["users"]
        assert len(members_api) == len(set(members_api))
        assert set(members_api) <= users


def test_joins_race_user_deletions(rs):
    rs.reset()
    c = rs.client()
    c.add_user("owner")
    joiners = [f"j{i}" for i in range(20)]
    for u in joiners:
        c.add_user(u)
    ride = c.add_ride("owner")
    lsns = [c.lsn]
    outcomes = {"join": {}, "delete": {}, "put": {}}
    lock = threading.Lock()

    def note(kind, status):
        with lock:
            outcomes[kind][status] = outcomes[kind].get(status, 0) + 1

    def joiner(i):
        def run():
            cl = rs.client(instance=i, follow_lsn=False)
            cl.lsn = lsns[0]
            for _ in range(ROUNDS):
                r = cl.rides("POST", f"/api/v1/rides/{ride}", json={"username": joiners[i]},
                             headers={"X-Stratus-Min-LSN": str(lsns[0])})
                assert r.status_code in (200, 400), r.text
                note("join", r.status_code)
            with lock:
                lsns.append(cl.lsn)
        return run

    def deleter(i):
        def run():
            cl = rs.client(instance=i + 1)
            for _ in range(ROUNDS):
                r = cl.users("DELETE", f"/api/v1/users/{joiners[i]}")
                assert r.status_code in (200, 400), r.text
                note("delete", r.status_code)
                r = cl.users("PUT", json={"username": joiners[i], "password": pw("e")})
                assert r.status_code in (201, 400), r.text
                note("put", r.status_code)
            with lock:
                lsns.append(cl.lsn)
        return run

    errors = run_threads([joiner(i) for i in range(20)] + [deleter(i) for i in range(20)])
    assert not errors, errors
    # the race happened: some joins succeeded, some were refused
    assert outcomes["join"].get(200) and outcomes["join"].get(400), outcomes
    assert outcomes["delete"].get(200) == 20 * ROUNDS, outcomes
    assert_invariants(rs, c, max(lsns))
    members = c.rides("GET", f"/api/v1/rides/{ride}", headers={"X-Stratus-Min-LSN": str(max(lsns))}).json()["users"]
    assert len(members) == len(set(members))


def test_rides_created_while_creators_are_deleted(rs):
    """Ride creation requires its creator; deletion removes the creator's rides
    and everyone's memberships in them, atomically."""
    rs.reset()
    c = rs.client()
    creators = [f"c{i}" for i in range(10)]
    riders = [f"r{i}" for i in range(10)]
    for u in creators + riders:
        c.add_user(u)
    lsns = [c.lsn]
    lock = threading.Lock()

    def creator(i):
        def run():
            cl = rs.client(instance=i)
            for _ in range(ROUNDS):
                r = cl.rides("POST", json={"created_by": creators[i], "timestamp": future_ts(),
                                           "source": 7, "destination": 8})
                assert r.status_code in (201, 400), r.text
                r = cl.users("PUT", json={"username": creators[i], "password": pw()})
                assert r.status_code in (201, 400)
            with lock:
                lsns.append(cl.lsn)
        return run

    def remover(i):
        def run():
            cl = rs.client(instance=i + 1)
            for _ in range(ROUNDS):
                assert cl.users("DELETE", f"/api/v1/users/{creators[i]}").status_code in (200, 400)
            with lock:
                lsns.append(cl.lsn)
        return run

    def rider(i):
        def run():
            cl = rs.client(instance=i)
            rng = random.Random(i)
            for _ in range(ROUNDS):
                ids = cl.ride_ids(7, 8)
                if ids:
                    r = cl.rides("POST", f"/api/v1/rides/{rng.choice(ids)}", json={"username": riders[i]})
                    assert r.status_code in (200, 400), r.text
            with lock:
                lsns.append(cl.lsn)
        return run

    errors = run_threads([creator(i) for i in range(10)] + [remover(i) for i in range(10)]
                         + [rider(i) for i in range(10)])
    assert not errors, errors
    assert_invariants(rs, c, max(lsns))
