"""The gateway's metrics, through prometheus_client (bus/metrics.py), served
on the gateway's own port at GET /metrics.

Per request (Metrics.observe, on the request's thread):
  stratus_gateway_requests_total{route,method,status,tenant,app}   counter
  stratus_gateway_request_duration_seconds{route,tenant,app}       histogram
      route: the route's name (an app's web role, or the platform's:
      admin, tenants, logs, auth, health, metrics, unknown...); tenant and
      app: the app that owns the route ("" for the platform's own routes).
      method: one of METHODS, or OTHER (clients choose methods: the label
      set stays bounded). Duration: from a complete request to its answer.
Events:
  stratus_gateway_upstream_errors_total{route,kind}   failures reaching an instance
  stratus_gateway_upstream_retries_total{route}       requests retried on another instance
  stratus_gateway_throttled_total{tenant}             429s of a tenant's rate limit
  stratus_gateway_rejected_connections_total          503s: pool and queue full
  stratus_gateway_connections_total                   client connections accepted
  stratus_gateway_bad_requests_total{status}          refused while being read (400, 408, 413, 431...)
Read at scrape time (Metrics.gauge / Metrics.counter; registered by the
gateway and its server): upstream instances and outstanding requests per
service, idle pooled connections, cache, LSN clients, threads, queue, open
connections.

Label children are cached in plain dicts, so a request costs two dict
lookups and two increments (about 1.3 us), not prometheus_client's labels()."""
from __future__ import annotations

from prometheus_client import Counter, Histogram

from bus import metrics as bmetrics

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
BUCKETS = bmetrics.BUCKETS


class Metrics:
    def __init__(self, registry=None):
        self.registry = registry if registry is not None else bmetrics.registry()
        r = self.registry
        self._requests = Counter("stratus_gateway_requests", "Requests answered, by route, method, status and "
                                 "the route's tenant and app.", ["route", "method", "status", "tenant", "app"],
                                 registry=r)
        self._duration = Histogram("stratus_gateway_request_duration_seconds",
                                   "Time from a complete request to the answer sent, by route.",
                                   ["route", "tenant", "app"], buckets=BUCKETS, registry=r)
        self._upstream_errors = Counter("stratus_gateway_upstream_errors", "Upstream failures, by route and kind.",
                                        ["route", "kind"], registry=r)
        self._retries = Counter("stratus_gateway_upstream_retries", "Requests retried on another instance.",
                                ["route"], registry=r)
        self._throttled = Counter("stratus_gateway_throttled", "Requests refused 429 by a tenant's rate limit.",
                                  ["tenant"], registry=r)
        self._rejected = Counter("stratus_gateway_rejected_connections",
                                 "Connections answered 503 because the pool and queue were full.", registry=r)
        self._connections = Counter("stratus_gateway_connections", "Client connections accepted.", registry=r)
        self._bad = Counter("stratus_gateway_bad_requests",
                            "Requests refused while being read (malformed, too large, too slow).", ["status"],
                            registry=r)
        self._callbacks = bmetrics.Callbacks()
        r.register(self._callbacks)
        # label values -> child: dict reads are safe under the GIL; a miss
        # makes the child through labels(), which locks.
        self._req_children: dict[tuple, object] = {}
        self._dur_children: dict[tuple, object] = {}

    # -- the hot path -------------------------------------------------------------------
    def observe(self, route: str, method: str, status: int, seconds: float, tenant: str = "", app: str = "") -> None:
        key = (route, method, status, tenant, app)
        c = self._req_children.get(key)
        if c is None:
            if method not in METHODS:
                key = (route, "OTHER", status, tenant, app)
                c = self._req_children.get(key)
            if c is None:
                c = self._req_children[key] = self._requests.labels(route, key[1], str(status), tenant, app)
        c.inc()
        hkey = (route, tenant, app)
        h = self._dur_children.get(hkey)
        if h is None:
            h = self._dur_children[hkey] = self._duration.labels(route, tenant, app)
        h.observe(seconds)

    def upstream_error(self, route: str, kind: str) -> None:
        self._upstream_errors.labels(route, kind).inc()

    def throttled(self, tenant: str) -> None:
        self._throttled.labels(tenant).inc()

    def retry(self, route: str) -> None:
        self._retries.labels(route).inc()

    def rejected(self) -> None:
        self._rejected.inc()

    def bad_request(self, status: int) -> None:
        self._bad.labels(str(status)).inc()

    def connection(self) -> None:
        self._connections.inc()

    # -- read at scrape time ----------------------------------------------------------------
    def gauge(self, name: str, help_: str, fn) -> None:
        """A gauge whose samples fn() returns as [(labels dict, value)] when scraped."""
        self._callbacks.gauge(name, help_, fn)

    def counter(self, name: str, help_: str, fn) -> None:
        """A counter (exposed as name_total) read from fn() when scraped."""
        self._callbacks.counter(name, help_, fn)

    def render(self) -> bytes:
        return bmetrics.render(self.registry)
