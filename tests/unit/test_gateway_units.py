"""Unit tests of the gateway's parts that need no network: tokens and
secrets, the HTTP head parser, routing, the LSN map, the product cache, the
balancer's choice and the metrics text."""
import os
import socket
import stat
import threading
import time

import pytest

from gateway import router
from gateway.balancer import Instance, ServicePool
from gateway.cache import Entry, ProductCache
from gateway.config import load_config
from gateway.http11 import HttpError, Reader, RequestBuffer, parse_head, render
from gateway.lsn import LSNTracker, parse_lsn
from gateway.metrics import Metrics
from gateway.proxy import strip_hop_by_hop
from gateway.secrets import load_or_create
from gateway.tokens import InvalidToken, Signer, TokenService


# -- tokens and secrets -------------------------------------------------------------
def test_token_roundtrip_expiry_and_tampering():
    s = Signer("k1")
    t = s.issue("alice", "user", 60)
    claims = s.verify(t)
    assert claims["sub"] == "alice" and claims["role"] == "user" and claims["exp"] - claims["iat"] == 60
    with pytest.raises(InvalidToken, match="expired"):
        s.verify(s.issue("alice", "user", 60, now=time.time() - 61))
    with pytest.raises(InvalidToken):
        Signer("k2").verify(t)
    body, sig = t.split(".")
    forged = Signer("k2").issue("alice", "admin", 60).split(".")[0]
    for bad in (f"{forged}.{sig}", f"{body}.", f".{sig}", t + ".x", "", "a" * 5000, f"{body}.{sig[::-1]}", "!!.??"):
        with pytest.raises(InvalidToken):
            s.verify(bad)


def test_secrets_are_generated_once_with_mode_0600(tmp_path):
    p = tmp_path / "state" / "admin-password"
    a = load_or_create(p)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600 and len(a) >= 16
    assert load_or_create(p) == a
    assert load_or_create(tmp_path / "state" / "other") != a
    assert [f for f in os.listdir(p.parent) if f.startswith(".")] == []  # no temp files left behind


