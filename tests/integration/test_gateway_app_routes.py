"""Apps' routes through a real gateway process, from the real ZooKeeper
(bus/routing.py; paas.md, Apps and Behaviour: Affinity; platform.md, Routes
through the gateway): trivial upstream processes registered under an app's
service name (bus.names.app_service) stand for a web role's instances.

- a published route answers 200 within a second; a removed one 404 (JSON)
  within a second, and its pool is closed; a new instance takes requests
  within a second of registering;
- a request in flight when its route, or its instance, goes still completes;
- the longest prefix wins, "/" takes what no other prefix covers, and the
  platform's reserved paths (under /api, /dashboard, /health, /metrics, in
  any case or spelling) never reach an app; a path no app owns is 404 JSON;
- affinity, by cookie (set by the gateway: HttpOnly, SameSite=Lax, Path=/)
  and by token: one instance across 20 requests while two are healthy; the
  client moves when its instance is killed or fails its health check;
- the app's requests count against its tenant's rate."""
import os
import signal
import threading
import time

from bus import metrics as bmetrics
from bus import routing
from bus.names import app_service
from gateway.tokens import issue
from kits.testkit import Client, start_gateway, start_upstream, wait_healthy, wait_until

SECRET = "app-routes-test-secret-of-32-bytes!"
WEB = app_service("acme", "shop", "web")
API = app_service("acme", "shop", "api")
SITE = app_service("beta", "site", "web")


def _publish(cluster, tenant, app, routes):
    routing.publish(cluster.zk, cluster.paths, tenant, app, routes, by="test")


def _upstreams(gw) -> dict:
    return Client(gw, timeout=2).get("/health")[1]["upstreams"]


def _within(pred, seconds: float, what: str) -> float:
    """How long `pred` took to hold; fails past `seconds`."""
    t0 = time.monotonic()
    wait_until(pred, seconds, 0.01, what=what)
    return time.monotonic() - t0


def _znode(cluster, service: str, port: int) -> str:
    path = cluster.paths.service(service)
    [child] = [c for c in cluster.zk.get_children(path) if c.startswith(f"127.0.0.1:{port}-")]
    return f"{path}/{child}"


def _is_json_404(c, path) -> bool:
    status, body, resp = c.get(path)
    return status == 404 and isinstance(body, dict) and "error" in body and \
        resp.getheader("Content-Type") == "application/json"


def test_deploy_scale_and_delete_take_effect_within_a_second(cluster):
    p1 = start_upstream(cluster, "web1", WEB)
    gw = start_gateway(cluster)
    c = Client(gw)
    assert _is_json_404(c, "/shop/cart")          # no app owns it yet

    _publish(cluster, "acme", "shop", {"/shop": ("web", WEB)})
    took = _within(lambda: c.get("/shop/cart")[0] == 200, 1.0, "the published route to answer")
    status, body, _ = c.get("/shop/cart?x=1")
    assert status == 200 and body["instance"] == f"{WEB}@{p1}" and body["path"] == "/shop/cart?x=1"
    assert _upstreams(gw)[WEB] == {"instances": 1, "healthy": 1}
    print(f"route published -> first 200 in {took * 1000:.0f} ms")

    # Scale to 2: the new instance takes requests within a second of registering.
    p2 = start_upstream(cluster, "web2", WEB)
    _within(lambda: _upstreams(gw)[WEB]["instances"] == 2, 1.0, "the second instance to join")
    seen = {c.get("/shop/x")[1]["instance"] for _ in range(10)}   # no cookie sent back: spread
    assert seen == {f"{WEB}@{p1}", f"{WEB}@{p2}"}, seen

    # Delete: 404 with a JSON error within a second, and the pool is closed.
    routing.remove(cluster.zk, cluster.paths, "acme", "shop")
    took = _within(lambda: _is_json_404(c, "/shop/cart"), 1.0, "the removed route to answer 404")
    print(f"route removed -> 404 in {took * 1000:.0f} ms")
    wait_until(lambda: WEB not in _upstreams(gw), 2, what="the pool of the removed route to close")
    # Deployed again: back within a second.
    _publish(cluster, "acme", "shop", {"/shop": ("web", WEB)})
    _within(lambda: c.get("/shop/cart")[0] == 200, 1.0, "the route published again to answer")


