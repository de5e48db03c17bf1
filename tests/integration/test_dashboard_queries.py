"""The charts' queries (dashboard/metrics_queries.py): the pure part (scopes,
PromQL text, Prometheus's matrix aligned on the chart's grid) on made-up
answers, and every chart's query sent to the real Prometheus that
scripts/services.sh runs, which must accept it (skipped with a message when
no Prometheus answers at STRATUS_PROMETHEUS_URL)."""
from __future__ import annotations

import urllib.request

import pytest

from bus.settings import load
from dashboard import metrics_queries as mq


def test_every_query_is_scoped_to_the_cluster_and_a_routes_chart_to_its_tenant():
    for key, chart in mq.CHARTS.items():
        q = mq.promql(key, "c-1", "acme", "shop")
        assert q.count('cluster="c-1"') == q.count("{"), (key, q)     # every selector
        if chart.scope == "routes":
            assert q.count('tenant="acme"') == q.count("{") and q.count('app="shop"') == q.count("{"), q
        else:
            assert "tenant=" not in q and "app=" not in q, q
    # Every tenant (the admin's): no tenant matcher; a name cannot break out of its quotes.
    assert "tenant" not in mq.promql("requests", "c-1")
    q = mq.promql("requests", 'c"}) or vector(1', 'a\\"b')
    assert 'cluster="c\\"}) or vector(1"' in q and 'tenant="a\\\\\\"b"' in q
    with pytest.raises(KeyError):
        mq.promql("nope", "c")


def test_the_matrix_is_aligned_on_the_grid_with_gaps_as_null():
    start, step, n = 1000, 15, 5
    result = [
        {"metric": {"route": "web"}, "values": [[1000, "1"], [1015, "2.5"], [1045, "NaN"], [1060, "4"]]},
        {"metric": {"route": "api"}, "values": [[1030, "+Inf"]]},            # nothing finite: dropped
        {"metric": {"route": "big"}, "values": [[1000, "100"], [1999, "5"]]},  # a point off the grid ignored
    ]
    out = mq.align(result, start, step, n, "route", "Requests/s", scale=2.0)
    assert out == [{"label": "big", "values": [200.0, None, None, None, None]},
                   {"label": "web", "values": [2.0, 5.0, None, None, 8.0]}]
    one = mq.align([{"metric": {}, "values": [[1000, "3"]]}], start, step, n, "", "DB reads/s")
    assert one == [{"label": "DB reads/s", "values": [3.0, None, None, None, None]}]
    # At most MAX_SERIES lines: the busiest.
    many = [{"metric": {"route": f"r{i:02d}"}, "values": [[1000, str(i)]]} for i in range(mq.MAX_SERIES + 5)]
    kept = mq.align(many, start, step, n, "route", "x")
    assert len(kept) == mq.MAX_SERIES and "r00" not in {s["label"] for s in kept}


class _Fake:
    def __init__(self, result=None, error=None):
        self.result, self.error, self.asked = result or [], error, []

    def query_range(self, query, start, end, step):
        self.asked.append((query, start, end, step))
        if self.error:
            raise mq.MetricsUnavailable(self.error)
        return self.result


def test_series_asks_the_last_hour_on_a_whole_step_grid():
    fake = _Fake([{"metric": {"route": "web"}, "values": [[3600 * 10, "1"]]}])
    out = mq.series(fake, "p99", "c", tenant="acme", now=3600 * 11 + 7)
    (query, start, end, step), = fake.asked
    assert (start, end, step) == (3600 * 10, 3600 * 11, mq.STEP) and "histogram_quantile(0.99" in query
    assert out["x"][0] == start and out["x"][-1] == end and len(out["x"]) == 3600 // mq.STEP + 1
    assert out["series"] == [{"label": "web", "values": [1000.0] + [None] * (len(out["x"]) - 1)}]
    assert (out["title"], out["unit"]) == ("p99 latency", "ms")
    assert mq.series(_Fake(), "requests", "c")["series"] == []       # no data: the page says so
    with pytest.raises(mq.MetricsUnavailable):
        mq.series(_Fake(error="down"), "requests", "c")


def test_an_unreachable_prometheus_is_metrics_unavailable():
    from bus.ports import free_port
    with pytest.raises(mq.MetricsUnavailable, match="could not be reached"):
        mq.Prometheus(f"http://127.0.0.1:{free_port()}", timeout=2).query_range("up", 0, 60, 15)


def _prometheus() -> str | None:
    url = load().prometheus_url.rstrip("/")
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
            return url if r.status == 200 else None
    except OSError:
        return None


def test_the_real_prometheus_accepts_every_chart_query():
    url = _prometheus()
    if url is None:
        pytest.skip("no Prometheus answers at STRATUS_PROMETHEUS_URL (scripts/services.sh start runs one)")
    prom = mq.Prometheus(url)
    for key in mq.CHARTS:
        for scope in ({}, {"tenant": "acme"}, {"tenant": "acme", "app": "shop"}):
            out = mq.series(prom, key, "no-such-cluster", **scope)    # parsed and run: no data
            assert out["series"] == [] and len(out["x"]) == mq.RANGE // mq.STEP + 1, (key, scope)
    # A query Prometheus cannot parse is its 400, said as MetricsUnavailable.
    with pytest.raises(mq.MetricsUnavailable, match="refused"):
        prom.query_range("sum(", 0, 60, 15)
