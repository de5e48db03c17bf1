"""A retried request is answered like its first attempt (issue #13, section 4):
a write's bus request id comes from the HTTP request's X-Request-Id (bus/web.py
write_id), and the workers answer a repeated id from their record of the first
attempt. So the same request sent again with the same X-Request-Id (what the
gateway does when an upstream fails after a PUT or DELETE was sent) has one
effect and the first answer; with a fresh X-Request-Id it is a new request,
answered as before. Real users, rides, catalog and order processes on a real
cluster."""
from __future__ import annotations

import threading
import uuid

import pytest

from bus import ops
from harness import LocalCluster
from test_rideshare_support import RideShare, future_ts, pw
from test_toystore_support import call, db_rows, start_catalog, start_order

pytestmark = pytest.mark.timeout(240)


def rid() -> str:
    return f"test-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def rs(tmp_path_factory):
    with RideShare.start(tmp_path_factory.mktemp("idem"), slaves=1) as r:
        yield r


@pytest.fixture
def c(rs):
    rs.reset()
    return rs.client()


def users_in_db(rs, c) -> list[str]:
    rows = rs.cluster.client(tenant="rideshare").read(ops.select("users"), min_lsn=c.lsn or None).result
    return sorted(r["username"] for r in rows)


def ride_count(c) -> int:
    return c.rides("GET", "/api/v1/rides/count").json()[0]


# --- users ---------------------------------------------------------------------------------------
def test_put_user_retried_with_the_same_request_id_answers_201_again(rs, c):
    body = {"username": "alice", "password": pw()}
    first = rid()
    a = c.users("PUT", json=body, headers={"X-Request-Id": first})
    b = c.users("PUT", json=body, headers={"X-Request-Id": first})
    assert (a.status_code, a.json()) == (201, {}) and (b.status_code, b.json()) == (201, {})
    assert a.headers["X-Stratus-LSN"] == b.headers["X-Stratus-LSN"]   # the same write, answered from its record
    assert users_in_db(rs, c) == ["alice"]
    # a new request (fresh id) for the same user: exists, as before
    r = c.users("PUT", json=body, headers={"X-Request-Id": rid()})
    assert r.status_code == 400 and "exists" in r.json()["error"]
    # the same id with another body is another request, not a retry
    r = c.users("PUT", json={"username": "alice", "password": pw("b")}, headers={"X-Request-Id": first})
    assert r.status_code == 400
    assert users_in_db(rs, c) == ["alice"]


def test_put_user_without_a_request_id_is_a_new_request_each_time(rs, c):
    body = {"username": "bob", "password": pw()}
    assert c.users("PUT", json=body).status_code == 201
    assert c.users("PUT", json=body).status_code == 400