def test_requests_in_flight_finish_when_the_route_or_instance_goes(cluster):
    ports = [start_upstream(cluster, f"web{i}", WEB) for i in range(2)]
    _publish(cluster, "acme", "shop", {"/shop": ("web", WEB)})
    gw = start_gateway(cluster)
    wait_healthy(gw, WEB, 2)

    def slow(out: dict, key: str) -> None:
        status, body, _ = Client(gw, timeout=20).get("/shop/_sleep?s=2")
        out[key] = (status, body)

    # An instance leaves the registry (scale down) while it is serving a request.
    results: dict = {}
    t = threading.Thread(target=slow, args=(results, "instance"))
    t.start()
    busy = wait_until(lambda: [p for p in ports if Client(p).get("/_stats")[1]["requests"] == 1], 5,
                      what="the slow request to reach an instance")[0]
    other = next(p for p in ports if p != busy)
    cluster.zk.delete(_znode(cluster, WEB, busy))
    _within(lambda: _upstreams(gw)[WEB]["instances"] == 1, 1.0, "the gateway to drop the instance")
    c = Client(gw)
    assert {c.get("/shop/x")[1]["instance"] for _ in range(10)} == {f"{WEB}@{other}"}   # new requests: the other
    t.join(10)
    assert results["instance"][0] == 200 and results["instance"][1]["instance"] == f"{WEB}@{busy}", results

    # The whole route goes while a request is in flight.
    t = threading.Thread(target=slow, args=(results, "route"))
    t.start()
    wait_until(lambda: Client(other).get("/_stats")[1]["requests"] == 11, 5, what="the slow request to arrive")
    routing.remove(cluster.zk, cluster.paths, "acme", "shop")
    _within(lambda: _is_json_404(c, "/shop/x"), 1.0, "new requests to see the route gone")
    assert WEB in _upstreams(gw)                    # its pool stays while the request is on it...
    t.join(10)
    assert results["route"][0] == 200 and results["route"][1]["instance"] == f"{WEB}@{other}", results
    wait_until(lambda: WEB not in _upstreams(gw), 2, what="the pool to close once the request ended")


def test_longest_prefix_wins_and_paths_no_app_owns_are_404(cluster):
    web, api = start_upstream(cluster, "web", WEB), start_upstream(cluster, "api", API)
    _publish(cluster, "acme", "shop", {"/shop": ("web", WEB), "/shop/api": ("api", API)})
    gw = start_gateway(cluster)
    wait_healthy(gw, WEB, 1)
    wait_healthy(gw, API, 1)
    c = Client(gw)
    cases = {"/shop": WEB, "/shop/": WEB, "/shop/cart/1": WEB, "/shop/apis": WEB,
             "/shop/api": API, "/shop/api/": API, "/shop/api/v2/items": API}
    for path, service in cases.items():
        status, body, _ = c.get(path)
        assert status == 200 and body["instance"] == f"{service}@{web if service == WEB else api}", (path, body)
    for path in ("/shopping", "/sho", "/", "/nobody/owns/this", "/api/v1/nothing"):
        assert _is_json_404(c, path), path

    # "/" of another app takes every path no longer prefix covers, but never the platform's paths.
    site = start_upstream(cluster, "site", SITE)
    _publish(cluster, "beta", "site", {"/": ("web", SITE)})
    wait_until(lambda: c.get("/shopping")[0] == 200, 1.0, what="the root route")
    for path in ("/", "/shopping", "/nobody/owns/this", "/apix"):   # by segment, /apix is not /api's
        status, body, _ = c.get(path)
        assert status == 200 and body["instance"] == f"{SITE}@{site}", (path, body)
    assert c.get("/shop/api/x")[1]["instance"] == f"{API}@{api}"
    # Everything under /api, /dashboard, /health and /metrics is the platform's, whatever
    # the case or spelling (paas.md, Apps): "/" takes none of it.
    for path in ("/api/v1/auth/other", "/api/v1/worker/other", "/health/x", "/metrics/x", "/api/v1/nothing",
                 "/API/v1/tenants", "/Health", "/METRICS/", "/Dashboard/x", "//health", "//api/v1/cluster",
                 "/%61pi/v1/cluster", "/%68ealth"):
        assert _is_json_404(c, path), path
    assert c.get("/dashboard/x")[0] != 200        # the dashboard's, never the app's (503: none runs here)
    assert c.get("/health")[1]["service"] == "gateway"
    assert c.get("/api/v1/cluster")[0] == 401        # the platform's own route, not the app's
    assert Client(site).get("/_stats")[1]["requests"] == 5   # only the five above reached it


