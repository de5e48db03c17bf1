"""The dashboard's charts: which Prometheus queries draw them, and how their
answers become the arrays a chart draws. Every metric and label name the
dashboard depends on is in this module, so a change of the exporters' names
is a change here only.

Metrics (prometheus_client in each component; Prometheus scrapes them by
file service discovery and labels every target with its `cluster`):

    gateway   stratus_gateway_requests_total{route, method, status, tenant, app}   counter
              stratus_gateway_request_duration_seconds_bucket{route, tenant, app, le}  histogram
    DB        stratus_worker_reads_total{worker}                  reads a worker answered (counter)
              stratus_worker_writes_total{worker, outcome}        writes a master handled; outcome
                                                                  applied, duplicate or refused
              stratus_worker_replication_lag{worker}              entries the worker is behind the master
              stratus_elections_total                             the orchestrator's count of elections
    (`worker` is the label file service discovery gives a worker's target,
    orchestrator/discovery.py; the others are the exporters' own.)

Charts (CHARTS): requests/s, error rate (% of answers that are 5xx), p50 and
p99 latency (ms), per route, of one tenant (or one app of it) or of every
tenant; and the DB cluster's reads/s, writes/s, replication lag per worker
and elections. Every query is scoped to the dashboard's own cluster (several
clusters may share one Prometheus, tests do), and a tenant's charts to that
tenant: the caller (views/charts.py) decides which scope a user may ask for.

Answer of `series()` (the charts' JSON endpoint returns it as it is):

    {"chart": key, "title", "unit", "start", "end", "step",
     "x": [unix seconds...],                          one per step, start..end
     "series": [{"label": "GET /shop", "values": [number|null, ...]}, ...]}

`series` is empty when Prometheus holds no sample in the range: the page
then says there is no data. A Prometheus that cannot be reached or refuses
the query raises MetricsUnavailable."""
from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

# --- names (the exporters') ---------------------------------------------------------------
REQUESTS = "stratus_gateway_requests_total"
DURATION = "stratus_gateway_request_duration_seconds_bucket"
READS = "stratus_worker_reads_total"
WRITES = "stratus_worker_writes_total"
LAG = "stratus_worker_replication_lag"
ELECTIONS = "stratus_elections_total"
L_CLUSTER, L_TENANT, L_APP, L_ROUTE, L_STATUS, L_WORKER = "cluster", "tenant", "app", "route", "status", "worker"

RANGE = 3600          # seconds: the last hour
STEP = 15             # seconds between points (240 points an hour)
RATE_WINDOW = "1m"    # rate() window: 4 scrapes at 15 s, 12 at Prometheus's 5 s interval
MAX_SERIES = 20       # lines on one chart at most (the busiest kept)
TIMEOUT = 5.0


class MetricsUnavailable(Exception):
    pass


@dataclass(frozen=True)
class Chart:
    title: str
    unit: str
    query: str            # a template: {sel} is the label selector, {w} the rate window
    label: str            # the label naming each line ("" : one line, named `title`)
    scale: float = 1.0    # values are multiplied by it (seconds -> ms, ratio -> %)
    scope: str = "routes"  # "routes": tenant-scoped traffic; "cluster": the DB cluster


# Query templates: {sel} is the scope's label matchers, {w} the rate window,
# the other fields the names above (NAMES).
CHARTS: dict[str, Chart] = {
    "requests": Chart("Requests/s", "req/s", "sum by ({route}) (rate({requests}{{{sel}}}[{w}]))", L_ROUTE),
    # 5xx answers over all answers; a route with traffic and no 5xx series at all is 0, not "no data".
    "errors": Chart("Error rate", "% 5xx",
                    '(sum by ({route}) (rate({requests}{{{sel},{status}=~"5.."}}[{w}]))'
                    " or 0 * sum by ({route}) (rate({requests}{{{sel}}}[{w}])))"
                    " / sum by ({route}) (rate({requests}{{{sel}}}[{w}]))", L_ROUTE, 100.0),
    "p50": Chart("p50 latency", "ms",
                 "histogram_quantile(0.5, sum by ({route}, le) (rate({duration}{{{sel}}}[{w}])))", L_ROUTE, 1000.0),
    "p99": Chart("p99 latency", "ms",
                 "histogram_quantile(0.99, sum by ({route}, le) (rate({duration}{{{sel}}}[{w}])))", L_ROUTE, 1000.0),
    "db_reads": Chart("DB reads/s", "reads/s", "sum(rate({reads}{{{sel}}}[{w}]))", "", scope="cluster"),
    "db_writes": Chart("DB writes/s", "writes/s", 'sum(rate({writes}{{{sel},outcome="applied"}}[{w}]))', "",
                       scope="cluster"),
    "db_lag": Chart("Replication lag", "entries", "max by ({worker}) ({lag}{{{sel}}})", L_WORKER, scope="cluster"),
    "db_elections": Chart("Elections", "elections", "max({elections}{{{sel}}})", "", scope="cluster"),
}
NAMES = {"requests": REQUESTS, "duration": DURATION, "reads": READS, "writes": WRITES, "lag": LAG,
         "elections": ELECTIONS, "route": L_ROUTE, "status": L_STATUS, "worker": L_WORKER}
