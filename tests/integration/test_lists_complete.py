"""Lists are complete (issue #13, section 7): a read answers at most 10,000
rows, and the services page through the bus (bus/web.py read_all) so that
every list the RideShare spec promises is answered whole, in order, without
duplicates, above that limit; a list past the caps is refused (503), never
cut. Rows are inserted in bulk straight through the DB client, and read
back through the services, against a real cluster (a master and a slave)."""
from __future__ import annotations

import calendar
import time

import pytest

from bus import ops, web
from rideshare import schema as rs_schema
from test_rideshare_support import RideShare, pw

pytestmark = pytest.mark.timeout(300)

READ_LIMIT = 10_000


@pytest.fixture(scope="module")
def rs(tmp_path_factory):
    with RideShare.start(tmp_path_factory.mktemp("lists"), slaves=1) as r:
        yield r


@pytest.fixture
def c(rs):
    rs.reset()
    return rs.client()


@pytest.fixture
def db(rs):
    return rs.cluster.client(tenant="rideshare")


def bulk_insert(db, table: str, rows: list[dict], *, per_op: int = 1000, per_write: int = 5) -> int:
    """Insert `rows` in writes of `per_write` insert_many ops of `per_op` rows; the last LSN."""
    lsn = 0
    chunks = [rows[i:i + per_op] for i in range(0, len(rows), per_op)]
    for i in range(0, len(chunks), per_write):
        lsn = db.write([ops.insert_many(table, ch) for ch in chunks[i:i + per_write]], timeout=60).lsn
    return lsn


def epoch(days_from_now: int) -> int:
    return int(time.time()) + days_from_now * 86400


def shown(ts: int) -> str:
    t = time.gmtime(ts)
    return f"{t.tm_mday:02d}-{t.tm_mon:02d}-{t.tm_year:04d}:{t.tm_sec:02d}-{t.tm_min:02d}-{t.tm_hour:02d}"


def test_users_list_above_the_read_limit_is_complete_and_ordered(rs, c, db):
    names = [f"user{i:06d}" for i in range(22_965)] + ["Zoë", "émile", "ålesund", "A", "a b/c"]
    lsn = bulk_insert(db, rs_schema.USERS, [{"username": n, "password": pw()} for n in names])
    t0 = time.monotonic()
    r = c.users("GET", headers={"X-Stratus-Min-LSN": str(lsn)})
    took = time.monotonic() - t0
    assert r.status_code == 200, r.text
    got = r.json()
    assert len(got) == len(names) > READ_LIMIT
    assert len(set(got)) == len(got)                 # no duplicates
    assert got == sorted(names)                      # every one, in order (UTF-8 byte order = code points)
    assert int(r.headers["X-Stratus-LSN"]) >= lsn
    print(f"GET /api/v1/users: {len(got)} names in {took:.2f}s")
    # writes through the service still see their own list
    c.add_user("user999999")
    assert c.users("GET").json() == sorted(names + ["user999999"])


def test_rides_between_two_areas_above_the_read_limit_tie_on_timestamp(rs, c, db):
    """More upcoming rides than one read answers, most of them at the very same
    timestamp, so the keyset has to page inside one timestamp (by ride id)."""
    lsn = bulk_insert(db, rs_schema.USERS, [{"username": "alice", "password": pw()}])
    t_same, t_early, t_late = epoch(30), epoch(10), epoch(60)
    spec = ([t_same] * 10_050) + [t_early + i for i in range(120)] + [t_late] * 80
    excluded = [(epoch(-1), 5, 6), (t_same, 6, 5), (t_same, 5, 7), (epoch(-400), 5, 6)]
    rows = [{"ride_id": ops.seq(rs_schema.RIDE_SEQ), "created_by": "alice", "timestamp": ts,
             "source": 5, "destination": 6} for ts in spec]
    rows += [{"ride_id": ops.seq(rs_schema.RIDE_SEQ), "created_by": "alice", "timestamp": ts,
              "source": s, "destination": d} for ts, s, d in excluded]
    rows.sort(key=lambda r: -r["timestamp"])  # inserted out of order: the list's order is the service's
    lsn = bulk_insert(db, rs_schema.RIDES, rows)
    in_db = db.read(ops.count(rs_schema.RIDES), min_lsn=lsn).result
    assert in_db == len(spec) + len(excluded)

    r = c.rides("GET", params={"source": 5, "destination": 6}, headers={"X-Stratus-Min-LSN": str(lsn)})
    assert r.status_code == 200, r.text
    got = r.json()
    assert len(got) == len(spec) > READ_LIMIT
    ids = [x["rideId"] for x in got]
    assert len(set(ids)) == len(ids)
    # ordered by timestamp, then ride id; the timestamps are the ones inserted
    pairs = [(calendar.timegm(time.strptime(x["timestamp"], rs_schema.TIMESTAMP_FORMAT)), x["rideId"]) for x in got]
    assert pairs == sorted(pairs)
    assert [p[0] for p in pairs] == sorted(spec)
    assert got[0]["timestamp"] == shown(t_early) and {x["username"] for x in got} == {"alice"}