def _instance_of(c, path, headers=None):
    status, body, resp = c.get(path, headers=headers)
    assert status == 200, (status, body)
    return body["instance"], resp


def test_affinity_by_cookie_and_by_token(cluster):
    ports = [start_upstream(cluster, f"web{i}", WEB) for i in range(2)]
    _publish(cluster, "acme", "shop", {"/shop": ("web", WEB)})
    gw = start_gateway(cluster, STRATUS_TOKEN_SECRET=SECRET, health_interval=0.3)
    wait_healthy(gw, WEB, 2)
    c = Client(gw)

    # A client without a cookie gets one on its first answer...
    first, resp = _instance_of(c, "/shop/a")
    set_cookie = resp.getheader("Set-Cookie")
    assert set_cookie, resp.getheaders()
    name_value, *attrs = [p.strip() for p in set_cookie.split(";")]
    assert name_value.startswith("stratus_affinity=") and len(name_value) > len("stratus_affinity=") + 16
    assert {a.lower() for a in attrs} == {"path=/", "httponly", "samesite=lax"}, set_cookie
    cookie = {"Cookie": name_value}
    # ...and keeps that instance while both are healthy; no new cookie is set.
    for i in range(20):
        inst, resp = _instance_of(c, f"/shop/{i}", cookie)
        assert inst == first and resp.getheader("Set-Cookie") is None, (i, inst, first)
    # Other clients (new cookies) are spread over both instances.
    assert {_instance_of(Client(gw), "/shop/x")[0] for _ in range(6)} == {f"{WEB}@{p}" for p in ports}

    # A token keys the client instead: no cookie, one instance.
    token = {"Authorization": f"Bearer {issue(SECRET, 'carol', 'user', 600, tenant='acme')}"}
    pinned, resp = _instance_of(c, "/shop/t", token)
    assert resp.getheader("Set-Cookie") is None
    for i in range(20):
        assert _instance_of(c, f"/shop/t{i}", token)[0] == pinned

    # The token's instance fails its health check: the client moves, and stays moved once it is back.
    sick = int(pinned.rpartition("@")[2])
    assert Client(sick).request("POST", "/_sick")[0] == 200
    wait_healthy(gw, WEB, 1, timeout=10)
    moved = {_instance_of(c, f"/shop/m{i}", token)[0] for i in range(20)}
    assert moved == {f"{WEB}@{p}" for p in ports if p != sick}, moved
    assert Client(sick).request("POST", "/_well")[0] == 200
    wait_healthy(gw, WEB, 2, timeout=10)
    assert {_instance_of(c, f"/shop/b{i}", token)[0] for i in range(20)} == moved

    # The cookie's instance is killed: the client moves to the survivor, with no failed request.
    victim = int(first.rpartition("@")[2])
    key = next(k for k, p in (("web0", ports[0]), ("web1", ports[1])) if p == victim)
    os.kill(cluster.procs[key].pid, signal.SIGKILL)
    cluster.procs[key].wait(10)
    after = [_instance_of(c, f"/shop/k{i}", cookie)[0] for i in range(20)]
    assert set(after) == {f"{WEB}@{p}" for p in ports if p != victim}, after


