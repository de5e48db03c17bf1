"""Unit tests of the gateway's parts that need no network: tokens and
secrets, the HTTP head parser, routing, the LSN map, the product cache, the
balancer's choice and the metrics text."""
import base64
import hashlib
import hmac
import json
import os
import socket
import stat
import threading
import time

import jwt
import pytest

from bus.routing import build, match_prefix
from gateway import router
from gateway.balancer import Instance, ServicePool, Upstreams
from gateway.cache import Entry, ProductCache
from gateway.config import load_config
from gateway.http11 import HttpError, Reader, RequestBuffer, parse_head, render
from gateway.lsn import LSNTracker, parse_lsn
from bus import metrics as bmetrics
from gateway.metrics import Metrics
from gateway.proxy import strip_hop_by_hop
from gateway.ratelimit import RateLimiter, retry_after
from gateway.secrets import load_or_create
from gateway import tokens
from gateway.tokens import InvalidToken, ServiceUnavailable, TokenService


# -- tokens and secrets -------------------------------------------------------------
K1, K2 = "k1" * 16, "k2" * 16   # 32 bytes: what RFC 7518 asks of an HS256 key


def _b64(obj) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_token_roundtrip_claims_expiry_and_tampering():
    t = tokens.issue(K1, "alice", "user", 60, tenant="rideshare")
    claims = jwt.decode(t, K1, algorithms=["HS256"])   # any JWT library reads it given the secret
    assert set(claims) == {"sub", "role", "iat", "exp", "tenant"} and claims["exp"] - claims["iat"] == 60
    assert tokens.verify(K1, t) == claims
    assert set(jwt.decode(tokens.issue(K1, "admin", "admin", 60), K1, algorithms=["HS256"])) == \
        {"sub", "role", "iat", "exp"}
    with pytest.raises(InvalidToken, match="expired"):
        tokens.verify(K1, tokens.issue(K1, "alice", "user", 60, tenant="rideshare", now=time.time() - 61))
    with pytest.raises(InvalidToken):
        tokens.verify(K2, t)
    head, body, sig = t.split(".")
    now = int(time.time())
    admin_body = _b64({"sub": "alice", "role": "admin", "iat": now, "exp": now + 60})
    bad = [f"{head}.{admin_body}.{sig}", f"{head}.{body}.", f"{head}..{sig}", t + ".x", "", "a" * 5000,
           f"{head}.{body}.{sig[::-1]}", "!!.??.!!", "garbage",
           # alg none, HS512, an RS256 header signed with the secret (algorithm confusion)
           f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{body}.",
           jwt.encode({"sub": "a", "role": "admin", "iat": now, "exp": now + 60}, K1 * 2, algorithm="HS512"),
           _rs256_confusion(K1, {"sub": "a", "role": "admin", "iat": now, "exp": now + 60}),
           # claims missing, or a role this gateway does not know, or a tenant role without a tenant
           jwt.encode({"sub": "a", "role": "admin", "exp": now + 60}, K1, algorithm="HS256"),
           jwt.encode({"sub": "a", "role": "root", "iat": now, "exp": now + 60}, K1, algorithm="HS256"),
           jwt.encode({"sub": "a", "role": "tenant", "iat": now, "exp": now + 60}, K1, algorithm="HS256"),
           jwt.encode({"sub": 5, "role": "admin", "iat": now, "exp": now + 60}, K1, algorithm="HS256")]
    for b in bad:
        with pytest.raises(InvalidToken):
            tokens.verify(K1, b)
    with pytest.raises(ValueError):
        tokens.issue(K1, "acme", "tenant", 60)   # the role tenant names its tenant
    with pytest.raises(ValueError):
        tokens.issue(K1, "admin", "admin", 60, tenant="acme")


def _rs256_confusion(secret: str, claims: dict) -> str:
    signing = f"{_b64({'alg': 'RS256', 'typ': 'JWT'})}.{_b64(claims)}"
    return f"{signing}.{_b64(hmac.new(secret.encode(), signing.encode(), hashlib.sha256).digest())}"


