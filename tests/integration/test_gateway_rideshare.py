"""Read-your-writes through the gateway: the RideShare grader sequence, 50
times, against a master and 3 slaves and the real users and rides services
(two instances of each), with plain clients that never send an LSN header:
the gateway remembers the LSN each client was given and sends it upstream."""
import hashlib
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from bus import metrics as bmetrics
from kits.testkit import Client, free_port, start_gateway, wait_healthy, wait_until


def future_ts(days: int = 7) -> str:
    return (datetime.now(timezone.utc) + timedelta(days=days)).strftime("%d-%m-%Y:%S-%M-%H")


def pw(seed: str) -> str:
    return hashlib.sha1(seed.encode()).hexdigest()


class OneShot:
    """A client that opens a new connection for every request (no keep-alive)."""

    def __init__(self, port):
        self.port = port

    def request(self, method, path, body=None, headers=None):
        c = Client(self.port)
        try:
            return c.request(method, path, body, {**(headers or {}), "Connection": "close"})
        finally:
            c.close()

    def get(self, path, **kw):
        return self.request("GET", path, **kw)


def grader_round(c, i: int) -> None:
    user = f"grader-{i}-{uuid.uuid4().hex[:6]}"
    src, dst = 1 + i % 150, 151 + i % 40
    status, body, _ = c.request("PUT", "/api/v1/users", {"username": user, "password": pw(user)})       # 1
    assert status == 201, (i, status, body)
    ts = future_ts()
    status, body, _ = c.request("POST", "/api/v1/rides", {"created_by": user, "timestamp": ts,
                                                          "source": str(src), "destination": str(dst)})  # 2
    assert status == 201, (i, status, body)
    status, body, _ = c.get(f"/api/v1/rides?source={src}&destination={dst}")                           # 3
    assert status == 200, (i, status, body)
    mine = [x for x in body if x["username"] == user]
    assert len(mine) == 1 and mine[0]["timestamp"] == ts, (i, body)
    ride_id = mine[0]["rideId"]
    status, body, _ = c.get(f"/api/v1/rides/{ride_id}")                                                 # 4
    assert status == 200, (i, status, body)
    assert body == {"rideId": ride_id, "created_by": user, "users": [], "timestamp": ts,
                    "source": str(src), "destination": str(dst)}, (i, body)
    assert c.request("DELETE", f"/api/v1/rides/{ride_id}")[0] == 200, i                                # 5
    assert c.request("DELETE", f"/api/v1/users/{user}")[0] == 200, i                                    # 6
    assert c.request("DELETE", f"/api/v1/users/unknown-{user}")[0] == 400, i                            # 7
    status, body, _ = c.get("/api/v1/rides?source=197&destination=198")                                # 8
    assert status == 204, (i, status, body)


@pytest.fixture
def rideshare(cluster):
    cluster.bootstrap(slaves=3)
    for svc in ("users", "rides"):
        for n in range(2):
            cluster.spawn(f"{svc}{n}", ["-m", svc], **{f"STRATUS_{svc.upper()}_PORT": str(free_port())})
    gw = start_gateway(cluster)
    wait_healthy(gw, "users", 2, timeout=40)
    wait_healthy(gw, "rides", 2, timeout=40)
    c = Client(gw)
    wait_until(lambda: c.get("/api/v1/users")[0] in (200, 204), 30, what="users tables")
    wait_until(lambda: c.get("/api/v1/rides/count")[0] == 200, 30, what="rides tables")
    return cluster, gw


def test_grader_sequence_50_times_through_the_gateway(rideshare):
    cluster, gw = rideshare
    c = Client(gw)
    for i in range(50):
        grader_round(c, i)
    # the client's LSN was remembered
    assert bmetrics.value(c.get("/metrics")[1], "stratus_gateway_lsn_clients") == 1
    # The reads went to the slaves, not the master.
    ws = cluster.workers()
    assert not ws["w1"].get("serves_reads")
    wait_until(lambda: sum(w.get("reads", 0) for k, w in cluster.workers().items() if k != "w1") >= 150, 5,
               what="slaves to report the reads they served")


def test_grader_sequence_with_a_new_connection_per_request(rideshare):
    _, gw = rideshare
    c = OneShot(gw)
    for i in range(20):
        grader_round(c, 100 + i)
