"""A real platform for the dashboard's tests (tests/integration/test_dashboard*.py,
tests/e2e/test_dashboard_browser.py): a test cluster (tests/harness.py
LocalCluster) with a real orchestrator (which starts the DB workers and the
apps' instances), a real gateway and the dashboard process (`python -m
dashboard`), registered as the service "dashboard" and reached through the
gateway at /dashboard/. Two tenants (`acme-*`, `beta-*`) and a developer are
created through the orchestrator's API, and the example app
tests/data/apps/shop is deployed for the first tenant.

Every component writes its output to <state>/logs/<key>.log, where the logs
route reads the platform's components (orchestrator/logs.py), so the
dashboard's logs view finds the gateway's and the instances' lines.

`Session` is a browser without a browser: a requests.Session that signs in
through the form and sends each form's CSRF token, for the HTTP-level tests."""
from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from pathlib import Path

import requests

from harness import LocalCluster
from kits.appskit import AppsClient, shop_package  # noqa: F401  (the dashboard's tests import it from here)
from kits.testkit import Client, free_port, real_orchestrator, start_gateway, wait_until
from stratus import builtin

ADMIN_PASSWORD = "dash-admin-pw"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def start_dashboard(cluster, gw_port: int, key: str = "dashboard", **env) -> int:
    """`python -m dashboard` on a free port, calling the platform through the
    gateway at gw_port; returns its port once the gateway routes
    /dashboard/login to it."""
    port = free_port()
    env = {"STRATUS_GATEWAY_URL": f"http://127.0.0.1:{gw_port}", **env}
    cluster.spawn(key, ["-m", "dashboard", "--port", str(port)], **env)
    wait_until(lambda: Client(port, timeout=2).get("/health")[0] == 200, 30, what=f"{key} to listen")
    wait_until(lambda: Client(gw_port, timeout=5).get("/dashboard/login")[0] == 200, 30,
               what="the gateway to route /dashboard/ to the dashboard")
    return port


class Platform(AppsClient):
    wait_timeout = 60.0

    def __init__(self, cluster, orch: int):
        self.cluster, self.orch = cluster, orch
        self.gw = self.dash = 0
        self.tenant = f"acme-{uuid.uuid4().hex[:6]}"
        self.other = f"beta-{uuid.uuid4().hex[:6]}"
        self.developer = f"dev-{uuid.uuid4().hex[:6]}"
        self.passwords: dict[str, str] = {"admin": ADMIN_PASSWORD}

    @property
    def url(self) -> str:
        """The dashboard through the gateway."""
        return f"http://127.0.0.1:{self.gw}/dashboard/"

    def session(self, username: str | None = None) -> "Session":
        s = Session(self)
        if username is not None:
            s.login(username, self.passwords[username])
        return s


class Session:
    """Sign in through the form, keep the cookie, send the CSRF token."""

    def __init__(self, p: Platform):
        self.p = p
        self.http = requests.Session()
        self.csrf: str | None = None

    def _url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.p.gw}{path}"

    def _remember(self, r: requests.Response) -> requests.Response:
        m = _CSRF.search(r.text) if "text/html" in r.headers.get("Content-Type", "") else None
        if m:
            self.csrf = m.group(1)
        return r

    def get(self, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 30)
        return self._remember(self.http.get(self._url(path), **kw))

    def post(self, path: str, data: dict | None = None, *, csrf: bool = True, **kw) -> requests.Response:
        data = dict(data or {})
        if csrf:
            if self.csrf is None:
                self.get("/dashboard/login")
            data.setdefault("csrf_token", self.csrf)
        kw.setdefault("timeout", 60)
        return self._remember(self.http.post(self._url(path), data=data, **kw))

    def login(self, username: str, password: str) -> requests.Response:
        self.get("/dashboard/login")
        r = self.post("/dashboard/login", {"username": username, "password": password})
        assert r.status_code == 200 and "/dashboard/login" not in r.url, (username, r.status_code, r.text[:400])
        return r


