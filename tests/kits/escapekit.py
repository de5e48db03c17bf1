"""The escape suite's platform (issue 22): a test cluster (tests/harness.py
LocalCluster) with a real orchestrator on the process runtime, a real
gateway and dashboard, the tenant `victim` running the example app
(tests/data/apps/shop, with a private row in its table `secrets`) and the
tenant `mallory` running the hostile app (tests/data/apps/hostile), told
every target it cannot guess (hostile_env: each checked to be there first).
Shared by tests/integration/test_escape.py and benchmarks/walls.py.

    with escape_platform(tmp_path) as p:
        before = Meter(p.gw, count=200).run()
        during = Meter(p.gw).start(); status, report = probe(p); during.finish()

`Meter` measures the victim through the gateway; `probe` runs the hostile
app's attempts (GET /probe) and falls back on its log when the instance did
not live to answer."""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import threading
import time
import urllib.parse
from pathlib import Path

from bus import ops
from bus.brokers import amqp_urls
from harness import ROOT, LocalCluster
from kits.appskit import AppsClient, shop_package
from kits.dashboardkit import start_dashboard
from kits.testkit import Client, real_orchestrator, start_gateway, wait_until
from stratus import builtin
from stratus.measure import percentile

HOSTILE = Path(__file__).resolve().parent.parent / "data" / "apps" / "hostile"
VICTIM, MALLORY = "victim", "mallory"
VICTIM_TABLE = "secrets"
VICTIM_SECRET = "victim-private-row"
# The limits every instance is expected to run under (issue 22, "Limits for
# every instance"): past these the hostile app's attempts count as reached.
# They are the platform's own settings (orchestrator/runtimes/limits.py), as
# the platform under test reads them.
from orchestrator.runtimes.limits import Limits  # noqa: E402

_LIMITS = Limits.from_env()
PIDS_LIMIT = _LIMITS.pids
MEMORY_LIMIT_MIB = _LIMITS.memory_mb
DISK_LIMIT_MIB = _LIMITS.disk_mb
CPU_LIMIT = _LIMITS.cpus          # cores
# Every attempt the issue lists, as the hostile app names them.
ATTEMPTS = {
    "state_dir_files", "token_secret", "admin_password", "dashboard_secret", "etc_shadow", "repo_var",
    "secrets_dir_files", "amqp_platform_accounts",
    "proc_environ_of_others", "other_processes_visible", "signal_orchestrator", "signal_other_tenant",
    "other_tenant_package", "other_tenant_log", "other_tenant_environ",
    "amqp_guest_login", "management_api", "replication_log", "other_tenant_tasks", "impersonated_read",
    "zookeeper", "orchestrator_api", "worker_metrics", "prometheus", "rabbitmq_prometheus", "dashboard",
    "other_tenant_instance",
    "write_cwd", "write_state_dir", "fork_bomb", "disk_scratch", "cpu_burners", "memory_hog",
}


def hostile_package() -> tuple[dict, bytes]:
    manifest = json.loads((HOSTILE / "manifest.json").read_text())
    return manifest, builtin.tarball(builtin.members(HOSTILE, ["hostile"]))