ROUTE_CHARTS = ("requests", "errors", "p50", "p99")
CLUSTER_CHARTS = ("db_reads", "db_writes", "db_lag", "db_elections")


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def selector(cluster: str, tenant: str | None = None, app: str | None = None) -> str:
    """The label matchers inside {...} for one scope."""
    parts = [f"{L_CLUSTER}={_quote(cluster)}"]
    if tenant:
        parts.append(f"{L_TENANT}={_quote(tenant)}")
    if app:
        parts.append(f"{L_APP}={_quote(app)}")
    return ",".join(parts)


def promql(key: str, cluster: str, tenant: str | None = None, app: str | None = None) -> str:
    """The query of chart `key` for one scope (KeyError: no such chart)."""
    chart = CHARTS[key]
    sel = selector(cluster, tenant if chart.scope == "routes" else None, app if chart.scope == "routes" else None)
    return chart.query.format(sel=sel, w=RATE_WINDOW, **NAMES)


class Prometheus:
    """Prometheus's HTTP API (/api/v1/query_range), read server side."""

    def __init__(self, url: str, *, timeout: float = TIMEOUT):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def query_range(self, query: str, start: float, end: float, step: int) -> list[dict]:
        params = urllib.parse.urlencode({"query": query, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                         "step": str(step)})
        req = urllib.request.Request(f"{self.url}/api/v1/query_range", data=params.encode(),
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as exc:
            try:
                why = json.loads(exc.read()).get("error") or exc.reason
            except (ValueError, AttributeError):
                why = exc.reason
            raise MetricsUnavailable(f"Prometheus refused the query ({exc.code}): {why}") from None
        except (OSError, ValueError) as exc:
            raise MetricsUnavailable(f"Prometheus could not be reached at {self.url}: {exc}") from None
        if body.get("status") != "success":
            raise MetricsUnavailable(f"Prometheus answered {body.get('error') or body.get('status')}")
        return body.get("data", {}).get("result", [])


def align(result: list[dict], start: float, step: int, n: int, label: str, title: str,
          scale: float = 1.0) -> list[dict]:
    """Prometheus's matrix as lines on the grid start + k*step (k < n):
    a step without a sample (or NaN/Inf) is null. Lines with no number at
    all are dropped; at most MAX_SERIES, the ones with the largest sum."""
    out = []
    for item in result:
        values: list[float | None] = [None] * n
        for ts, raw in item.get("values", []):
            k = round((float(ts) - start) / step)
            try:
                v = float(raw)
            except (TypeError, ValueError):
                continue
            if 0 <= k < n and math.isfinite(v):
                values[k] = round(v * scale, 6)
        if all(v is None for v in values):
            continue
        metric = item.get("metric", {})
        name = metric.get(label) if label else None
        out.append({"label": name or title, "values": values})
    out.sort(key=lambda s: (-sum(v for v in s["values"] if v is not None), s["label"]))
    return sorted(out[:MAX_SERIES], key=lambda s: s["label"])


def series(prom: Prometheus, key: str, cluster: str, *, tenant: str | None = None, app: str | None = None,
           now: float | None = None, span: int = RANGE, step: int = STEP) -> dict:
    """Chart `key` over the last `span` seconds (see the module's doc)."""
    chart = CHARTS[key]
    end = math.floor((now if now is not None else time.time()) / step) * step
    start = end - span
    n = span // step + 1
    result = prom.query_range(promql(key, cluster, tenant, app), start, end, step)
    return {"chart": key, "title": chart.title, "unit": chart.unit, "start": start, "end": end, "step": step,
            "x": [start + k * step for k in range(n)],
            "series": align(result, start, step, n, chart.label, chart.title, chart.scale)}