def test_an_apps_requests_count_against_its_tenant(cluster):
    start_upstream(cluster, "web", WEB)
    start_upstream(cluster, "users", "users")
    _publish(cluster, "acme", "shop", {"/shop": ("web", WEB)})
    gw = start_gateway(cluster, STRATUS_TENANT_RATE=2, STRATUS_TENANT_BURST=4)
    wait_healthy(gw, WEB, 1)
    wait_healthy(gw, "users", 1)
    c = Client(gw)
    statuses = [c.get("/shop/x")[0] for _ in range(12)]
    assert statuses[:4] == [200] * 4 and 429 in statuses and set(statuses) == {200, 429}, statuses
    status, body, resp = c.get("/shop/x")
    assert status == 429 and "acme" in body["error"] and int(resp.getheader("Retry-After")) >= 1
    assert [c.get("/api/v1/users")[0] for _ in range(12)] == [200] * 12   # a built-in tenant: no limit
    assert bmetrics.value(c.get("/metrics")[1], "stratus_gateway_throttled_total", tenant="acme") >= 1


def test_route_table_follows_zookeeper(cluster):
    """bus.routing.RouteTable against the real ZooKeeper, without a gateway:
    entries added, changed and removed; the routes node itself deleted and
    made again; read_all; every change reported in order."""
    seen = []
    table = routing.RouteTable(cluster.zk, cluster.paths, on_change=lambda t: seen.append(dict(t)))
    try:
        assert table.match("/shop") is None and routing.read_all(cluster.zk, cluster.paths) == {}
        _publish(cluster, "acme", "shop", {"/shop": ("web", WEB)})
        wait_until(lambda: table.match("/shop/x"), 1.0, 0.01, what="the entry")
        assert table.match("/shop/x") == ("/shop", routing.Entry("acme", "shop", "web", WEB))
        _publish(cluster, "acme", "shop", {"/shop": ("web", WEB), "/shop/api": ("api", API)})
        wait_until(lambda: table.match("/shop/api/1") and table.match("/shop/api/1")[1].service == API, 1.0, 0.01,
                   what="the changed entry")
        _publish(cluster, "beta", "site", {"/": ("web", SITE)})
        wait_until(lambda: table.match("/elsewhere"), 1.0, 0.01, what="a second app")
        assert sorted(routing.read_all(cluster.zk, cluster.paths)) == ["acme.shop", "beta.site"]
        assert routing.read_all(cluster.zk, cluster.paths)["acme.shop"]["by"] == "test"
        # An unreadable entry is ignored; the other apps' routes stay.
        cluster.zk.set(cluster.paths.app_route("acme", "shop"), b"{not json")
        wait_until(lambda: table.match("/shop/x")[1].app == "site", 1.0, 0.01, what="the bad entry to be dropped")
        assert routing.remove(cluster.zk, cluster.paths, "beta", "site") is True
        assert routing.remove(cluster.zk, cluster.paths, "beta", "site") is False
        wait_until(lambda: table.match("/elsewhere") is None, 1.0, 0.01, what="the removal")
        # The whole routes node goes, and comes back: the table follows it.
        cluster.zk.delete(cluster.paths.routes, recursive=True)
        wait_until(lambda: table.table == {}, 1.0, 0.01, what="an empty table")
        _publish(cluster, "acme", "shop", {"/shop": ("web", WEB)})
        wait_until(lambda: table.match("/shop"), 2.0, 0.01, what="the entry under the new routes node")
        assert [sorted(t) for t in seen] == [["/shop"], ["/shop", "/shop/api"], ["/", "/shop", "/shop/api"], ["/"],
                                             [], ["/shop"]], seen
    finally:
        table.close()
    # Closed: no more changes are reported.
    routing.remove(cluster.zk, cluster.paths, "acme", "shop")
    time.sleep(0.3)
    assert table.table and sorted(seen[-1]) == ["/shop"]
