"""The gateway's balancer against real registered upstream processes: even
spread, kill -9 of an instance with no failed request, health checks, and
the retry rules (idempotent retried, POST never)."""
import collections
import os
import signal
import time

from kits.testkit import Client, start_gateway, start_upstream, wait_healthy, wait_until


def _instance(body):
    return body["instance"]


def test_spread_and_kill9_without_failed_requests(cluster):
    ports = [start_upstream(cluster, f"up{i}", "rides") for i in range(3)]
    gw = start_gateway(cluster)
    wait_healthy(gw, "rides", 3)
    c = Client(gw)

    counts = collections.Counter()
    for i in range(300):
        status, body, resp = c.get(f"/api/v1/rides/{i}")
        assert status == 200, (status, body)
        assert resp.getheader("X-Request-Id")
        counts[_instance(body)] += 1
    assert set(counts) == {f"rides@{p}" for p in ports}, counts
    for n in counts.values():  # within ±20% of an even 100 each
        assert 80 <= n <= 120, counts

    # kill -9 one instance: every later request still succeeds (a GET that
    # hits it before its znode vanishes fails to connect and is retried).
    victim = f"rides@{ports[0]}"
    os.kill(cluster.procs["up0"].pid, signal.SIGKILL)
    cluster.procs["up0"].wait(10)
    after = collections.Counter()
    for i in range(100):
        status, body, _ = c.get(f"/api/v1/rides/{i}")
        assert status == 200, (i, status, body)
        after[_instance(body)] += 1
    # Once its znode is gone, the dead instance gets nothing at all.
    path = cluster.paths.service("rides")
    wait_until(lambda: not any(ch.startswith(f"127.0.0.1:{ports[0]}-") for ch in cluster.zk.get_children(path)),
               15, what="the dead instance's znode to vanish")
    wait_until(lambda: Client(gw).get("/health")[1]["upstreams"]["rides"]["instances"] == 2, 5,
               what="the gateway to drop the instance")
    late = collections.Counter()
    for i in range(200):
        status, body, _ = c.get(f"/api/v1/rides/{i}")
        assert status == 200, (status, body)
        late[_instance(body)] += 1
    assert victim not in late and set(late) == {f"rides@{p}" for p in ports[1:]}, late
    for n in late.values():
        assert 80 <= n <= 120, late
    # POSTs also keep working on the survivors.
    for i in range(20):
        assert c.request("POST", "/api/v1/rides", {"n": i})[0] == 200


def test_concurrent_clients_spread_by_outstanding_requests(cluster):
    import threading
    ports = [start_upstream(cluster, f"up{i}", "users") for i in range(3)]
    gw = start_gateway(cluster)
    wait_healthy(gw, "users", 3)
    counts = collections.Counter()
    lock = threading.Lock()
    errors = []

    def run():
        c = Client(gw)
        for i in range(50):
            status, body, _ = c.get("/api/v1/users")
            if status != 200:
                errors.append(status)
                continue
            with lock:
                counts[_instance(body)] += 1
        c.close()
    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sum(counts.values()) == 300 and set(counts) == {f"users@{p}" for p in ports}
    # Under concurrency the faster instances take more (that is the point of
    # least-outstanding); none is starved.
    for n in counts.values():
        assert n >= 50, counts


def test_a_busy_instance_is_avoided(cluster):
    import threading
    for i in range(2):
        start_upstream(cluster, f"up{i}", "rides")
    gw = start_gateway(cluster)
    wait_healthy(gw, "rides", 2)
    slow = {}

    def long_request():
        status, body, _ = Client(gw).get("/api/v1/rides/_sleep?s=3")
        slow["by"] = body["instance"]
    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(0.5)  # the long request is in flight on one instance
    c = Client(gw)
    seen = collections.Counter(_instance(c.get("/api/v1/rides/1")[1]) for _ in range(20))
    t.join(10)
    assert len(seen) == 1 and slow["by"] not in seen, (seen, slow)


def test_failed_health_check_takes_an_instance_out_until_it_recovers(cluster):
    ports = [start_upstream(cluster, f"up{i}", "rides") for i in range(2)]
    gw = start_gateway(cluster, health_interval=0.3)
    wait_healthy(gw, "rides", 2)
    sick = f"rides@{ports[0]}"
    assert Client(ports[0]).request("POST", "/_sick")[0] == 200
    wait_healthy(gw, "rides", 1, timeout=10)
    c = Client(gw)
    seen = collections.Counter(_instance(c.get("/api/v1/rides/1")[1]) for _ in range(30))
    assert sick not in seen, seen
    assert Client(ports[0]).request("POST", "/_well")[0] == 200
    wait_healthy(gw, "rides", 2, timeout=10)
    seen = collections.Counter(_instance(c.get("/api/v1/rides/1")[1]) for _ in range(30))
    assert sick in seen, seen


