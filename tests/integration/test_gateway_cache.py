"""The product cache through a real gateway process: hits served without
the upstream, invalidation messages on the cluster's fanout exchange, the
cache switched off, the LSN guard, the LRU bound; and end to end with the
real catalog and order services."""
import time

import pytest

from bus import metrics as bmetrics
from kits.testkit import Client, free_port, start_gateway, start_upstream, wait_healthy, wait_until


def product_reads(port: int) -> int:
    return Client(port).get("/_stats")[1]["product_reads"]


def wait_feed(gw: int) -> None:
    wait_until(lambda: Client(gw).get("/health")[1]["cache"]["feed"], 15, what="the invalidation feed")


def test_hit_invalidation_lsn_guard_and_lru(cluster):
    cat = start_upstream(cluster, "catalog", "catalog")
    start_upstream(cluster, "order", "order")
    gw = start_gateway(cluster, cache_size=4)
    wait_healthy(gw, "catalog", 1)
    wait_healthy(gw, "order", 1)
    wait_feed(gw)
    a, b = Client(gw), Client(gw)
    assert b.get("/health")[0] == 200  # b's connection is open before a writes anything

    status, body, resp = a.get("/products/Tux")
    assert status == 200 and resp.getheader("X-Cache") == "MISS"
    assert product_reads(cat) == 1
    for c in (a, b, Client(gw)):
        status, body2, resp = c.get("/products/Tux")
        assert status == 200 and body2 == body and resp.getheader("X-Cache") == "HIT"
        assert resp.getheader("X-Request-Id")
    assert product_reads(cat) == 1  # three hits, none reached the catalog

    # Only 200s are cached.
    assert a.get("/products/missing")[0] == 404
    assert a.get("/products/missing")[0] == 404
    assert product_reads(cat) == 1 and Client(cat).get("/_stats")[1]["requests"] == 3

    # An invalidation message drops the entry: the next read goes upstream.
    db = cluster.client()
    db.publish(cluster.names.invalidate_exchange_of("toystore"), "Tux".encode())
    wait_until(lambda: a.get("/products/Tux")[2].getheader("X-Cache") == "MISS", 5, what="the entry to be dropped")
    assert product_reads(cat) == 2
    assert a.get("/products/Tux")[2].getheader("X-Cache") == "HIT"
    # A name nobody cached is harmless; non-UTF-8 bodies are ignored.
    db.publish(cluster.names.invalidate_exchange_of("toystore"), "Nope".encode())
    db.publish(cluster.names.invalidate_exchange_of("toystore"), b"\xff\xfe")
    time.sleep(0.3)
    assert a.get("/products/Tux")[2].getheader("X-Cache") == "HIT"

    # The LSN guard: client a writes (the order stand-in answers X-Stratus-LSN: 500); the cached
    # entry reflects an earlier LSN, so a bypasses it, and sends its LSN upstream.
    status, body, resp = a.request("POST", "/orders?lsn=500", {"name": "Tux", "quantity": 1})
    assert status == 200 and resp.getheader("X-Stratus-LSN") == "500"
    status, body, resp = a.get("/products/Tux")
    assert resp.getheader("X-Cache") == "MISS" and resp.getheader("X-Seen-Min-LSN") == "500"
    assert product_reads(cat) == 3
    # The refill reflects LSN 500: a is served from the cache again, and so is b.
    assert a.get("/products/Tux")[2].getheader("X-Cache") == "HIT"
    assert b.get("/products/Tux")[2].getheader("X-Cache") == "HIT"
    # a's later writes go upstream with its LSN too.
    status, body, _ = a.get("/orders/3")
    assert body["headers"].get("X-Stratus-Min-LSN") == "500"
    status, body, _ = b.get("/orders/3")
    assert "X-Stratus-Min-LSN" not in body["headers"]  # b never wrote anything

    # Bounded LRU of 4: filling 5 more names pushes Tux out.
    for name in ("A", "B", "C", "D", "E"):
        assert a.get(f"/products/{name}")[0] == 200
    before = product_reads(cat)
    assert a.get("/products/E")[2].getheader("X-Cache") == "HIT"
    assert a.get("/products/Tux")[2].getheader("X-Cache") == "MISS"
    assert product_reads(cat) == before + 1
    assert bmetrics.value(a.get("/metrics")[1], "stratus_gateway_cache_entries") == 4