def test_concurrent_attempts_with_one_request_id_are_one_write(rs, c):
    """The gateway may retry while the first attempt is still in flight in
    the same instance: both answer 201, one user exists."""
    body = {"username": "carol", "password": pw()}
    same = rid()
    out: list[int] = []
    lsns: list[int] = []
    barrier = threading.Barrier(4)

    def put():
        cl = rs.client(follow_lsn=False)
        barrier.wait(timeout=10)
        out.append(cl.users("PUT", json=body, headers={"X-Request-Id": same}).status_code)
        lsns.append(cl.lsn)
    threads = [threading.Thread(target=put) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert out == [201] * 4
    c.lsn = max(lsns)   # the write came through other clients: c reads from its LSN, not from a slave's past
    assert users_in_db(rs, c) == ["carol"]


def test_delete_user_retried_with_the_same_request_id_answers_200_again(rs, c):
    c.add_user("dave")
    c.add_user("erin")
    ride = c.add_ride("dave")
    assert c.rides("POST", f"/api/v1/rides/{ride}", json={"username": "erin"}).status_code == 200
    first = rid()
    a = c.users("DELETE", "/api/v1/users/dave", headers={"X-Request-Id": first})
    b = c.users("DELETE", "/api/v1/users/dave", headers={"X-Request-Id": first})
    assert (a.status_code, a.json()) == (200, {}) and (b.status_code, b.json()) == (200, {})
    assert users_in_db(rs, c) == ["erin"] and ride_count(c) == 0
    r = c.users("DELETE", "/api/v1/users/dave", headers={"X-Request-Id": rid()})
    assert r.status_code == 400
    # re-created, then a late retry of the old DELETE: answered from the record, the new dave stays
    c.add_user("dave")
    assert c.users("DELETE", "/api/v1/users/dave", headers={"X-Request-Id": first}).status_code == 200
    assert users_in_db(rs, c) == ["dave", "erin"]


def test_the_same_request_id_on_another_service_is_another_write(rs, c):
    """Both services' db/clear send the same operations: under one
    X-Request-Id they are still two writes (the digest names the service)."""
    same = rid()
    c.add_user("gina")
    assert c.users("POST", "/api/v1/db/clear", headers={"X-Request-Id": same}).status_code == 200
    c.add_user("hank")
    assert c.rides("POST", "/api/v1/db/clear", headers={"X-Request-Id": same}).status_code == 200
    assert users_in_db(rs, c) == []


# --- rides ---------------------------------------------------------------------------------------
def test_post_ride_retried_with_the_same_request_id_creates_one_ride(rs, c):
    c.add_user("alice")
    body = {"created_by": "alice", "timestamp": future_ts(), "source": 3, "destination": 4}
    first = rid()
    a = c.rides("POST", json=body, headers={"X-Request-Id": first})
    b = c.rides("POST", json=body, headers={"X-Request-Id": first})
    assert a.status_code == b.status_code == 201 and a.json() == b.json() == {}
    assert a.headers["Location"] == b.headers["Location"]
    ride = int(a.headers["Location"].rsplit("/", 1)[1])
    assert c.ride_ids(3, 4) == [ride] and ride_count(c) == 1
    d = c.rides("GET", f"/api/v1/rides/{ride}")
    assert d.status_code == 200 and d.json()["created_by"] == "alice"
    # a fresh id is a second ride
    n = c.rides("POST", json=body, headers={"X-Request-Id": rid()})
    assert n.status_code == 201 and n.headers["Location"] != a.headers["Location"]
    assert ride_count(c) == 2


def test_join_and_delete_ride_retried_with_the_same_request_id(rs, c):
    c.add_user("alice")
    c.add_user("bob")
    ride = c.add_ride("alice")
    join = rid()
    for _ in range(2):
        r = c.rides("POST", f"/api/v1/rides/{ride}", json={"username": "bob"}, headers={"X-Request-Id": join})
        assert (r.status_code, r.json()) == (200, {})
    r = c.rides("POST", f"/api/v1/rides/{ride}", json={"username": "bob"}, headers={"X-Request-Id": rid()})
    assert r.status_code == 400 and "already joined" in r.json()["error"]
    assert c.rides("GET", f"/api/v1/rides/{ride}").json()["users"] == ["bob"]
    delete = rid()
    for _ in range(2):
        r = c.rides("DELETE", f"/api/v1/rides/{ride}", headers={"X-Request-Id": delete})
        assert (r.status_code, r.json()) == (200, {})
    assert c.rides("DELETE", f"/api/v1/rides/{ride}", headers={"X-Request-Id": rid()}).status_code == 400
    assert ride_count(c) == 0


def test_a_long_or_unusual_request_id_still_works(rs, c):
    body = {"username": "frank", "password": pw()}
    for odd in ("x" * 400, "an id with spaces and ünïcode"):
        odd_id = odd.encode("utf-8").decode("latin-1")  # what an HTTP header carries
        a = c.users("PUT", json=body, headers={"X-Request-Id": odd_id})
        b = c.users("PUT", json=body, headers={"X-Request-Id": odd_id})
        assert a.status_code == 201 and b.status_code == 201
        assert c.users("DELETE", "/api/v1/users/frank").status_code == 200


# --- toy store: orders ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toystore(tmp_path_factory):
    cluster = LocalCluster(tmp_path_factory.mktemp("idem-toys"))
    try:
        cluster.bootstrap(slaves=1)
        yield cluster, start_catalog(cluster, "catalog", STRATUS_RESTOCK_INTERVAL=3600), start_order(cluster, "order")
    finally:
        cluster.close()


def stock(db, name: str) -> int:
    """The quantity in the DB, after every write so far."""
    return next(p["quantity"] for p in db_rows(db, "products") if p["name"] == name)


def test_order_retried_with_the_same_request_id_is_placed_once(toystore):
    cluster, catalog, order = toystore
    db = cluster.client(tenant="toystore")
    before = stock(db, "Fox")
    first = rid()
    s1, b1, h1 = call(order, "POST", "/orders", {"name": "Fox", "quantity": 2}, headers={"X-Request-Id": first})
    s2, b2, h2 = call(order, "POST", "/orders", {"name": "Fox", "quantity": 2}, headers={"X-Request-Id": first})
    assert s1 == s2 == 200 and b1 == b2 and h1["x-stratus-lsn"] == h2["x-stratus-lsn"]
    number = b1["data"]["order_number"]
    orders = [o for o in db_rows(db, "orders") if o["name"] == "Fox"]
    assert [o["number"] for o in orders] == [number]
    assert stock(db, "Fox") == before - 2
    # a fresh id is a second order
    s3, b3, _ = call(order, "POST", "/orders", {"name": "Fox", "quantity": 2}, headers={"X-Request-Id": rid()})
    assert s3 == 200 and b3["data"]["order_number"] == number + 1
    assert stock(db, "Fox") == before - 4


def test_refused_order_retried_is_refused_again(toystore):
    cluster, catalog, order = toystore
    same = rid()
    for _ in range(2):
        s, body, _ = call(order, "POST", "/orders", {"name": "Tux", "quantity": 10**6}, headers={"X-Request-Id": same})
        assert s == 400 and body["error"]["message"] == "not enough stock"
