"""Metrics and their discovery, end to end with real processes: a real
orchestrator (which starts the DB workers and, while it leads, writes the
Prometheus file service discovery), a real gateway (which registers itself),
the real users service (built on bus/service.py) and a trivial upstream
that answers JSON on every path. The SD file lists each component with the
right address and labels, every listed /metrics answers valid Prometheus text
with its component's series, the JSON-only upstream is not listed, and the
file is gone once the orchestrator stops cleanly. With the Prometheus that
scripts/services.sh starts on this machine, Prometheus itself scrapes the
cluster's targets: all up within 30 s."""
from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from bus import metrics as bmetrics
from bus.settings import load
from kits.testkit import Client, free_port, real_orchestrator, start_gateway, start_upstream, wait_until

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, timeout: float = 5.0):
    with _OPENER.open(url, timeout=timeout) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read()


def _groups(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return []


def _by_component(groups: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for g in groups:
        out.setdefault(g["labels"]["component"], []).append(g)
    return out


def _wait_for_targets(path: Path, want: dict[str, set[str]], workers: int, timeout: float = 60.0) -> list[dict]:
    """Until the file lists at least `want` ({component: targets}) and `workers` workers."""
    def ok():
        comp = _by_component(_groups(path))
        for c, targets in want.items():
            have = {t for g in comp.get(c, []) for t in g["targets"]}
            if not targets <= have:
                return False
        return len(comp.get("worker", [])) >= workers and _groups(path)
    return wait_until(ok, timeout, interval=0.2, what=f"{path} to list {want} and {workers} workers")


def _wait_workers_ready(orch: int, n: int) -> None:
    def ok():
        try:
            view = json.loads(_get(f"http://127.0.0.1:{orch}/api/v1/cluster")[2])
        except (OSError, ValueError):
            return False
        ws = view["workers"]
        return len(ws) >= n and all(w["ready"] for w in ws) and any(w["role"] == "master" for w in ws)
    wait_until(ok, 90, interval=0.3, what=f"{n} ready workers")


def test_sd_file_lists_every_component_and_each_metrics_endpoint_answers(cluster):
    sd = cluster.state_dir / "prometheus" / "targets" / f"{cluster.name}.json"
    with real_orchestrator(cluster) as orch:
        _wait_workers_ready(orch, 2)   # a master and the one slave the scaling rule starts with
        gw = start_gateway(cluster)
        users = free_port()
        cluster.spawn("users", ["-m", "users"], STRATUS_USERS_PORT=users)
        echo = start_upstream(cluster, "echo", "echo")
        groups = _wait_for_targets(sd, {"gateway": {f"127.0.0.1:{gw}"}, "orchestrator": {f"127.0.0.1:{orch}"},
                                        "service": {f"127.0.0.1:{users}"}}, workers=2)
        comp = _by_component(groups)
        assert all(g["labels"]["cluster"] == cluster.name for g in groups)
        assert comp["service"][0]["labels"]["service"] == "users"
        # The trivial upstream answers JSON on /metrics too: not Prometheus text, not listed.
        assert not any(t.endswith(f":{echo}") for g in groups for t in g["targets"]), groups
        # Worker targets: one group per worker, the ids the orchestrator shows, their own ports.
        view = json.loads(_get(f"http://127.0.0.1:{orch}/api/v1/cluster")[2])
        assert {g["labels"]["worker"] for g in comp["worker"]} == {w["id"] for w in view["workers"]}
        worker_ports = {int(g["targets"][0].rsplit(":", 1)[1]) for g in comp["worker"]}
        assert len(worker_ports) == 2 and not worker_ports & {gw, orch, users}

        # Traffic through the gateway to the users service of the rideshare route.
        c = Client(gw)
        assert c.get("/api/v1/users/nobody-here")[0] == 405   # users: PUT and DELETE only
        deleted = c.request("DELETE", "/api/v1/users/nobody-here")[0]
        assert c.get("/health")[0] == 200

        seen = {}
        for g in groups:
            for target in g["targets"]:
                status, kind, body = _get(f"http://{target}/metrics")
                assert status == 200 and kind.startswith("text/plain"), (target, status, kind)
                seen[(g["labels"]["component"], target)] = bmetrics.parse(body)   # valid Prometheus text
        gw_m = seen[("gateway", f"127.0.0.1:{gw}")]
        assert bmetrics.value(gw_m, "stratus_gateway_requests_total", route="users", method="GET", status=405,
                              tenant="rideshare", app="rideshare") == 1
        assert bmetrics.value(gw_m, "stratus_gateway_requests_total", route="users", method="DELETE",
                              status=deleted, tenant="rideshare", app="rideshare") == 1
        assert bmetrics.value(gw_m, "stratus_gateway_request_duration_seconds_count", route="users",
                              tenant="rideshare", app="rideshare") == 2
        assert bmetrics.value(gw_m, "stratus_gateway_upstream_instances", service="users", state="healthy") == 1
        orch_m = seen[("orchestrator", f"127.0.0.1:{orch}")]
        assert bmetrics.value(orch_m, "stratus_workers", role="master") == 1
        assert bmetrics.value(orch_m, "stratus_orchestrator_leader") == 1
        assert bmetrics.value(orch_m, "stratus_elections_total") >= 1
        for w in view["workers"]:
            assert bmetrics.value(orch_m, "stratus_db_worker_applied_lsn", worker=w["id"]) is not None
            assert bmetrics.value(orch_m, "stratus_db_worker_lag", worker=w["id"]) is not None
        roles = set()
        for (component, target), m in seen.items():
            if component != "worker":
                continue
            assert bmetrics.value(m, "stratus_worker_applied_lsn") is not None
            assert bmetrics.value(m, "stratus_worker_reads_total") is not None
            assert bmetrics.value(m, "stratus_worker_replication_lag") is not None
            assert bmetrics.value(m, "process_cpu_seconds_total") is not None
            roles |= {dict(ls)["role"] for (n, ls), v in m.items() if n == "stratus_worker_info" and v == 1}
        assert roles == {"master", "slave"}
        users_m = seen[("service", f"127.0.0.1:{users}")]
        assert bmetrics.value(users_m, "stratus_http_requests_total", service="users",
                              endpoint="/api/v1/users/<path:username>", method="DELETE", status=deleted) == 1
        assert bmetrics.value(users_m, "stratus_http_requests_total", service="users", endpoint="unmatched",
                              method="GET", status=405) == 1   # no rule matched the method
        assert bmetrics.value(users_m, "stratus_http_request_duration_seconds_count", service="users",
                              endpoint="/api/v1/users/<path:username>") == 1
        # The gateway's registration carries its listening address.
        regs = [json.loads(cluster.zk.get(f"{cluster.paths.service('gateway')}/{ch}")[0])
                for ch in cluster.zk.get_children(cluster.paths.service("gateway"))]
        assert [(r["host"], r["port"]) for r in regs] == [("127.0.0.1", gw)]
        # A worker that dies leaves the file; its replacement joins it.
        slave = next(w for w in view["workers"] if w["role"] == "slave")
        req = urllib.request.Request(f"http://127.0.0.1:{orch}/api/v1/crash/slave", data=b"", method="POST")
        with _OPENER.open(req, timeout=10) as r:
            assert r.status == 200
        _wait_workers_ready(orch, 2)

        def replaced():
            listed = {g["labels"]["worker"] for g in _by_component(_groups(sd)).get("worker", [])}
            return slave["id"] not in listed and len(listed) == 2 and listed
        wait_until(replaced, 30, interval=0.2, what="the dead slave to leave the targets and its replacement to join")
    assert not sd.exists(), "a clean stop of the orchestrator removes its targets file"


# --- Prometheus itself ------------------------------------------------------------------------
def _prometheus() -> str | None:
    url = load().prometheus_url.rstrip("/")
    try:
        return url if _get(f"{url}/-/ready", timeout=2)[0] == 200 else None
    except OSError:
        return None


def _sd_dir_of(url: str) -> Path:
    """The directory Prometheus's file_sd_configs read (its running config)."""
    cfg = yaml.safe_load(json.loads(_get(f"{url}/api/v1/status/config")[2])["data"]["yaml"])
    for job in cfg.get("scrape_configs", []):
        for sd in job.get("file_sd_configs", []):
            for pattern in sd.get("files", []):
                return Path(pattern).parent
    pytest.skip("the running Prometheus has no file_sd_configs: it is not the one scripts/services.sh starts")


def test_prometheus_scrapes_the_clusters_targets(cluster):
    url = _prometheus()
    if url is None:
        pytest.skip("no Prometheus answers at STRATUS_PROMETHEUS_URL (scripts/services.sh start runs one)")
    sd_dir = _sd_dir_of(url)
    sd = sd_dir / f"{cluster.name}.json"
    with real_orchestrator(cluster, STRATUS_PROMETHEUS_SD_DIR=str(sd_dir)) as orch:
        _wait_workers_ready(orch, 2)
        gw = start_gateway(cluster)
        _wait_for_targets(sd, {"gateway": {f"127.0.0.1:{gw}"}, "orchestrator": {f"127.0.0.1:{orch}"}}, workers=2)
        listed = time.monotonic()
        Client(gw).get("/health")

        def targets():
            data = json.loads(_get(f"{url}/api/v1/targets?state=active")[2])["data"]["activeTargets"]
            return [t for t in data if t["labels"].get("cluster") == cluster.name]

        def all_up():
            ts = targets()
            comps = {t["labels"]["component"] for t in ts if t["health"] == "up"}
            return ts and all(t["health"] == "up" for t in ts) and {"gateway", "orchestrator", "worker"} <= comps \
                and len([t for t in ts if t["labels"]["component"] == "worker"]) == 2 and ts
        ts = wait_until(all_up, 30, interval=0.5, what="Prometheus to scrape every target of the cluster")
        took = time.monotonic() - listed
        assert {t["labels"]["job"] for t in ts} == {"gateway", "orchestrator", "worker"}   # job is the component
        assert {t["scrapeUrl"] for t in ts if t["labels"]["component"] == "gateway"} == \
            {f"http://127.0.0.1:{gw}/metrics"}
        # The series are queryable, with the target's labels.
        q = urllib.parse.quote(f'stratus_workers{{cluster="{cluster.name}",role="master"}}')
        result = wait_until(lambda: json.loads(_get(f"{url}/api/v1/query?query={q}")[2])["data"]["result"], 15,
                            interval=0.5, what="the orchestrator's series in Prometheus")
        assert result[0]["metric"]["job"] == "orchestrator" and float(result[0]["value"][1]) == 1
        print(f"every target up {took:.1f}s after the SD file listed them")
    assert not sd.exists()


# --- tenants' app instances -------------------------------------------------------------------
METERED_API = '''"""A web role built on the platform's bus/service.py: it serves /metrics."""
from bus.service import base_app, serve


def create():
    app = base_app("metered")

    @app.get("/metered")
    def hello():
        return {"ok": True}
    return app


if __name__ == "__main__":
    serve(create, "metered", 0)
'''
SHOP = Path(__file__).resolve().parent.parent / "data" / "apps" / "shop"


def test_app_instances_are_scraped_only_when_they_serve_metrics(cluster, tmp_path):
    """A tenant's app with two web roles: `api` on bus/service.py (it serves
    /metrics: listed as component app with its tenant, app and role), `plain`
    the example shop (it answers /metrics 404: probed once, never listed)."""
    import shutil
    import uuid

    from stratus import builtin
    pkg = tmp_path / "pkg"
    (pkg / "metered").mkdir(parents=True)
    (pkg / "metered" / "__init__.py").write_text("")
    (pkg / "metered" / "api.py").write_text(METERED_API)
    shutil.copytree(SHOP / "shop", pkg / "shop")
    package = builtin.tarball(builtin.members(pkg, ["metered", "shop"]))
    manifest = {"roles": {
        "api": {"kind": "web", "command": ["python", "-m", "metered.api"], "instances": 1,
                "routes": ["/metered"], "health": "/health"},
        "plain": {"kind": "web", "command": ["python", "-m", "shop.web"], "instances": 1,
                  "routes": ["/shop"], "health": "/health"}}}
    sd = cluster.state_dir / "prometheus" / "targets" / f"{cluster.name}.json"
    tenant = f"m-{uuid.uuid4().hex[:6]}"
    with real_orchestrator(cluster) as orch:
        base = f"http://127.0.0.1:{orch}"

        def created():
            req = urllib.request.Request(f"{base}/api/v1/tenants", data=json.dumps({"name": tenant}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
            try:
                with _OPENER.open(req, timeout=30) as r:
                    return r.status == 201
            except (OSError, urllib.error.HTTPError):
                return False
        wait_until(created, 90, interval=0.5, what=f"tenant {tenant} created")
        try:
            builtin.deploy(base, tenant, "metered", manifest, package)
            view = builtin.wait_running(base, tenant, "metered", timeout=90)
            api = view["roles"]["api"]["instances"][0]
            plain = view["roles"]["plain"]["instances"][0]

            def listed():
                groups = _by_component(_groups(sd)).get("app", [])
                return [g for g in groups if g["labels"]["tenant"] == tenant] or None
            apps = wait_until(listed, 30, interval=0.2, what="the app's api instance in the targets")
            assert apps == [{"targets": [f"{api['host']}:{api['port']}"],
                             "labels": {"cluster": cluster.name, "component": "app", "tenant": tenant,
                                        "app": "metered", "role": "api"}}]
            # The plain role's instance was asked once and answered no Prometheus text.
            wait_until(lambda: any(plain["id"] in line and "serves no /metrics" in line
                                   for line in cluster.log("orch").splitlines()),
                       30, interval=0.3, what="the plain instance to be probed")
            assert not any(g["labels"].get("role") == "plain" for g in _groups(sd))
            m = bmetrics.parse(_get(f"http://{api['host']}:{api['port']}/metrics")[2])
            assert bmetrics.value(m, "stratus_http_requests_total", service="metered", endpoint="/health",
                                  status=200) >= 1   # the orchestrator's health probes
        finally:
            req = urllib.request.Request(f"{base}/api/v1/tenants/{tenant}", method="DELETE")
            with contextlib.suppress(OSError):
                _OPENER.open(req, timeout=60).close()