def test_cache_off_sends_every_request_upstream(cluster):
    cat = start_upstream(cluster, "catalog", "catalog")
    gw = start_gateway(cluster, STRATUS_GATEWAY_CACHE="0")
    wait_healthy(gw, "catalog", 1)
    c = Client(gw)
    for i in range(10):
        status, _, resp = c.get("/products/Tux")
        assert status == 200 and resp.getheader("X-Cache") is None
    assert product_reads(cat) == 10


def test_real_catalog_and_order_through_the_cache(cluster):
    cluster.bootstrap(slaves=1)
    for svc in ("catalog", "order"):
        cluster.spawn(svc, ["-m", svc], **{f"STRATUS_{svc.upper()}_PORT": str(free_port())})
    gw = start_gateway(cluster)
    wait_healthy(gw, "catalog", 1, timeout=40)
    wait_healthy(gw, "order", 1, timeout=40)
    wait_feed(gw)
    a, b = Client(gw), Client(gw)
    wait_until(lambda: a.get("/products/Fox")[0] == 200, 30, what="the catalog to be seeded")
    assert b.get("/products/Fox")[2].getheader("X-Cache") == "HIT"
    q0 = a.get("/products/Fox")[1]["data"]["quantity"]

    for i in range(5):
        status, body, resp = a.request("POST", "/orders", {"name": "Fox", "quantity": 1})
        assert status == 200, body
        assert int(resp.getheader("X-Stratus-LSN")) > 0
        # Read-your-writes through the cache: the writer sees its own order at once.
        status, body, _ = a.get("/products/Fox")
        assert status == 200 and body["data"]["quantity"] in (q0 - i - 1, 100), body  # 100: restocked
    # Everyone else sees the new stock once the invalidation has arrived.
    wait_until(lambda: b.get("/products/Fox")[1]["data"]["quantity"] == a.get("/products/Fox")[1]["data"]["quantity"],
               5, what="the invalidation to reach the gateway")
    status, body, _ = a.get("/products/NoSuchToy")
    assert status == 404 and body["error"]["code"] == 404


def test_cache_is_emptied_and_bypassed_while_the_invalidation_feed_is_down(cluster):
    import shutil
    import subprocess
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is needed to cut the gateway's AMQP connection")
    cat = start_upstream(cluster, "catalog", "catalog")
    gw = start_gateway(cluster)
    wait_healthy(gw, "catalog", 1)
    wait_feed(gw)
    c = Client(gw)
    c.get("/products/Tux")
    assert c.get("/products/Tux")[2].getheader("X-Cache") == "HIT"

    # Close exactly this gateway's invalidation connection (named after this test's cluster).
    name = f"stratus-gateway-invalidation {cluster.name}"
    out = subprocess.run(["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
                         capture_output=True, text=True, timeout=60).stdout
    conns = [line.split("\t")[0] for line in out.splitlines() if name in line]
    assert len(conns) == 1, out
    subprocess.run(["rabbitmqctl", "-q", "close_connection", conns[0], "test: cut the invalidation feed"],
                   capture_output=True, timeout=60, check=True)
    # Messages sent while it was down are lost, so nothing cached before survives the reconnection.
    wait_until(lambda: c.get("/health")[1]["cache"]["entries"] == 0, 20, what="the cache to be emptied")
    reads = product_reads(cat)
    wait_feed(gw)
    status, _, resp = c.get("/products/Tux")
    assert status == 200 and resp.getheader("X-Cache") == "MISS" and product_reads(cat) == reads + 1
    assert c.get("/products/Tux")[2].getheader("X-Cache") == "HIT"
    # And invalidations work on the new connection.
    cluster.client().publish(cluster.names.invalidate_exchange_of("toystore"), b"Tux")
    wait_until(lambda: c.get("/products/Tux")[2].getheader("X-Cache") == "MISS", 5, what="the invalidation")