class Platform(AppsClient):
    wait_timeout = 60.0

    def __init__(self, cluster, orch: int):
        self.cluster, self.orch, self.gw, self.dash = cluster, orch, 0, 0
        self.tenant = VICTIM
        self.passwords: dict[str, str] = {}

    def create(self, name: str) -> None:
        def created():
            status, body, _ = self.api("POST", "/api/v1/tenants", {"name": name})
            if status == 201:
                self.passwords[name] = body["password"]
                return True
            assert status in (503, 504), (status, body)   # the DB workers may still be starting
            return None
        wait_until(created, 90, 0.5, what=f"tenant {name} created")

    def deploy(self, tenant: str, app: str, manifest: dict, package: bytes) -> dict:
        return builtin.deploy(f"http://127.0.0.1:{self.orch}", tenant, app, manifest, package)

    def instances(self, tenant: str, app: str) -> list[dict]:
        view = self.app(app, tenant)
        return [i for r in view["roles"].values() for i in r["instances"] if i["state"] == "running"]

    def wait_hostile(self, timeout: float = 60.0) -> None:
        """The hostile app running (again: it may have been restarted) and
        routed by the gateway."""
        self.wait_app(MALLORY, "hostile", {"web": 1}, timeout)
        wait_until(lambda: self.gateway("GET", "/probe/ready")[0] == 200 or None, timeout, 0.1,
                   what="the hostile app through the gateway")

    def wait_app(self, tenant: str, app: str, counts: dict[str, int], timeout: float = 60.0) -> None:
        def settled():
            roles = self.app(app, tenant)["roles"]
            return all(sum(i["state"] == "running" for i in roles[r]["instances"]) == n
                       for r, n in counts.items()) or None
        wait_until(settled, timeout, 0.2, what=f"{tenant}/{app} running {counts}")