def test_token_service_admin_and_tenant(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATUS_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("STRATUS_ADMIN_PASSWORD", raising=False)
    monkeypatch.setenv("STRATUS_TENANT_USERNAME", "shop")
    monkeypatch.setenv("STRATUS_TENANT_PASSWORD", "pw")

    def no_db(cfg):
        raise AssertionError("admin and tenant logins must not touch the bus")
    svc = TokenService(load_config(), db_factory=no_db)
    pw = (tmp_path / "admin-password").read_text().strip()
    assert stat.S_IMODE((tmp_path / "token-secret").stat().st_mode) == 0o600
    g = svc.grant("admin", pw)
    assert g["role"] == "admin" and svc.verify(g["token"])["role"] == "admin"
    assert svc.grant("admin", pw.upper() + "x") is None
    assert svc.grant("shop", "pw")["role"] == "tenant"
    assert svc.grant("shop", "PW") is None


def test_user_check_compares_lowercased_digests(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATUS_STATE_DIR", str(tmp_path))
    from bus.errors import BadRequest

    class FakeReply:
        def __init__(self, result):
            self.result = result

    class Table:
        rows = {"bob": "ab" * 20}
        missing = False

        def read(self, query, min_lsn=None, timeout=None):
            if self.missing:
                raise BadRequest("unknown table 'users'", code="unknown_table")
            u = query["where"][0][2]
            return FakeReply([{"username": u, "password": self.rows[u]}] if u in self.rows else [])
    table = Table()
    svc = TokenService(load_config(), db_factory=lambda cfg: table)
    assert svc.grant("bob", "AB" * 20)["role"] == "user"
    assert svc.grant("bob", "ab" * 19 + "ac") is None
    assert svc.grant("carol", "ab" * 20) is None
    table.missing = True
    assert svc.grant("bob", "ab" * 20) is None


# -- the HTTP head parser ------------------------------------------------------------------
def test_parse_head():
    r = parse_head(b"GET /api/v1/users?x=1 HTTP/1.1\r\nHost: a\r\nCookie: a=1\r\nCookie: b=2\r\nX-Y:  z \t")
    assert (r.method, r.path, r.version) == ("GET", "/api/v1/users", "HTTP/1.1")
    assert r.h["cookie"] == "a=1; b=2" and r.h["x-y"] == "z" and r.keep_alive
    assert not parse_head(b"GET / HTTP/1.0\r\nHost: a").keep_alive
    assert parse_head(b"GET / HTTP/1.0\r\nConnection: keep-alive").keep_alive
    assert not parse_head(b"GET / HTTP/1.1\r\nConnection: close").keep_alive
    for bad, status in [(b"GET /", 400), (b"GET  / HTTP/1.1", 400), (b"G(T / HTTP/1.1", 400),
                        (b"GET http://x/ HTTP/1.1", 400), (b"GET / HTTP/3", 505), (b"GET / HTTP/1.1\r\nNo colon", 400),
                        (b"GET / HTTP/1.1\r\nBad Name: x", 400), (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b", 400)]:
        with pytest.raises(HttpError) as e:
            parse_head(bad)
        assert e.value.status == status, bad


def _reader_over(data: bytes, **kw):
    a, b = socket.socketpair()
    b.sendall(data)
    b.shutdown(socket.SHUT_WR)
    opts = {"max_header_bytes": 1024, "max_body_bytes": 100, "read_timeout": 2.0, **kw}
    return Reader(a, **opts), (a, b)


def test_reader_limits_and_pipelining():
    rd, socks = _reader_over(b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\n\r\n")
    r1 = rd.read_request(lambda: None)
    r2 = rd.read_request(lambda: None)
    assert (r1.method, r1.body, r2.path) == ("POST", b"abc", "/b")
    for data, status in [(b"GET / HTTP/1.1\r\nX: " + b"a" * 2000 + b"\r\n\r\n", 431),
                         (b"POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n", 413),
                         (b"POST / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n", 400),
                         (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", 400),
                         (b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc", 400),
                         (b"\x00\x01\x02garbage", 400)]:
        rd, socks = _reader_over(data)
        with pytest.raises(HttpError) as e:
            rd.read_request(lambda: None)
        assert e.value.status == status, data
        for s in socks:
            s.close()


def _frame(data: bytes, *, max_body: int = 100) -> list:
    """The requests RequestBuffer frames out of `data` fed in one piece,
    checked to be the same when it is fed one byte at a time."""
    out = []
    for pieces in ([data], [data[i:i + 1] for i in range(len(data))]):
        rb, got = RequestBuffer(max_header_bytes=1024, max_body_bytes=max_body), []
        for piece in pieces:
            rb.feed(piece)
            while (req := rb.take()) is not None:
                got.append((req.method, req.path, req.body))
        out.append(got)
    assert out[0] == out[1]
    return out[0]


def _framing_error(data: bytes, **kw) -> int:
    with pytest.raises(HttpError) as e:
        _frame(data, **kw)
    return e.value.status


@pytest.mark.parametrize("value", [
    "\u0661\u0662".encode(),   # Arabic-Indic digits, UTF-8 on the wire
    b"\xb2",                   # '\u00b2' as latin-1: str.isdigit() says yes, int() raises
    b"+5", b"-5", b"5 5", b"1_0", b"0x10", b"5.0", b"", b"5\x0b", b"1234567890123456789",
])
def test_a_content_length_that_is_not_ascii_digits_is_400(value):
    assert _framing_error(b"POST / HTTP/1.1\r\nContent-Length: " + value + b"\r\n\r\nhello") == 400


def test_body_framing():
    assert _frame(b"POST /a HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"
                  b"GET /b HTTP/1.1\r\n\r\n") == [("POST", "/a", b"hello"), ("GET", "/b", b"")]
    # Chunked bodies, with extensions and trailers, then a pipelined request.
    assert _frame(b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=1\r\n world\r\n"
                  b"A \r\n0123456789\r\n0\r\nX-T: 1\r\n\r\nGET /d HTTP/1.1\r\n\r\n") == [
        ("POST", "/c", b"hello world0123456789"), ("GET", "/d", b"")]
    chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    for bad in [b"zz\r\n", b"-1\r\n", b"1_0\r\n", b"0x5\r\n", b" 5\r\n", b"\r\n", b"\xd9\xa1\r\n",
                b"ffffffffffffffff\r\n", b"5\r\nhelloXY", b"5\r\nhello\r\n0\r\nno colon\r\n\r\n",
                b"1" * 2000]:
        assert _framing_error(chunked + bad) == 400, bad
    assert _framing_error(chunked + b"40\r\n" + b"a" * 64 + b"\r\n40\r\n") == 413   # 128 > 100
    for head, status in [
            (b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked", 400),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2", 400),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip", 400),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip", 400),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked", 501),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked", 501),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked", 400),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: 101", 413),
            (b"POST / HTTP/1.1\r\nHost\n: x", 400)]:
        assert _framing_error(head + b"\r\n\r\n") == status, head


def test_render():
    out = render(200, [("A", "b")], b"xy", keep_alive=True)
    assert out == b"HTTP/1.1 200 OK\r\nA: b\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nxy"
    assert render(204, [], b"", keep_alive=False).endswith(b"Connection: close\r\n\r\n")
    assert render(200, [], b"xy", keep_alive=True, head_only=True).endswith(b"\r\n\r\n")


# -- routing -----------------------------------------------------------------------------
@pytest.mark.parametrize("path,service,admin", [
    ("/api/v1/users", "users", False), ("/api/v1/users/bob", "users", False),
    ("/api/v1/rides", "rides", False), ("/api/v1/rides/7", "rides", False),
    ("/products/Tux", "catalog", False), ("/orders", "order", False), ("/orders/3", "order", False),
    ("/api/v1/db/read", "orchestrator", True), ("/api/v1/db/clear", "orchestrator", True),
    ("/api/v1/crash/master", "orchestrator", True), ("/api/v1/worker/list", "orchestrator", True),
    ("/api/v1/cluster", "orchestrator", True), ("/api/v1/switchover", "orchestrator", True),
    ("/api/v1/usersX", None, False), ("/productsX", None, False), ("/", None, False), ("/api/v1/_count", None, False),
])
def test_routes(path, service, admin):
    r = router.route(path)
    assert (r.service, r.admin) == (service, admin)


def test_gateway_routes_and_dot_segments():
    assert router.route("/health") is router.HEALTH and router.route("/metrics") is router.METRICS
    assert router.route("/api/v1/auth/token") is router.TOKEN
    for bad in ("/api/v1/users/../db/clear", "/api/v1/users/%2E%2E/db", "/a/./b", "/api%2fv1", "/x/%00"):
        with pytest.raises(router.BadPath):
            router.check_path(bad)
    router.check_path("/api/v1/users/bob..smith")


# -- read-your-writes map -----------------------------------------------------------------
def test_lsn_tracker_keeps_the_highest_and_is_bounded():
    t = LSNTracker(max_clients=3, ttl=60)
    t.observe("a", 5)
    t.observe("a", 3)
    assert t.get("a") == 5 and t.get("nobody") == 0 and t.get(None) == 0
    for k in "bcd":
        t.observe(k, 1)
    assert len(t) == 3 and t.get("a") == 0  # the least recently used went first
    short = LSNTracker(ttl=0.05)
    short.observe("x", 9)
    time.sleep(0.1)
    assert short.get("x") == 0
    assert parse_lsn("12") == 12 and parse_lsn("x") == 0 and parse_lsn("-1") == 0 and parse_lsn(None) == 0


# -- product cache -----------------------------------------------------------------------
def test_cache_lru_lsn_guard_and_invalidation_race():
    c = ProductCache(size=2)
    e = lambda lsn: Entry(200, [], b"{}", lsn)  # noqa: E731
    assert c.put("a", e(10), c.epoch()) and c.put("b", e(10), c.epoch())
    assert c.get("a", 0) is not None          # a is now the most recent
    c.put("c", e(10), c.epoch())
    assert "b" not in c and "a" in c and len(c) == 2
    assert c.get("a", 10) is not None and c.get("a", 11) is None  # the client saw a later LSN: bypass
    epoch = c.epoch()
    c.invalidate("zzz")                         # an invalidation during a fill...
    assert not c.put("a", e(20), epoch)         # ...keeps the possibly stale answer out
    c.invalidate("a")
    assert "a" not in c
    off = ProductCache(size=8, enabled=False)
    assert not off.usable() and not off.put("a", e(1), off.epoch())


# -- balancer ----------------------------------------------------------------------------
def test_pick_least_outstanding_round_robin_and_health():
    pool = ServicePool("svc", load_config(health_interval=3600))
    pool._on_change({f"i{n}": {"host": "127.0.0.1", "port": 1000 + n} for n in range(3)})
    counts = {}
    for _ in range(300):
        k = pool.pick().key
        counts[k] = counts.get(k, 0) + 1
    assert counts == {"i0": 100, "i1": 100, "i2": 100}
    busy = pool.instances["i0"]
    busy.begin()
    busy.begin()
    pool.instances["i1"].begin()
    assert {pool.pick().key for _ in range(10)} == {"i2"}
    pool.instances["i2"].healthy = False
    assert {pool.pick().key for _ in range(10)} == {"i1"}
    assert pool.pick(exclude={"i1"}).key == "i0"
    # Affinity: a key keeps its instance while it is healthy.
    pool2 = ServicePool("svc2", load_config(health_interval=3600))
    pool2._on_change({f"i{n}": {"host": "127.0.0.1", "port": 2000 + n} for n in range(3)})
    first = pool2.pick(affinity_key="tok").key
    assert {pool2.pick(affinity_key="tok").key for _ in range(10)} == {first}
    pool2.instances[first].healthy = False
    assert pool2.pick(affinity_key="tok").key != first
    # A vanished znode removes the instance at once.
    pool2._on_change({"i0": {"host": "127.0.0.1", "port": 2000}})
    assert {pool2.pick().key for _ in range(5)} == {"i0"}
    pool.close()
    pool2.close()


def test_strip_hop_by_hop():
    h = [("Connection", "close, X-Secret"), ("X-Secret", "1"), ("Keep-Alive", "5"), ("Transfer-Encoding", "x"),
         ("Upgrade", "h2c"), ("Content-Type", "a"), ("TE", "trailers"), ("Proxy-Authorization", "p")]
    assert strip_hop_by_hop(h) == [("Content-Type", "a")]


def test_metrics_text():
    m = Metrics()
    m.observe("users", "GET", 200, 0.003)
    m.observe("users", "GET", 200, 20.0)
    m.upstream_error("users", "connect")
    m.gauge("stratus_gateway_threads", "t", lambda: [({"state": "busy"}, 2)])
    m.gauge("broken", "b", lambda: 1 / 0)
    text = m.render()
    assert 'stratus_gateway_requests_total{route="users",method="GET",status="200"} 2' in text
    assert 'stratus_gateway_request_duration_seconds_bucket{route="users",le="0.005"} 1' in text
    assert 'stratus_gateway_request_duration_seconds_bucket{route="users",le="+Inf"} 2' in text
    assert 'stratus_gateway_upstream_errors_total{route="users",kind="connect"} 1' in text
    assert 'stratus_gateway_threads{state="busy"} 2' in text


def test_instance_counters_are_thread_safe():
    inst = Instance("k", "127.0.0.1", 1)

    def run():
        for _ in range(10000):
            inst.begin()
            inst.end(True)
    ts = [threading.Thread(target=run) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert inst.outstanding == 0 and inst.served == 40000


def test_render_head_keeps_the_announced_length():
    out = render(200, [("Content-Length", "42")], b"", keep_alive=True, head_only=True)
    assert out.count(b"Content-Length") == 1 and b"Content-Length: 42" in out


def test_metrics_labels_stay_bounded():
    m = Metrics()
    for i in range(1000):
        m.observe("unknown", f"M{i}", 404, 0.001)
    assert len(m.requests) == 1
    assert 'method="OTHER",status="404"} 1000' in m.render()
