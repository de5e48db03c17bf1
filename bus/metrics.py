"""Prometheus metrics shared by every component, through prometheus_client.

Contract: every Stratus process (gateway, orchestrator, DB worker, every
service built on bus/service.py) answers `GET /metrics` with the Prometheus
text format 0.0.4 (`CONTENT_TYPE`) from a registry of its own (`registry()`),
never prometheus_client's global one, so that several components (or tests)
in one process never collide. A registry from `registry()` also carries the
process's own figures (process_cpu_seconds_total, process_resident_memory_bytes,
process_open_fds, python_info, python_gc_*). Counters are exposed without the
`_created` series (prometheus_client's disable_created_metrics: half the text
for nothing the dashboard reads).

Names: stratus_<component>_<what>, with the unit as a suffix (_seconds,
_bytes) and _total for counters. docs/metrics.md lists them all.

`Callbacks` turns functions that read live state into gauges or counters at
scrape time (nothing to update on the hot path). `parse` and `value` read an
exposition back (tests, benchmarks)."""
from __future__ import annotations

import logging
import threading
from typing import Callable, Iterable

from prometheus_client import (CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector,
                               disable_created_metrics, generate_latest)
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Latency buckets (seconds) of every request histogram: 1 ms to 10 s.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

log = logging.getLogger("stratus.metrics")
disable_created_metrics()

Samples = Iterable[tuple[dict, float]]


def registry(*, process: bool = True) -> CollectorRegistry:
    """A registry of one component, with the process collectors."""
    reg = CollectorRegistry(auto_describe=False)
    if process:
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        GCCollector(registry=reg)
    return reg


def render(reg: CollectorRegistry) -> bytes:
    """The text exposition of `reg` (a collector that fails is logged and left out)."""
    return generate_latest(reg)


class Callbacks:
    """Metrics read from live state when scraped. Register with
    `reg.register(cb)`; add with gauge()/counter(). A callback returns
    [(labels, value)]; one that raises is left out of that scrape (logged once
    per name), never failing /metrics."""

    def __init__(self):
        self._items: dict[str, tuple[str, str, Callable[[], Samples]]] = {}
        self._lock = threading.Lock()
        self._failed: set[str] = set()

    def gauge(self, name: str, help_: str, fn: Callable[[], Samples]) -> None:
        with self._lock:
            self._items[name] = ("gauge", help_, fn)

    def counter(self, name: str, help_: str, fn: Callable[[], Samples]) -> None:
        """`name` without _total; the samples are exposed as name_total."""
        with self._lock:
            self._items[name] = ("counter", help_, fn)

    def describe(self):
        return []

    def collect(self):
        with self._lock:
            items = sorted(self._items.items())
        for name, (kind, help_, fn) in items:
            try:
                samples = list(fn())
            except Exception as exc:
                if name not in self._failed:
                    self._failed.add(name)
                    log.warning("metric %s could not be read: %r", name, exc)
                continue
            m = Metric(name, help_, kind)
            sample_name = name + "_total" if kind == "counter" else name
            for labels, value in samples:
                m.add_sample(sample_name, {k: str(v) for k, v in (labels or {}).items()}, float(value))
            yield m


def parse(text: str | bytes) -> dict[tuple[str, frozenset], float]:
    """{(sample name, frozenset of (label, value)): value} of an exposition.
    Raises ValueError on text that is not the Prometheus format."""
    if isinstance(text, bytes):
        text = text.decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text_or_parsed, name: str, **labels) -> float | None:
    """The value of the sample `name` whose labels include `labels` (the
    sum over every matching sample), None when none matches."""
    parsed = parse(text_or_parsed) if isinstance(text_or_parsed, (str, bytes)) else text_or_parsed
    want = {(k, str(v)) for k, v in labels.items()}
    found = [v for (n, ls), v in parsed.items() if n == name and want <= ls]
    return sum(found) if found else None


class HttpMetrics:
    """A Flask service's request metrics (bus/service.py base_app):
      stratus_http_requests_total{service,endpoint,method,status}
      stratus_http_request_duration_seconds{service,endpoint}
    endpoint: the matched URL rule (/api/v1/users/<path:username>), or
    "unmatched"; method: one of METHODS or OTHER. Bounded label sets."""

    METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})

    def __init__(self, service: str, reg: CollectorRegistry | None = None):
        from prometheus_client import Counter, Histogram
        self.service = service
        self.registry = reg if reg is not None else registry()
        self._requests = Counter("stratus_http_requests", "HTTP requests answered, by service, URL rule, method "
                                 "and status.", ["service", "endpoint", "method", "status"], registry=self.registry)
        self._duration = Histogram("stratus_http_request_duration_seconds", "Time to answer an HTTP request, by "
                                   "service and URL rule.", ["service", "endpoint"], buckets=BUCKETS,
                                   registry=self.registry)
        self._req_children: dict[tuple, object] = {}
        self._dur_children: dict[str, object] = {}

    def observe(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        if method not in self.METHODS:
            method = "OTHER"
        key = (endpoint, method, status)
        c = self._req_children.get(key)
        if c is None:
            c = self._req_children[key] = self._requests.labels(self.service, endpoint, method, str(status))
        c.inc()
        h = self._dur_children.get(endpoint)
        if h is None:
            h = self._dur_children[endpoint] = self._duration.labels(self.service, endpoint)
        h.observe(seconds)

    def render(self) -> bytes:
        return render(self.registry)
