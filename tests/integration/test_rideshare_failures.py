"""When the database cannot answer, the services say so: 503 when the request
was never sent (the bus is unreachable), 504 when no reply came in time.
Never 400, and bad input is still refused before any DB request."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import requests

from harness import LocalCluster, free_port, wait_for
from test_rideshare_support import OpenAPI, future_ts, pw


def start(cluster: LocalCluster, **env) -> dict[str, str]:
    urls = {}
    for svc in ("users", "rides"):
        port = free_port()
        cluster.spawn(svc, ["-m", svc], **{f"STRATUS_{svc.upper()}_PORT": port}, **env)
        urls[svc] = f"http://127.0.0.1:{port}"
    for u in urls.values():
        wait_for(lambda u=u: _up(u), 30, what=f"service at {u}")
    return urls


def _up(u: str) -> bool:
    try:
        return requests.get(u + "/health", timeout=1).ok
    except requests.RequestException:
        return False


def requests_for(urls):
    ride = {"created_by": "alice", "timestamp": future_ts(), "source": 1, "destination": 2}
    return [
        ("PUT", urls["users"] + "/api/v1/users", {"username": "alice", "password": pw()}),
        ("GET", urls["users"] + "/api/v1/users", None),
        ("DELETE", urls["users"] + "/api/v1/users/alice", None),
        ("POST", urls["users"] + "/api/v1/db/clear", None),
        ("POST", urls["rides"] + "/api/v1/rides", ride),
        ("GET", urls["rides"] + "/api/v1/rides?source=1&destination=2", None),
        ("GET", urls["rides"] + "/api/v1/rides/1", None),
        ("POST", urls["rides"] + "/api/v1/rides/1", {"username": "bob"}),
        ("DELETE", urls["rides"] + "/api/v1/rides/1", None),
        ("GET", urls["rides"] + "/api/v1/rides/count", None),
    ]


def check_all(urls, status: int) -> None:
    api = OpenAPI()
    reqs = requests_for(urls)
    with ThreadPoolExecutor(len(reqs)) as pool:   # each waits out the DB timeout: in parallel
        answers = list(pool.map(lambda m: requests.request(m[0], m[1], json=m[2], timeout=30), reqs))
    for (method, url, _), r in zip(reqs, answers):
        assert r.status_code == status, (method, url, r.status_code, r.text)
        assert r.json()["error"]
        api.check(r)
    # input errors are still 400: they never reach the database
    r = requests.put(urls["users"] + "/api/v1/users", json={"username": "x", "password": "short"}, timeout=10)
    assert r.status_code == 400
    # the counters answer without the database
    assert requests.get(urls["users"] + "/api/v1/_count", timeout=5).json() == [4]  # PUT, GET, DELETE and the 400 PUT; db/clear is not counted


def test_bus_unreachable_503(tmp_path):
    cluster = LocalCluster(tmp_path, request_timeout=1)
    try:
        closed = free_port()  # nothing listens there
        urls = start(cluster, STRATUS_AMQP_URL=f"amqp://nobody:none@127.0.0.1:{closed}/%2F")
        check_all(urls, 503)
    finally:
        cluster.close()


def test_no_database_worker_504(tmp_path):
    cluster = LocalCluster(tmp_path, request_timeout=1)   # a bus, but no worker at all
    try:
        urls = start(cluster)
        check_all(urls, 504)
    finally:
        cluster.close()


def test_services_started_before_the_database_then_restarted(tmp_path):
    """Start order does not matter: the services create their tables once a
    master answers; a restarted instance finds the tables and the data."""
    cluster = LocalCluster(tmp_path, request_timeout=1)
    try:
        urls = start(cluster)
        r = requests.put(urls["users"] + "/api/v1/users", json={"username": "alice", "password": pw()}, timeout=10)
        assert r.status_code == 504          # no worker yet
        cluster.bootstrap(slaves=1)

        def put_alice():
            r = requests.put(urls["users"] + "/api/v1/users", json={"username": "alice", "password": pw()}, timeout=10)
            return r.status_code in (201, 400) and r
        wait_for(put_alice, 30, 0.2, what="the users service to reach the new master")
        ride = {"created_by": "alice", "timestamp": future_ts(), "source": 1, "destination": 2}

        def post_ride():
            r = requests.post(urls["rides"] + "/api/v1/rides", json=ride, timeout=10)
            return r.status_code == 201 and r
        created = wait_for(post_ride, 30, 0.2, what="the rides service to reach the new master")
        # the reads below may reach the slave: they ask for the ride's LSN (alice's is before it)
        seen = {"X-Stratus-Min-LSN": created.headers["X-Stratus-LSN"]}
        # restart both services: same tables, same data
        for svc in ("users", "rides"):
            cluster.kill(svc)
        urls = start(cluster)
        r = requests.get(urls["rides"] + "/api/v1/rides/count", headers=seen, timeout=10)
        assert r.status_code == 200 and r.json() == [1]
        r = requests.get(urls["users"] + "/api/v1/users", headers=seen, timeout=10)
        assert r.status_code == 200 and r.json() == ["alice"]
    finally:
        cluster.close()