def test_ride_members_above_the_read_limit(rs, c, db):
    c.add_user("owner")
    members = [f"m{i:05d}" for i in range(10_020)]
    bulk_insert(db, rs_schema.USERS, [{"username": m, "password": pw()} for m in members])
    ride = c.add_ride("owner", 7, 8)
    lsn = bulk_insert(db, rs_schema.MEMBERS, [{"ride_id": ride, "username": m, "created_by": "owner"}
                                              for m in reversed(members)])
    r = c.rides("GET", f"/api/v1/rides/{ride}", headers={"X-Stratus-Min-LSN": str(lsn)})
    assert r.status_code == 200, r.text
    assert r.json()["users"] == members and r.json()["created_by"] == "owner"


# --- the helper itself, against the real bus ---------------------------------------------
def test_read_all_pages_by_a_compound_key_with_small_pages(rs, c, db):
    """Tiny pages make every step of the keyset visible: a full page inside
    one timestamp, a prefix running out, the first page partly full."""
    rows = [{"ride_id": i, "created_by": "x", "timestamp": ts, "source": 1, "destination": 2}
            for i, ts in enumerate([5, 5, 5, 5, 5, 5, 5, 3, 9, 9, 1, 5, 7, 7, 7, 9, 9, 9], start=1)]
    lsn = bulk_insert(db, rs_schema.RIDES, rows)
    want = sorted(((r["timestamp"], r["ride_id"]) for r in rows))
    for page in (1, 2, 3, 4, 7, 18, 19, 100):
        got, got_lsn = web.read_all(db, ops.select(rs_schema.RIDES, [ops.eq("source", 1)], columns=["ride_id"]),
                                    ["timestamp", "ride_id"], min_lsn=lsn, page=page)
        assert [(r["timestamp"], r["ride_id"]) for r in got] == want, page
        assert got_lsn >= lsn
    only_nines, _ = web.read_all(db, ops.select(rs_schema.RIDES, [ops.eq("timestamp", 9)]), ["ride_id"],
                                 min_lsn=lsn, page=2)
    assert [r["ride_id"] for r in only_nines] == [9, 10, 16, 17, 18]
    empty, _ = web.read_all(db, ops.select(rs_schema.RIDES, [ops.eq("timestamp", 4)]), ["ride_id"], min_lsn=lsn)
    assert empty == []


def test_read_all_refuses_a_list_past_its_caps_instead_of_cutting_it(rs, c, db):
    lsn = bulk_insert(db, rs_schema.USERS, [{"username": f"n{i:03d}", "password": pw()} for i in range(30)])
    query = ops.select(rs_schema.USERS, columns=["username"])
    with pytest.raises(web.ListIncomplete) as exc:
        web.read_all(db, query, ["username"], min_lsn=lsn, max_rows=29, page=10)
    assert exc.value.status == 503 and "more than 29 rows" in exc.value.message
    with pytest.raises(web.ListIncomplete) as exc:
        web.read_all(db, query, ["username"], min_lsn=lsn, budget=0)
    assert exc.value.status == 503 and "not read whole" in exc.value.message
    rows, _ = web.read_all(db, query, ["username"], min_lsn=lsn, max_rows=30, page=10)
    assert len(rows) == 30