@contextlib.contextmanager
def dashboard_platform(tmp_path: Path, *, deploy_shop: bool = True, orchestrator_env: dict | None = None,
                       **dashboard_env):
    """The platform described in the module doc; yields a Platform.
    `orchestrator_env` goes to the orchestrator (e.g. STRATUS_PROMETHEUS_SD_DIR),
    `dashboard_env` to the dashboard (e.g. STRATUS_PROMETHEUS_URL)."""
    cluster = LocalCluster(tmp_path, health_interval=0.5, admin_password=ADMIN_PASSWORD)
    cluster.log_dir = cluster.settings.state_path / "logs"    # where the logs route reads the components
    cluster.log_dir.mkdir(parents=True, exist_ok=True)
    try:
        with real_orchestrator(cluster, **(orchestrator_env or {})) as orch:
            p = Platform(cluster, orch)

            def created(path, body, key):
                status, answer, _ = p.api("POST", path, body)
                if status == 201:
                    p.passwords[key] = answer["password"]
                    return True
                return None
            for name in (p.tenant, p.other):
                wait_until(lambda: created("/api/v1/tenants", {"name": name}, name), 90, 0.5,
                           what=f"tenant {name} created")
            wait_until(lambda: created("/api/v1/developers", {"username": p.developer}, p.developer), 30, 0.5,
                       what="a developer account")
            p.gw = start_gateway(cluster, "gateway")
            p.dash = start_dashboard(cluster, p.gw, **dashboard_env)
            if deploy_shop:
                manifest, package = shop_package()
                builtin.deploy(f"http://127.0.0.1:{orch}", p.tenant, "shop", manifest, package)
                p.wait_running("web", 2)
                p.wait_running("jobs", 1)
                wait_until(lambda: p.gateway("GET", "/shop")[0] == 200 or None, 30, 0.1, what="the shop through the gateway")
            yield p
    finally:
        cluster.close()


def prometheus_url() -> str | None:
    """The Prometheus of STRATUS_PROMETHEUS_URL when it answers, else None."""
    import urllib.request
    from bus.settings import load
    url = load().prometheus_url.rstrip("/")
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
            return url if r.status == 200 else None
    except OSError:
        return None


def prometheus_sd_dir(url: str) -> Path | None:
    """The directory the running Prometheus's file_sd_configs read (its
    running config), where a test cluster's orchestrator must write its
    targets for that Prometheus to scrape them; None when it has none."""
    import urllib.request
    import yaml
    with urllib.request.urlopen(f"{url}/api/v1/status/config", timeout=5) as r:
        cfg = yaml.safe_load(json.loads(r.read())["data"]["yaml"])
    for job in cfg.get("scrape_configs", []):
        for sd in job.get("file_sd_configs", []):
            for pattern in sd.get("files", []):
                return Path(pattern).parent
    return None


class Traffic:
    """Requests to the gateway from a background thread at about `rate` per
    second, for at most `limit` seconds (bounded), until stopped."""

    def __init__(self, gw: int, paths: list[str], rate: float = 10.0, limit: float = 300.0):
        import threading
        self.gw, self.paths, self.rate, self.limit = gw, paths, rate, limit
        self.sent = 0
        self.statuses: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        c = Client(self.gw, timeout=10)
        i = 0
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                status = c.get(self.paths[i % len(self.paths)])[0]
            except OSError:
                c.close()
                c = Client(self.gw, timeout=10)
                status = 0
            self.statuses[status] = self.statuses.get(status, 0) + 1
            self.sent += 1
            i += 1
            self._stop.wait(1.0 / self.rate)
        c.close()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(15)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values`: stratus.measure.percentile, the one copy."""
    from stratus.measure import percentile as nearest_rank
    return nearest_rank(sorted(values), q * 100)


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out
