"""The gateway's request handling: routing, access rules, tokens, the
per-tenant rate limit, read-your-writes, the product cache and forwarding.
The socket side lives in server.py; this module turns one parsed request into
one answer.

Identity upstream: the gateway removes any X-Stratus-Role, X-Stratus-Subject
and X-Stratus-Tenant a client sent, on every route, and sets them itself for
a request with a valid token: the token's role, its subject (percent-encoded
UTF-8; account and tenant names never change) and, for the roles tenant and
user, its tenant. The orchestrator relies on them for the db routes."""
from __future__ import annotations

import itertools
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

from bus.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from bus.names import Paths
from bus.routing import RouteTable

from . import router
from .balancer import Upstreams, parse_base_url
from .cache import Entry, InvalidationListener, ProductCache
from .config import GatewayConfig
from .http11 import Request, json_body
from .lsn import LSNTracker, parse_lsn
from .metrics import Metrics
from .proxy import forward, strip_hop_by_hop
from .ratelimit import RateLimiter, retry_after
from .tokens import InvalidToken, ServiceUnavailable, TokenService

log = logging.getLogger("stratus.gateway")
access = logging.getLogger("stratus.gateway.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Generated request ids: a random prefix per gateway process and a counter.
# Unique, which is all a log correlation id needs, and unlike uuid4 it costs
# no getrandom() call (a GIL hand-over under load) per request.
_RID_PREFIX = os.urandom(8).hex()
_RID_SEQ = itertools.count(1)
PLATFORM = "orchestrator"     # the service behind the platform's own routes
AFFINITY_COOKIE = "stratus_affinity"
_COOKIE_VALUE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
# New affinity cookies: like request ids, a random prefix per process and a
# counter (unique, and no getrandom() per request; a cookie only ever picks
# an instance for whoever sends it, so it needs no secrecy).
_COOKIE_PREFIX = os.urandom(9).hex()
_COOKIE_SEQ = itertools.count(1)
# Headers the gateway sets itself on the way up.
_DROP_UP = frozenset({"content-length", "x-request-id", "x-stratus-min-lsn", "expect", "x-forwarded-for",
                      "x-forwarded-proto", "x-forwarded-host", "x-stratus-role", "x-stratus-subject",
                      "x-stratus-tenant"})


@dataclass
class ClientConn:
    """What the gateway knows about one client connection."""
    ip: str
    port: int
    lsn: int = 0             # the highest LSN returned on this connection
    base_lsn: int = 0        # the address's LSN when the connection opened
    opened: float = field(default_factory=time.monotonic)


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    route: str
    upstream: str = "-"
    close: bool = False
    tenant: str = ""         # the tenant and app owning the route ("" for the platform's): metrics labels
    app: str = ""


def _error(status: int, message: str, route: str, **kw) -> Answer:
    return Answer(status, [("Content-Type", "application/json")], json_body({"error": message}), route, **kw)


class Gateway:
    def __init__(self, cfg: GatewayConfig, *, zk=None, routes=None, listen_for_invalidations: bool = True):
        self.cfg = cfg
        self.metrics = Metrics()
        self.tokens = TokenService(cfg)  # first: generates the secrets, or stops the start cleanly
        self.limiter = RateLimiter(cfg.tenant_rate, cfg.tenant_burst, cfg.builtin_rate)
        self.upstreams = Upstreams(cfg, zk, fallbacks={
            PLATFORM: parse_base_url(cfg.base.orchestrator_base_url())}, keep=(router.DASHBOARD_SERVICE,))
        self.upstreams.pool(PLATFORM)
        self.routes = routes
        if self.routes is None and zk is not None:
            self.routes = RouteTable(zk, Paths(cfg.base.cluster), on_change=self._routes_changed)
        if self.routes is not None:
            self._routes_changed(self.routes.table)
        if zk is not None:  # a running gateway: open the bus connection for logins now, not on the first one
            threading.Thread(target=self._warm_bus, name="auth-bus", daemon=True).start()
        self.lsns = LSNTracker(cfg.lsn_clients, cfg.lsn_ttl)
        self.cache = ProductCache(cfg.cache_size, cfg.cache_enabled)
        self.invalidations = None
        if self.cache.enabled and listen_for_invalidations:
            self.invalidations = InvalidationListener(self.cache, cfg.base)
        self.started = time.time()
        self.server = None  # set by the server, for saturation gauges
        m = self.metrics
        m.gauge("stratus_gateway_upstream_instances", "Registered instances per service and health.",
                self._instances_gauge)
        m.gauge("stratus_gateway_upstream_outstanding", "Requests in flight per service.", self._outstanding_gauge)
        m.gauge("stratus_gateway_upstream_idle_connections", "Pooled keep-alive connections per service.",
                self._idle_gauge)
        m.counter("stratus_gateway_cache_events", "Product cache hits, misses, LSN bypasses, invalidations.",
                  lambda: [({"event": k}, getattr(self.cache, k)) for k in ("hits", "misses", "bypasses", "invalidations")])
        m.gauge("stratus_gateway_cache_entries", "Products in the cache.", lambda: [({}, len(self.cache))])
        m.gauge("stratus_gateway_lsn_clients", "Clients whose last LSN is remembered.", lambda: [({}, len(self.lsns))])

    def _warm_bus(self) -> None:
        try:
            self.tokens.db()
        except Exception as exc:  # the client reconnects on its own; logins report 503 meanwhile
            log.warning("bus client for logins not ready: %s", exc)

    def _routes_changed(self, table) -> None:
        self.upstreams.want({e.service for e in table.values()})

    # -- gauges ------------------------------------------------------------------------------
    def _instances_gauge(self):
        out = []
        for name, pool in self.upstreams.snapshot():
            members = list(pool.instances.values())
            out.append(({"service": name, "state": "healthy"}, sum(1 for i in members if i.healthy)))
            out.append(({"service": name, "state": "unhealthy"}, sum(1 for i in members if not i.healthy)))
        return out

    def _outstanding_gauge(self):
        return [({"service": n}, sum(i.outstanding for i in p.instances.values()))
                for n, p in self.upstreams.snapshot()]

    def _idle_gauge(self):
        return [({"service": n}, sum(i.idle_count() for i in p.instances.values()))
                for n, p in self.upstreams.snapshot()]

    def close(self) -> None:
        if isinstance(self.routes, RouteTable):
            self.routes.close()
        if self.invalidations is not None:
            self.invalidations.close()
        self.upstreams.close()
        self.tokens.close()

    # -- one request ---------------------------------------------------------------------
    def handle(self, req: Request, conn: ClientConn) -> tuple[Answer, str]:
        """The answer to `req` and its request id. Logs and counts it."""
        t0 = time.perf_counter()
        rid = req.h.get("x-request-id", "")
        if not _REQUEST_ID.match(rid):
            rid = f"{_RID_PREFIX}{next(_RID_SEQ):08x}"
        try:
            ans = self._dispatch(req, conn, rid)
        except Exception:
            log.exception("[%s] %s %s failed inside the gateway", rid, req.method, req.target)
            ans = _error(500, "internal gateway error", "error", close=True)
        ans.headers.append(("X-Request-Id", rid))
        elapsed = time.perf_counter() - t0
        self.metrics.observe(ans.route, req.method, ans.status, elapsed, ans.tenant, ans.app)
        if self.cfg.access_log:
            access.info("%s:%d %s %s %d %.1fms upstream=%s rid=%s", conn.ip, conn.port, req.method, req.target,
                        ans.status, elapsed * 1000, ans.upstream, rid)
        return ans, rid

    def _bearer(self, req: Request) -> tuple[str | None, dict | None, str | None]:
        """(token, claims, problem): claims is None when no valid token was sent."""
        auth = req.h.get("authorization")
        if not auth:
            return None, None, "missing bearer token"
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None, None, "Authorization must be 'Bearer <token>'"
        try:
            return token, self.tokens.verify(token), None
        except InvalidToken as exc:
            return token, None, str(exc)

    def _dispatch(self, req: Request, conn: ClientConn, rid: str) -> Answer:
        path = req.path
        try:
            router.check_path(path)
        except router.BadPath as exc:
            return _error(400, str(exc), "unknown")
        r = router.route(path, self.routes)
        ans = self._answer(req, conn, rid, path, r)
        if r.owner is not None:
            ans.tenant, ans.app = r.owner, r.app or ""
        return ans

    def _answer(self, req: Request, conn: ClientConn, rid: str, path: str, r: router.Route) -> Answer:
        if r is router.HEALTH:
            if req.method not in ("GET", "HEAD"):
                return _error(405, "method not allowed", r.name)
            return self._health(r.name)
        if r is router.METRICS:
            if req.method not in ("GET", "HEAD"):
                return _error(405, "method not allowed", r.name)
            return Answer(200, [("Content-Type", METRICS_CONTENT_TYPE)], self.metrics.render(), r.name)

        token, claims, problem = self._bearer(req)
        tenant = claims.get("tenant") if claims is not None else None
        if r.owner or tenant:
            over = self.limiter.admit((t for t in (r.owner, tenant) if t))
            if over is not None:
                self.metrics.throttled(over[0])
                return Answer(429, [("Content-Type", "application/json"), ("Retry-After", str(retry_after(over[1])))],
                              json_body({"error": f"too many requests for tenant {over[0]}; retry later"}), r.name)
        if r is router.NOT_FOUND:
            return _error(404, "not found: no route serves this path", r.name)
        refused = router.refusal(r, path, claims, req.method)
        if refused == 401:
            return Answer(401, [("Content-Type", "application/json"), ("WWW-Authenticate", 'Bearer realm="stratus"')],
                          json_body({"error": f"unauthorized: {problem}"}), r.name)
        if refused == 403:
            return _error(403, f"forbidden: the role {claims['role']} may not use this route", r.name)

        # Read-your-writes: the highest LSN this client has been given.
        # Known by token when there is one; else by this connection, which
        # starts from what its address had been given when it opened (so a
        # client that opens a connection per request still reads its writes).
        key = f"t:{token.rpartition('.')[2]}" if claims is not None else f"a:{conn.ip}"  # the signature: short, unique
        client_lsn = max(conn.lsn, parse_lsn(req.h.get("x-stratus-min-lsn")),
                         self.lsns.get(key) if claims is not None else conn.base_lsn)

        if r is router.TOKEN:
            return self._grant(req, r.name, client_lsn)

        # The product cache.
        product = None
        if r.owner == "toystore" and r.name == "catalog" and req.method == "GET" and "?" not in req.target \
                and path.startswith("/products/") and self.cache.usable():
            parts = path.split("/")
            if len(parts) == 3 and parts[2]:
                product = unquote(parts[2])
                entry = self.cache.get(product, client_lsn)
                if entry is not None:
                    return Answer(entry.status, list(entry.headers) + [("X-Cache", "HIT")], entry.body, r.name,
                                  upstream="cache")
        epoch = self.cache.epoch()

        headers = strip_hop_by_hop(req.headers, _DROP_UP)
        if "host" not in req.h:
            headers.append(("Host", "stratus-gateway"))
        xff = req.h.get("x-forwarded-for")
        headers.append(("X-Forwarded-For", f"{xff}, {conn.ip}" if xff else conn.ip))
        headers.append(("X-Forwarded-Proto", "http"))
        headers.append(("X-Request-Id", rid))
        if client_lsn > 0:
            headers.append(("X-Stratus-Min-LSN", str(client_lsn)))
        if claims is not None:
            headers.append(("X-Stratus-Role", claims["role"]))
            headers.append(("X-Stratus-Subject", quote(claims["sub"], safe="@.-_~")))
            if tenant:
                headers.append(("X-Stratus-Tenant", tenant))

        affinity = set_cookie = None
        if self.cfg.affinity and r.app is not None:
            if claims is not None:
                affinity = key
            else:
                cookie = _cookie(req.h.get("cookie", ""), AFFINITY_COOKIE)
                if cookie is not None and _COOKIE_VALUE.match(cookie):
                    affinity = f"c:{cookie}"
                else:
                    cookie = f"{_COOKIE_PREFIX}{next(_COOKIE_SEQ):010x}"
                    affinity = f"c:{cookie}"
                    set_cookie = f"{AFFINITY_COOKIE}={cookie}; Path=/; HttpOnly; SameSite=Lax"
        pool = self.upstreams.acquire(r.service)
        try:
            up = forward(pool, self.cfg, req.method, req.target, headers, req.body, affinity_key=affinity,
                         on_retry=lambda: self.metrics.retry(r.name),
                         on_error=lambda kind: self.metrics.upstream_error(r.name, kind))
        finally:
            self.upstreams.release(pool)
        upstream = up.instance.addr if up.instance else "-"
        if affinity is not None and up.instance is not None and not up.error and up.attempts > 1:
            pool.pin(affinity, up.instance)   # a retry answered elsewhere: stay there
        if up.error:
            ans = _error(up.status, up.error, r.name, upstream=upstream)
            if set_cookie:
                ans.headers.append(("Set-Cookie", set_cookie))
            return ans

        lsn = 0
        for k, v in up.headers:
            if k.lower() == "x-stratus-lsn":
                lsn = max(lsn, parse_lsn(v))
        if lsn:
            conn.lsn = max(conn.lsn, lsn)
            self.lsns.observe(key, lsn)
        out_headers = [(k, v) for k, v in up.headers if k.lower() != "x-request-id"]
        if product is not None and up.status == 200:
            self.cache.put(product, Entry(200, out_headers, up.body, max(lsn, client_lsn)), epoch)
            out_headers = out_headers + [("X-Cache", "MISS")]
        if set_cookie:   # after the cache took its copy: the cookie is this client's alone
            out_headers = out_headers + [("Set-Cookie", set_cookie)]
        return Answer(up.status, out_headers, up.body, r.name, upstream=upstream)

    def _health(self, route: str) -> Answer:
        services = {}
        for name, pool in self.upstreams.snapshot():
            members = list(pool.instances.values())
            services[name] = {"instances": len(members), "healthy": sum(1 for i in members if i.healthy)}
        body = {"status": "ok", "service": "gateway", "uptime": round(time.time() - self.started, 1),
                "upstreams": services, "cache": {"enabled": self.cache.enabled, "feed": self.cache.feed_ok,
                                                  "entries": len(self.cache)}}
        return Answer(200, [("Content-Type", "application/json")], json_body(body), route)

    def _grant(self, req: Request, route: str, client_lsn: int) -> Answer:
        if req.method != "POST":
            return Answer(405, [("Content-Type", "application/json"), ("Allow", "POST")],
                          json_body({"error": "method not allowed"}), route)
        try:
            data = json.loads(req.body.decode("utf-8")) if req.body else None
        except (ValueError, UnicodeDecodeError):
            return _error(400, "body is not valid JSON", route)
        if not isinstance(data, dict):
            return _error(400, "body must be a JSON object with username and password", route)
        username, password = data.get("username"), data.get("password")
        if not isinstance(username, str) or not isinstance(password, str) or not username or not password:
            return _error(400, "username and password must be non-empty strings", route)
        if len(username) > 256 or len(password) > 1024:
            return _error(400, "username or password too long", route)
        try:
            granted = self.tokens.grant(username, password, min_lsn=client_lsn)
        except ServiceUnavailable as exc:
            log.warning("token grant for %r: users table unreachable: %s", username, exc)
            return _error(503, "credentials cannot be checked now; try again", route)
        if granted is None:
            return Answer(401, [("Content-Type", "application/json"), ("WWW-Authenticate", 'Bearer realm="stratus"')],
                          json_body({"error": "invalid username or password"}), route)
        return Answer(200, [("Content-Type", "application/json"), ("Cache-Control", "no-store")],
                      json_body(granted), route)


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        k, _, v = part.strip().partition("=")
        if k == name and v:
            return v
    return None