# --- what the test knows of the platform (the targets) -----------------------------------
def listening(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def worker_pids(cluster) -> list[int]:
    """The cluster's DB workers (python -m worker, with this cluster's name)."""
    marker = f"STRATUS_CLUSTER={cluster.name}".encode()
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and b"worker" in (d / "cmdline").read_bytes() and \
                    marker in (d / "environ").read_bytes().split(b"\0"):
                out.append(int(d.name))
        except OSError:
            continue
    return out


def tenant_paths(state_dir: Path, tenant: str) -> tuple[list[Path], list[Path]]:
    """(every directory of the state named after `tenant`: its packages, app
    directories and logs, wherever the platform keeps them; its log files)."""
    dirs = sorted(p for p in state_dir.rglob(tenant) if p.is_dir())
    dirs = [d for d in dirs if not any(o in d.parents for o in dirs)]
    logs = sorted(f for d in dirs for f in d.rglob("*.log") if f.is_file())
    return dirs, logs


def ports_of_urls(urls: list[str], default: int) -> list[int]:
    return sorted({urllib.parse.urlparse(u if "://" in u else f"http://{u}").port or default for u in urls})


def hostile_env(p: Platform) -> dict[str, str]:
    """Everything an attacker would guess from the repository and the
    machine, told outright; each target checked to be there."""
    c = p.cluster
    s = c.settings
    state = c.state_dir
    secrets = Path(c.env.get("STRATUS_SECRETS_DIR") or state / "secrets")
    for name in ("token-secret", "admin-password", "dashboard-secret"):
        assert (state / name).is_file(), f"{state / name} is missing: the secrets attempt would prove nothing"
    dirs, logs = tenant_paths(state, VICTIM)
    assert dirs and logs, f"no directory or log of {VICTIM} under {state}"
    victim = p.instances(VICTIM, "shop")
    victim_pids = [i["pid"] for i in victim if i.get("pid")]
    victim_ports = [i["port"] for i in victim if i.get("port")]
    platform_pids = [c.procs[k].pid for k in ("orch", "gw", "dashboard")] + worker_pids(c)
    metrics = sorted({w["metrics_port"] for w in c.workers().values() if w.get("metrics_port")})
    amqp = ports_of_urls(amqp_urls(s.amqp_url), 5672)
    management = ports_of_urls([u for u in s.amqp_management_url.split(",") if u.strip()], 15672)
    zk_hosts = [h.split("/")[0] for h in s.zk_hosts.split(",") if h.strip()]
    prometheus = ports_of_urls([s.prometheus_url], 9090)
    rabbit_metrics = ports_of_urls(os.environ.get("STRATUS_RABBITMQ_METRICS", "127.0.0.1:15692").split(","), 15692)
    assert victim_pids and victim_ports and metrics, (victim, c.workers())
    assert all(pid_running(pid) for pid in platform_pids + victim_pids), platform_pids + victim_pids
    for what, ports in (("orchestrator", [p.orch]), ("dashboard", [p.dash]), ("worker metrics", metrics),
                        ("victim", victim_ports), ("AMQP", amqp), ("management", management),
                        ("Prometheus", prometheus), ("RabbitMQ metrics", rabbit_metrics),
                        ("ZooKeeper", [int(h.rsplit(":", 1)[1]) for h in zk_hosts])):
        assert all(listening(port) for port in ports), f"{what} {ports} not listening: the attempt would prove nothing"
    join = lambda xs: ",".join(str(x) for x in xs)   # noqa: E731
    return {
        "HOSTILE_HOST": "127.0.0.1",
        "HOSTILE_STATE_DIR": str(state), "HOSTILE_SECRETS_DIR": str(secrets), "HOSTILE_REPO_DIR": str(ROOT),
        "HOSTILE_ORCH_PID": str(c.procs["orch"].pid), "HOSTILE_ORCH_PORT": str(p.orch),
        "HOSTILE_PLATFORM_PIDS": join(platform_pids),
        "HOSTILE_VICTIM_TENANT": VICTIM, "HOSTILE_VICTIM_APP": "shop", "HOSTILE_VICTIM_TABLE": VICTIM_TABLE,
        "HOSTILE_VICTIM_PIDS": join(victim_pids), "HOSTILE_VICTIM_PORTS": join(victim_ports),
        "HOSTILE_VICTIM_DIRS": join(dirs), "HOSTILE_VICTIM_LOGS": join(logs),
        "HOSTILE_AMQP_PORTS": join(amqp), "HOSTILE_MANAGEMENT_PORTS": join(management),
        "HOSTILE_ZK_HOSTS": join(zk_hosts), "HOSTILE_METRICS_PORTS": join(metrics),
        "HOSTILE_PROMETHEUS_PORT": join(prometheus), "HOSTILE_RABBIT_PROMETHEUS_PORT": join(rabbit_metrics),
        "HOSTILE_DASHBOARD_PORT": str(p.dash),
        "HOSTILE_PIDS_LIMIT": str(PIDS_LIMIT), "HOSTILE_MEMORY_LIMIT_MIB": str(MEMORY_LIMIT_MIB),
        "HOSTILE_DISK_LIMIT_MIB": str(DISK_LIMIT_MIB), "HOSTILE_CPU_LIMIT": str(CPU_LIMIT),
    }


# --- the victim's latency --------------------------------------------------------------
class Meter:
    """GET /shop through the gateway, one after the other on one keep-alive
    connection (a short pause between two), from a thread, until stopped or
    `count` requests; records (status, seconds) of each."""

    def __init__(self, gw: int, count: int | None = None, limit: float = 120.0):
        self.gw, self.count, self.limit = gw, count, limit
        self.samples: list[tuple[int, float]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="meter", daemon=True)

    def _run(self) -> None:
        c = Client(self.gw, timeout=15)
        deadline = time.monotonic() + self.limit
        while not self.stop.is_set() and time.monotonic() < deadline and \
                (self.count is None or len(self.samples) < self.count):
            t0 = time.perf_counter()
            try:
                status = c.get("/shop")[0]
            except (OSError, http.client.HTTPException) as exc:
                status = 0
                self.errors.append(repr(exc))
                c.close()
                c = Client(self.gw, timeout=15)
            self.samples.append((status, time.perf_counter() - t0))
            time.sleep(0.005)
        c.close()

    def start(self) -> "Meter":
        self.thread.start()
        return self

    def finish(self, timeout: float = 130.0) -> "Meter":
        self.stop.set()
        self.thread.join(timeout)
        return self

    def run(self) -> "Meter":
        """Until `count` requests (or the time limit)."""
        self.start().thread.join(self.limit + 10)
        return self.finish()

    def p99(self) -> float:
        return percentile(sorted(s for _, s in self.samples), 99)

    def median(self) -> float:
        return percentile(sorted(s for _, s in self.samples), 50)

    def statuses(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for st, _ in self.samples:
            out[st] = out.get(st, 0) + 1
        return out


# --- the attack ------------------------------------------------------------------------------
def results_from_log(p: Platform) -> dict:
    """The hostile app's results as its log tells them (HOSTILE-RESULT lines
    after the last HOSTILE-START), for when its instance died mid-probe; a
    memory hog cut short is judged by its last HOSTILE-PROGRESS line."""
    _, logs = tenant_paths(p.cluster.state_dir, MALLORY)
    lines = [ln for f in logs for ln in f.read_text(errors="replace").splitlines()]
    starts = [i for i, ln in enumerate(lines) if ln.startswith("HOSTILE-START")]
    lines = lines[starts[-1]:] if starts else lines
    out: dict = {}
    held = 0
    for ln in lines:
        if ln.startswith("HOSTILE-RESULT "):
            out.update(json.loads(ln[len("HOSTILE-RESULT "):]))
        m = re.match(r"HOSTILE-PROGRESS memory_hog (\d+)", ln)
        if m:
            held = max(held, int(m.group(1)))
    if "memory_hog" not in out and any(n in out for n in ATTEMPTS - {"memory_hog"}):
        out["memory_hog"] = {"reached": held > MEMORY_LIMIT_MIB,
                             "detail": f"the instance died during the hog, having held at least {held} MiB"}
    return out


def probe(p: Platform) -> tuple[int, dict]:
    """GET /probe through the gateway: (status, report); the report from the
    log when the instance did not live to answer."""
    c = Client(p.gw, timeout=90)
    try:
        status, body, _ = c.get("/probe")
    except (OSError, http.client.HTTPException) as exc:
        status, body = 0, repr(exc)
    finally:
        c.close()
    if status == 200 and isinstance(body, dict):
        return status, body
    return status, results_from_log(p)


def attack(p: Platform, warmup: int = 20, requests: int = 200) -> dict:
    """One round: the victim's latency over `requests` requests (after
    `warmup`), then the hostile app's probe while the victim is measured
    without pause. {"status", "report", "took", "before", "during"}."""
    before = Meter(p.gw, count=warmup + requests).run()
    before.samples = before.samples[warmup:]
    during = Meter(p.gw).start()
    t0 = time.monotonic()
    try:
        status, report = probe(p)
    finally:
        took = time.monotonic() - t0
        time.sleep(0.5)                             # and just after
        during.finish()
    return {"status": status, "report": report, "took": took, "before": before, "during": during}


@contextlib.contextmanager
def escape_platform(tmp_path: Path):
    """The platform of the module doc, ready (both apps serving through the
    gateway); yields a Platform. The tenants are deleted at the end."""
    cluster = LocalCluster(tmp_path, health_interval=0.5)
    try:
        with real_orchestrator(cluster) as orch:
            p = Platform(cluster, orch)
            p.create(VICTIM)
            p.create(MALLORY)
            # No rate limit: the meter measures latency, not the tenant's quota.
            p.gw = start_gateway(cluster, "gw", STRATUS_TENANT_RATE="0")
            p.dash = start_dashboard(cluster, p.gw)
            manifest, package = shop_package()
            p.deploy(VICTIM, "shop", manifest, package)
            p.wait_app(VICTIM, "shop", {"web": 2, "jobs": 1})
            wait_until(lambda: p.gateway("GET", "/shop")[0] == 200 or None, 30, 0.1, what="the victim's shop")
            # A private row of the victim's, for a read marked as the victim to find.
            db = cluster.client(tenant=VICTIM)
            db.create_table(VICTIM_TABLE, [ops.column("id", "integer", nullable=False), ops.column("secret", "text")],
                            ["id"])
            db.write([ops.insert(VICTIM_TABLE, {"id": 1, "secret": VICTIM_SECRET})])
            manifest, package = hostile_package()
            manifest["roles"]["web"]["env"] = hostile_env(p)
            p.deploy(MALLORY, "hostile", manifest, package)
            p.wait_hostile()
            try:
                yield p
            finally:
                for tenant in (MALLORY, VICTIM):
                    try:
                        p.api("DELETE", f"/api/v1/tenants/{tenant}")
                    except (OSError, http.client.HTTPException):
                        pass
    finally:
        cluster.close()