def test_secrets_are_generated_once_with_mode_0600(tmp_path):
    p = tmp_path / "state" / "admin-password"
    a = load_or_create(p)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600 and len(a) >= 16
    assert load_or_create(p) == a
    assert load_or_create(tmp_path / "state" / "other") != a
    assert [f for f in os.listdir(p.parent) if f.startswith(".")] == []  # no temp files left behind


def test_token_service_admin_needs_no_bus_and_remembers_verified_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATUS_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("STRATUS_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("STRATUS_TOKEN_SECRET", raising=False)

    def no_db(cfg):
        raise AssertionError("admin logins must not touch the bus")
    svc = TokenService(load_config(), db_factory=no_db)
    pw = (tmp_path / "admin-password").read_text().strip()
    secret = (tmp_path / "token-secret").read_text().strip()
    assert stat.S_IMODE((tmp_path / "token-secret").stat().st_mode) == 0o600
    g = svc.grant("admin", pw)
    assert g["role"] == "admin" and g["expires_in"] == 3600
    assert jwt.decode(g["token"], secret, algorithms=["HS256"])["sub"] == "admin"
    assert svc.verify(g["token"])["role"] == "admin" and svc.verify(g["token"])["role"] == "admin"
    assert svc.grant("admin", pw.upper() + "x") is None
    # A remembered token still expires.
    short = tokens.issue(secret, "admin", "admin", 1)
    assert svc.verify(short)["role"] == "admin"
    time.sleep(1.1)
    with pytest.raises(InvalidToken, match="expired"):
        svc.verify(short)


class _Reply:
    def __init__(self, result):
        self.result = result


def test_user_check_compares_lowercased_digests_in_rideshare(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATUS_STATE_DIR", str(tmp_path))
    from bus.errors import BadRequest

    class Table:
        rows = {"bob": "ab" * 20, "Bob Smith": "cd" * 20}
        missing = False
        tenants = set()

        def read(self, query, min_lsn=None, primary=False, timeout=None, tenant=None):
            self.tenants.add(tenant)
            if query["table"] == "accounts":
                return _Reply([])
            if self.missing:
                raise BadRequest("unknown table 'users'", code="unknown_table")
            u = query["where"][0][2]
            return _Reply([{"username": u, "password": self.rows[u]}] if u in self.rows else [])

        def write(self, ops, timeout=None, request_id=None, tenant=None):   # accounts' ensure_schema
            self.tenants.add(tenant)
            return _Reply([{}])
    table = Table()
    svc = TokenService(load_config(), db_factory=lambda cfg: table)
    g = svc.grant("bob", "AB" * 20)
    assert g["role"] == "user" and svc.verify(g["token"])["tenant"] == "rideshare"
    assert svc.grant("Bob Smith", "cd" * 20)["role"] == "user"   # not a tenant name: no account lookup
    assert svc.grant("bob", "ab" * 19 + "ac") is None
    assert svc.grant("carol", "ab" * 20) is None
    assert table.tenants == {"rideshare", "platform"}
    table.missing = True
    assert svc.grant("bob", "ab" * 20) is None


def test_bus_errors_are_unavailable_not_refusals(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATUS_STATE_DIR", str(tmp_path))
    from bus.errors import Timeout, Unavailable

    class Down:
        exc = Unavailable("the message bus is not reachable")

        def read(self, *a, **kw):
            raise self.exc
        write = read
    down = Down()
    svc = TokenService(load_config(), db_factory=lambda cfg: down)
    for exc in (Unavailable("down"), Timeout("no reply")):
        down.exc = exc
        for name in ("acme", "Not A Tenant Name"):
            with pytest.raises(ServiceUnavailable):
                svc.grant(name, "pw")


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


# -- routing, access rules and the rate limit ----------------------------------------------
A, D, T, P, L = router.ADMIN, router.DB, router.TENANT, router.PUBLIC, router.LOGS


class Table:
    """The built-in apps' routes as tests publish them (testkit.route_builtins),
    matched by the real longest-prefix rule."""

    def __init__(self, routes):
        self.table = build(routes)

    def match(self, path):
        return match_prefix(self.table, path)


BUILTINS = Table({
    "rideshare.rideshare": {"tenant": "rideshare", "app": "rideshare", "routes": {
        "/api/v1/users": {"role": "users", "service": "users"}, "/api/v1/rides": {"role": "rides", "service": "rides"}}},
    "toystore.toystore": {"tenant": "toystore", "app": "toystore", "routes": {
        "/products": {"role": "catalog", "service": "catalog"}, "/orders": {"role": "order", "service": "order"}}},
    "acme.shop": {"tenant": "acme", "app": "shop", "routes": {
        "/": {"role": "web", "service": "app.acme.shop.web"}}},
})


@pytest.mark.parametrize("path,service,access,owner", [
    ("/api/v1/users", "users", P, "rideshare"), ("/api/v1/users/bob", "users", P, "rideshare"),
    ("/api/v1/rides", "rides", P, "rideshare"), ("/api/v1/rides/7", "rides", P, "rideshare"),
    ("/products/Tux", "catalog", P, "toystore"), ("/orders", "order", P, "toystore"),
    ("/orders/3", "order", P, "toystore"),
    ("/api/v1/db/read", "orchestrator", D, None), ("/api/v1/db/clear", "orchestrator", D, None),
    ("/api/v1/crash/master", "orchestrator", A, None), ("/api/v1/worker/list", "orchestrator", A, None),
    ("/api/v1/cluster", "orchestrator", A, None), ("/api/v1/switchover", "orchestrator", A, None),
    ("/api/v1/tenants", "orchestrator", T, None), ("/api/v1/tenants/acme/apps", "orchestrator", T, None),
    ("/api/v1/developers", "orchestrator", A, None),
    ("/api/v1/logs", "orchestrator", L, None), ("/api/v1/openapi.json", "orchestrator", P, None),
    # acme's app owns "/": whatever no longer prefix covers is its own...
    ("/productsX", "app.acme.shop.web", P, "acme"), ("/", "app.acme.shop.web", P, "acme"),
    ("/apix", "app.acme.shop.web", P, "acme"), ("/healthz", "app.acme.shop.web", P, "acme"),
    ("/dashboardx/y", "app.acme.shop.web", P, "acme"), ("/metricsfoo", "app.acme.shop.web", P, "acme"),
    # ...except the platform's reserved paths (under /api, /dashboard, /health, /metrics, by
    # segment, any case or encoding), which no app but a built-in one under its own path serves.
    ("/api/v1/usersX", None, P, None), ("/api/v1/tenantsX", None, P, None), ("/api/v1/login", None, P, None),
    ("/api/v1/auth/other", None, P, None), ("/api/v1/worker/other", None, P, None), ("/dashboard/", "dashboard", P, None),
    ("/health/x", None, P, None), ("/api/v1/openapi.json/x", None, P, None), ("/api", None, P, None),
    ("/API/v1/users", None, P, None), ("/Api/", None, P, None), ("/HEALTH", None, P, None),
    ("/Dashboard/x", None, P, None), ("/metrics/", None, P, None), ("//health", None, P, None),
    ("//api/v1/users", None, P, None), ("/%61pi/v1/tenants", None, P, None), ("/%2Fmetrics", None, P, None),
    ("/api/v1/users//x", "users", P, "rideshare"), ("/api/v1/rides/", "rides", P, "rideshare"),
])
def test_routes(path, service, access, owner):
    r = router.route(path, BUILTINS)
    assert (r.service, r.access, r.owner) == (service, access, owner)


def test_without_app_routes_only_the_platform_answers():
    for path in ("/api/v1/users", "/products/Tux", "/orders", "/", "/shop"):
        assert router.route(path) is router.NOT_FOUND
        assert router.route(path, Table({})) is router.NOT_FOUND
    assert router.route("/api/v1/cluster").service == "orchestrator"
    app = router.route("/api/v1/users/bob", BUILTINS)
    assert (app.name, app.app) == ("users", "rideshare") and app is router.route("/api/v1/users", BUILTINS)


def _claims(role, tenant=None):
    c = {"sub": tenant or role, "role": role, "iat": 0, "exp": 1}
    return c if tenant is None else {**c, "tenant": tenant}


WHO = {None: None, "admin": _claims("admin"), "developer": _claims("developer"),
       "acme": _claims("tenant", "acme"), "beta": _claims("tenant", "beta"), "user": _claims("user", "acme")}


@pytest.mark.parametrize("path,allowed", [
    ("/api/v1/tenants", {"admin"}),
    ("/api/v1/tenants/acme", {"admin"}),                # DELETE a tenant: the admin's alone
    ("/api/v1/tenants/acme/", {"admin"}),
    ("/api/v1/tenants/acme//", {"admin"}),
    ("/api/v1/tenants//acme/apps", {"admin"}),
    ("/api/v1/tenants/acme/apps", {"admin", "acme", "developer"}),
    ("/api/v1/tenants/%61cme/apps/shop", {"admin", "acme", "developer"}),
    ("/api/v1/tenants/beta/apps", {"admin", "beta", "developer"}),
    ("/api/v1/tenants/beta/apps/shop/roles/web", {"admin", "beta", "developer"}),
    ("/api/v1/tenants/beta/apps//x", {"admin", "beta"}),
    ("/api/v1/tenants/beta/events", {"admin", "beta", "developer"}),
    ("/api/v1/tenants/beta/events/", {"admin", "beta", "developer"}),
    ("/api/v1/tenants/beta/eventsX", {"admin", "beta"}),
    ("/api/v1/tenants/beta/other", {"admin", "beta"}),
    ("/api/v1/developers", {"admin"}),
    ("/api/v1/db/read", {"admin", "acme", "beta"}),     # the orchestrator keeps a tenant inside its own
    ("/api/v1/db/clear", {"admin", "acme", "beta"}),
    ("/api/v1/logs", {"admin", "developer", "acme", "beta"}),   # the orchestrator filters an owner's
    ("/api/v1/cluster", {"admin", "developer"}), ("/api/v1/worker/list", {"admin", "developer"}),
    ("/api/v1/crash/master", {"admin"}), ("/api/v1/switchover", {"admin"}),
    ("/api/v1/openapi.json", {None, "admin", "developer", "acme", "beta", "user"}),
    ("/api/v1/users", {None, "admin", "developer", "acme", "beta", "user"}),
    ("/products/Tux", {None, "admin", "developer", "acme", "beta", "user"}),
])
def test_access_rules(path, allowed):
    r = router.route(path, BUILTINS)
    for method in ("GET", "HEAD"):
        for name, claims in WHO.items():
            expected = None if name in allowed else (401 if claims is None else 403)
            assert router.refusal(r, path, claims, method) == expected, (path, method, name)


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_a_developer_changes_nothing(method):
    dev = WHO["developer"]
    for path in ("/api/v1/tenants/acme/apps/shop", "/api/v1/tenants/acme/apps/shop/restart",
                 "/api/v1/tenants/acme/events", "/api/v1/logs", "/api/v1/cluster", "/api/v1/worker/list",
                 "/api/v1/tenants", "/api/v1/developers", "/api/v1/switchover", "/api/v1/db/write"):
        assert router.refusal(router.route(path), path, dev, method) == 403, (method, path)
    # The same methods stay open to those who had them.
    assert router.refusal(router.route("/api/v1/tenants/acme/apps/shop"), "/api/v1/tenants/acme/apps/shop",
                          WHO["acme"], method) is None
    assert router.refusal(router.route("/api/v1/cluster"), "/api/v1/cluster", WHO["admin"], method) is None


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_token_bucket_rate_burst_and_retry_after():
    clock = Clock()
    rl = RateLimiter(rate=2, burst=4, clock=clock)
    assert [rl.admit(["acme"]) for _ in range(4)] == [None] * 4     # the burst
    tenant, wait = rl.admit(["acme"])
    assert tenant == "acme" and wait == pytest.approx(0.5) and retry_after(wait) == 1
    assert rl.admit(["beta"]) is None                                # another tenant: its own bucket
    clock.t += 0.5
    assert rl.admit(["acme"]) is None and rl.admit(["acme"]) is not None
    clock.t += 100                                                   # refills up to the burst, no further
    assert [rl.admit(["acme"]) for _ in range(5)].count(None) == 4
    assert retry_after(2.01) == 3 and retry_after(0.0001) == 1
    slow = RateLimiter(rate=0.1, burst=1, clock=clock)
    assert slow.admit(["x"]) is None and retry_after(slow.admit(["x"])[1]) == 10


def test_rate_limit_counts_each_tenant_once_and_refunds_a_refusal():
    clock = Clock()
    rl = RateLimiter(rate=1, burst=2, clock=clock)
    assert rl.admit(["acme", "acme"]) is None and rl.admit(["acme"]) is None   # counted once each
    assert rl.admit(["acme"])[0] == "acme"
    # beta's token is given back when acme refuses the request, so beta's bucket stays full.
    assert rl.admit(["beta", "acme"])[0] == "acme"
    assert rl.admit(["beta"]) is None and rl.admit(["beta"]) is None and rl.admit(["beta"])[0] == "beta"


def test_builtin_tenants_have_no_limit_unless_set():
    clock = Clock()
    rl = RateLimiter(rate=1, burst=1, clock=clock)
    assert all(rl.admit(["rideshare", "toystore"]) is None for _ in range(1000))
    assert rl.admit(["acme"]) is None and rl.admit(["acme"]) is not None
    rl = RateLimiter(rate=1, burst=1, builtin_rate=5, clock=clock)   # burst: twice the rate
    assert [rl.admit(["rideshare"]) for _ in range(11)].count(None) == 10
    assert all(RateLimiter(rate=0, burst=0, clock=clock).admit(["acme"]) is None for _ in range(1000))
    for bad in (dict(rate=-1, burst=1), dict(rate=float("nan"), burst=1), dict(rate=1, burst=0.5),
                dict(rate=1, burst=1, builtin_rate=float("inf"))):
        with pytest.raises(ValueError):
            RateLimiter(**bad)


def test_buckets_do_not_share_a_lock():
    rl = RateLimiter(rate=1, burst=1)
    rl.admit(["acme"])
    held = rl._bucket("acme").lock
    with held:   # acme's bucket busy: beta's requests go on
        done = threading.Event()
        threading.Thread(target=lambda: (rl.admit(["beta"]), done.set()), daemon=True).start()
        assert done.wait(5)


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


def test_affinity_moves_only_when_its_instance_goes_and_stays_moved():
    pool = ServicePool("svc", load_config(health_interval=3600))
    pool._on_change({f"i{n}": {"host": "127.0.0.1", "port": 3000 + n} for n in range(2)})
    keys = [f"c:{n}" for n in range(20)]
    pinned = {k: pool.pick(affinity_key=k).key for k in keys}
    assert set(pinned.values()) == {"i0", "i1"}          # new keys are spread
    for _ in range(5):
        assert {k: pool.pick(affinity_key=k).key for k in keys} == pinned
    # i0's znode goes: its keys move to i1, and stay there when i0 comes back.
    pool._on_change({"i1": {"host": "127.0.0.1", "port": 3001}})
    assert {pool.pick(affinity_key=k).key for k in keys} == {"i1"}
    pool._on_change({f"i{n}": {"host": "127.0.0.1", "port": 3000 + n} for n in range(2)})
    assert {pool.pick(affinity_key=k).key for k in keys} == {"i1"}
    # pin() moves a key explicitly (the gateway does so when a retry answered elsewhere).
    pool.pin("c:0", pool.instances["i0"])
    assert pool.pick(affinity_key="c:0").key == "i0"
    pool.close()


def test_pools_no_route_names_are_closed_once_idle():
    ups = Upstreams(load_config(health_interval=3600), fallbacks={"orchestrator": ("127.0.0.1", 1)})
    ups.pool("orchestrator")
    ups.want({"a", "b"})
    assert [n for n, _ in ups.snapshot()] == ["a", "b", "orchestrator"]   # made before any request
    busy = ups.acquire("a")
    idle = ups.pool("b")
    ups.want({"c"})                                       # a and b are no route's any more
    assert idle.closed and not busy.closed                # b at once; a is still serving a request
    assert sorted(n for n, _ in ups.snapshot()) == ["a", "c", "orchestrator"]
    ups.release(busy)
    assert busy.closed and sorted(n for n, _ in ups.snapshot()) == ["c", "orchestrator"]
    # A request that matched just before the change still gets a pool, closed when it ends.
    late = ups.acquire("a")
    assert not late.closed and late is not busy
    ups.release(late)
    assert late.closed
    ups.want(set())
    assert [n for n, _ in ups.snapshot()] == ["orchestrator"]   # the platform's pool stays
    ups.close()


def test_strip_hop_by_hop():
    h = [("Connection", "close, X-Secret"), ("X-Secret", "1"), ("Keep-Alive", "5"), ("Transfer-Encoding", "x"),
         ("Upgrade", "h2c"), ("Content-Type", "a"), ("TE", "trailers"), ("Proxy-Authorization", "p")]
    assert strip_hop_by_hop(h) == [("Content-Type", "a")]


def test_metrics_text():
    m = Metrics()
    m.observe("users", "GET", 200, 0.003, "rideshare", "rideshare")
    m.observe("users", "GET", 200, 20.0, "rideshare", "rideshare")
    m.observe("admin", "POST", 403, 0.001)
    m.upstream_error("users", "connect")
    m.gauge("stratus_gateway_threads", "t", lambda: [({"state": "busy"}, 2)])
    m.counter("stratus_gateway_cache_events", "c", lambda: [({"event": "hits"}, 5)])
    m.gauge("broken", "b", lambda: 1 / 0)
    text = m.render().decode()
    got = bmetrics.parse(text)   # valid Prometheus text, or it raises
    users = {"route": "users", "tenant": "rideshare", "app": "rideshare"}
    assert bmetrics.value(got, "stratus_gateway_requests_total", method="GET", status=200, **users) == 2
    assert bmetrics.value(got, "stratus_gateway_requests_total", route="admin", method="POST", status=403,
                          tenant="", app="") == 1
    assert bmetrics.value(got, "stratus_gateway_request_duration_seconds_bucket", le="0.005", **users) == 1
    assert bmetrics.value(got, "stratus_gateway_request_duration_seconds_bucket", le="+Inf", **users) == 2
    assert bmetrics.value(got, "stratus_gateway_request_duration_seconds_count", **users) == 2
    assert abs(bmetrics.value(got, "stratus_gateway_request_duration_seconds_sum", **users) - 20.003) < 1e-9
    assert bmetrics.value(got, "stratus_gateway_upstream_errors_total", route="users", kind="connect") == 1
    assert bmetrics.value(got, "stratus_gateway_threads", state="busy") == 2
    assert bmetrics.value(got, "stratus_gateway_cache_events_total", event="hits") == 5
    assert "# TYPE stratus_gateway_cache_events_total counter" in text
    assert bmetrics.value(got, "broken") is None    # a failing gauge is left out, /metrics still answers
    assert bmetrics.value(got, "process_cpu_seconds_total") is not None
    assert "_created" not in text


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
    got = bmetrics.parse(m.render())
    series = [k for k in got if k[0] == "stratus_gateway_requests_total"]
    assert len(series) == 1
    assert bmetrics.value(got, "stratus_gateway_requests_total", method="OTHER", status=404) == 1000