def test_get_is_retried_once_but_post_never(cluster):
    ports = [start_upstream(cluster, f"up{i}", "rides") for i in range(2)]
    gw = start_gateway(cluster)
    wait_healthy(gw, "rides", 2)

    def total_requests():
        return sum(Client(p).get("/_stats")[1]["requests"] for p in ports)

    c = Client(gw)
    base = total_requests()
    # /_drop closes the connection without answering, after the request arrived.
    status, body, _ = c.request("POST", "/api/v1/rides/_drop", {"x": 1})
    assert status == 502, (status, body)
    assert total_requests() - base == 1  # the POST reached one upstream once, and was not re-sent

    c = Client(gw)
    base = total_requests()
    status, body, resp = c.get("/api/v1/rides/_drop")
    assert status == 502, (status, body)
    assert total_requests() - base == 2  # the GET was retried once, on the other instance
    # Both attempts carried the gateway's one request id for it (the services make it the bus
    # request id of a write, so a retried write is answered with the first attempt's result).
    rid = resp.getheader("X-Request-Id")
    assert rid and all(Client(p).get("/_stats")[1]["seen"][-1] == rid for p in ports), rid
    status, body, resp = Client(gw).request("PUT", "/api/v1/rides/_drop", {"x": 1},
                                            headers={"X-Request-Id": "client-put-7"})
    assert status == 502 and resp.getheader("X-Request-Id") == "client-put-7", (status, body)
    assert [Client(p).get("/_stats")[1]["seen"][-1] for p in ports] == ["client-put-7"] * 2

    # Both instances are still in rotation: a transport error after the send is not a health verdict.
    assert Client(gw).get("/api/v1/rides/1")[0] == 200


def test_no_instances_answers_503_json(cluster):
    gw = start_gateway(cluster)
    c = Client(gw)
    for path in ("/products/Tux", "/orders/1", "/api/v1/users"):
        status, body, resp = c.get(path)
        assert status == 503 and body == {"error": "service unavailable"}, (path, status, body)
        assert resp.getheader("Content-Type") == "application/json"
    status, body, _ = c.get("/nope")
    assert status == 404 and "error" in body


def test_real_rides_instances_spread_and_survive_kill9(cluster):
    """Three real rides services (gunicorn, registered in ZooKeeper): each
    instance counts the requests it answered on /api/v1/rides routes."""
    from kits.testkit import free_port
    cluster.bootstrap(slaves=1)
    ports = [free_port() for _ in range(3)]
    for i, p in enumerate(ports):
        cluster.spawn(f"rides{i}", ["-m", "rides"], STRATUS_RIDES_PORT=str(p))
    gw = start_gateway(cluster)
    wait_healthy(gw, "rides", 3, timeout=60)
    c = Client(gw)
    wait_until(lambda: c.get("/api/v1/rides/count")[0] == 200, 30, what="rides tables")
    for p in ports:
        assert Client(p).request("DELETE", "/api/v1/_count")[0] == 200

    for _ in range(300):
        status, body, _ = c.get("/api/v1/rides/count")
        assert status == 200, body
    counts = [Client(p).get("/api/v1/_count")[1][0] for p in ports]
    assert sum(counts) == 300 and all(80 <= n <= 120 for n in counts), counts

    os.kill(cluster.procs["rides0"].pid, signal.SIGKILL)
    cluster.procs["rides0"].wait(10)
    for i in range(150):
        status, body, _ = c.get("/api/v1/rides/count")
        assert status == 200, (i, status, body)
    wait_healthy(gw, "rides", 2, timeout=15)
    before = [Client(p).get("/api/v1/_count")[1][0] for p in ports[1:]]
    for _ in range(100):
        assert c.get("/api/v1/rides/count")[0] == 200
    after = [Client(p).get("/api/v1/_count")[1][0] for p in ports[1:]]
    assert sum(after) - sum(before) == 100  # the survivors answered all of them


def test_forwarded_headers_request_ids_and_access_log(cluster):
    up = start_upstream(cluster, "up0", "rides")
    gw = start_gateway(cluster)
    wait_healthy(gw, "rides", 1)
    c = Client(gw)
    status, body, resp = c.request("PUT", "/api/v1/rides/9?x=1", {"a": 1}, headers={
        "X-Request-Id": "client-chosen-id.1", "X-Forwarded-For": "10.0.0.9", "Connection": "keep-alive, X-Private",
        "X-Private": "secret", "Keep-Alive": "timeout=5", "X-Stratus-Min-LSN": "7"})
    assert status == 200 and body["method"] == "PUT" and body["path"] == "/api/v1/rides/9?x=1" and body["body"] == '{"a": 1}'
    h = {k.lower(): v for k, v in body["headers"].items()}
    assert h["x-request-id"] == "client-chosen-id.1" and resp.getheader("X-Request-Id") == "client-chosen-id.1"
    assert h["x-forwarded-for"] == "10.0.0.9, 127.0.0.1" and h["x-stratus-min-lsn"] == "7"
    assert "x-private" not in h and "keep-alive" not in h and "connection" not in h  # hop-by-hop stripped
    # An unusable id is replaced by a generated one, which the upstream sees too.
    status, body, resp = c.get("/api/v1/rides/9", headers={"X-Request-Id": "bad id with spaces"})
    rid = resp.getheader("X-Request-Id")
    assert rid and rid != "bad id with spaces" and body["headers"]["X-Request-Id"] == rid
    assert rid in Client(up).get("/_stats")[1]["seen"]
    # One access log line per request, with method, path, status, time, upstream and request id.
    line = wait_until(lambda: [ln for ln in cluster.log("gateway").splitlines() if f"rid={rid}" in ln], 5,
                      what="the access log line")[0]
    assert "GET /api/v1/rides/9 200" in line and f"upstream=127.0.0.1:{up}" in line and "ms" in line
