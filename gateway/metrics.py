"""Prometheus text metrics: requests, latency histograms, upstream errors
and saturation, per route."""
from __future__ import annotations

import threading
from collections import defaultdict

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _labels(**kw) -> str:
    def esc(v) -> str:
        return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in kw.items()) + "}"


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple, int] = defaultdict(int)            # (route, method, status)
        self.hist: dict[str, list[int]] = {}                            # route -> bucket counts (+Inf last)
        self.hist_sum: dict[str, float] = defaultdict(float)
        self.upstream_errors: dict[tuple, int] = defaultdict(int)     # (route, kind)
        self.throttled_requests: dict[str, int] = defaultdict(int)    # tenant -> requests refused 429
        self.retries: dict[str, int] = defaultdict(int)
        self.rejected_connections = 0
        self.bad_requests: dict[int, int] = defaultdict(int)
        self.connections_total = 0
        self.gauges = {}   # name -> callable returning [(labels dict, value)]

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        if method not in METHODS:
            method = "OTHER"  # clients choose methods: keep the label set bounded
        with self._lock:
            self.requests[(route, method, status)] += 1
            counts = self.hist.get(route)
            if counts is None:
                counts = self.hist[route] = [0] * (len(BUCKETS) + 1)
            for i, b in enumerate(BUCKETS):
                if seconds <= b:
                    counts[i] += 1
                    break
            else:
                counts[-1] += 1
            self.hist_sum[route] += seconds

    def upstream_error(self, route: str, kind: str) -> None:
        with self._lock:
            self.upstream_errors[(route, kind)] += 1

    def throttled(self, tenant: str) -> None:
        with self._lock:
            self.throttled_requests[tenant] += 1

    def retry(self, route: str) -> None:
        with self._lock:
            self.retries[route] += 1

    def rejected(self) -> None:
        with self._lock:
            self.rejected_connections += 1

    def bad_request(self, status: int) -> None:
        with self._lock:
            self.bad_requests[status] += 1

    def connection(self) -> None:
        with self._lock:
            self.connections_total += 1

    def gauge(self, name: str, help_: str, fn) -> None:
        self.gauges[name] = (help_, fn)

    def render(self) -> str:
        out: list[str] = []
        with self._lock:
            requests = dict(self.requests)
            hist = {k: list(v) for k, v in self.hist.items()}
            sums = dict(self.hist_sum)
            errors = dict(self.upstream_errors)
            retries = dict(self.retries)
            throttled = dict(self.throttled_requests)
            rejected = self.rejected_connections
            bad = dict(self.bad_requests)
            conns = self.connections_total
        out += ["# HELP stratus_gateway_requests_total Requests answered, by route, method and status.",
                "# TYPE stratus_gateway_requests_total counter"]
        for (route, method, status), n in sorted(requests.items()):
            out.append(f"stratus_gateway_requests_total{_labels(route=route, method=method, status=status)} {n}")
        out += ["# HELP stratus_gateway_request_duration_seconds Time from a complete request to the answer sent.",
                "# TYPE stratus_gateway_request_duration_seconds histogram"]
        for route, counts in sorted(hist.items()):
            acc = 0
            for b, c in zip(BUCKETS, counts):
                acc += c
                out.append(f"stratus_gateway_request_duration_seconds_bucket{_labels(route=route, le=b)} {acc}")
            acc += counts[-1]
            out.append(f"stratus_gateway_request_duration_seconds_bucket{_labels(route=route, le='+Inf')} {acc}")
            out.append(f"stratus_gateway_request_duration_seconds_sum{_labels(route=route)} {sums.get(route, 0.0):.6f}")
            out.append(f"stratus_gateway_request_duration_seconds_count{_labels(route=route)} {acc}")
        out += ["# HELP stratus_gateway_upstream_errors_total Upstream failures, by route and kind.",
                "# TYPE stratus_gateway_upstream_errors_total counter"]
        for (route, kind), n in sorted(errors.items()):
            out.append(f"stratus_gateway_upstream_errors_total{_labels(route=route, kind=kind)} {n}")
        out += ["# HELP stratus_gateway_upstream_retries_total Requests retried on another instance.",
                "# TYPE stratus_gateway_upstream_retries_total counter"]
        for route, n in sorted(retries.items()):
            out.append(f"stratus_gateway_upstream_retries_total{_labels(route=route)} {n}")
        out += ["# HELP stratus_gateway_throttled_total Requests refused 429 by a tenant's rate limit.",
                "# TYPE stratus_gateway_throttled_total counter"]
        for tenant, n in sorted(throttled.items()):
            out.append(f"stratus_gateway_throttled_total{_labels(tenant=tenant)} {n}")
        out += ["# HELP stratus_gateway_rejected_connections_total Connections answered 503 because the pool and queue were full.",
                "# TYPE stratus_gateway_rejected_connections_total counter",
                f"stratus_gateway_rejected_connections_total {rejected}",
                "# HELP stratus_gateway_connections_total Client connections accepted.",
                "# TYPE stratus_gateway_connections_total counter",
                f"stratus_gateway_connections_total {conns}",
                "# HELP stratus_gateway_bad_requests_total Requests refused while being read (malformed, too large, too slow).",
                "# TYPE stratus_gateway_bad_requests_total counter"]
        for status, n in sorted(bad.items()):
            out.append(f"stratus_gateway_bad_requests_total{_labels(status=status)} {n}")
        for name, (help_, fn) in sorted(self.gauges.items()):
            out += [f"# HELP {name} {help_}", f"# TYPE {name} gauge"]
            try:
                for labels, value in fn():
                    out.append(f"{name}{_labels(**labels) if labels else ''} {value}")
            except Exception:  # a gauge must never break /metrics
                pass
        return "\n".join(out) + "\n"
