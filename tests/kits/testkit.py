"""Helpers for the gateway's tests and benchmark: start a real gateway and
real registered upstreams as processes of a test cluster (tests/harness.py
LocalCluster), and talk to them over plain keep-alive HTTP."""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
from pathlib import Path

from stratus.measure import wait_for
from bus.ports import free_port  # noqa: F401  (tests and the benchmark import it from here)

TRIVIAL_UPSTREAM = Path(__file__).resolve().with_name("trivial_upstream.py")


def wait_until(pred, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    """stratus.measure.wait_for, where a server not answering yet (a refused
    connection, a cut answer, a body that is not JSON yet) counts as not yet."""
    return wait_for(pred, timeout, interval, what, errors=(OSError, http.client.HTTPException, ValueError))


class Client:
    """One keep-alive HTTP connection; JSON in and out."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 15.0):
        self.host, self.port, self.timeout = host, port, timeout
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout)

    def request(self, method: str, path: str, body=None, headers: dict | None = None):
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        hdrs = dict(headers or {})
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        self._drop_if_closed()
        self.conn.request(method, path, body=data, headers=hdrs)
        resp = self.conn.getresponse()
        raw = resp.read()
        if resp.will_close:
            self.conn.close()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw
        return resp.status, parsed, resp

    def _drop_if_closed(self) -> None:
        # Like urllib3: a pooled connection the server has closed while it was
        # idle (a keep-alive timeout) is replaced before it is reused.
        sock = self.conn.sock
        if sock is None:
            return
        import select
        try:
            readable = select.select([sock], [], [], 0)[0]
        except (OSError, ValueError):
            readable = [sock]
        if readable:
            self.conn.close()

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def close(self):
        self.conn.close()


BUILTIN_ROUTES = {
    ("rideshare", "rideshare"): {"/api/v1/users": ("users", "users"), "/api/v1/rides": ("rides", "rides")},
    ("toystore", "toystore"): {"/products": ("catalog", "catalog"), "/orders": ("order", "order")},
}


def route_builtins(cluster) -> None:
    """Publish the built-in apps' routes (bus/routing.py, by "test") to the
    services as tests start them directly: registered as users, rides,
    catalog and order. `stratus up` deploys them as apps instead."""
    from bus import routing
    for (tenant, app), routes in BUILTIN_ROUTES.items():
        routing.publish(cluster.zk, cluster.paths, tenant, app, routes, by="test")


def start_gateway(cluster, key: str = "gateway", **env) -> int:
    """A gateway process on a free port, answering /health, with the built-in
    apps' routes published (route_builtins); returns the port."""
    route_builtins(cluster)
    port = free_port()
    env = {k if k.startswith("STRATUS_") else f"STRATUS_GATEWAY_{k.upper()}": str(v) for k, v in env.items()}
    cluster.spawn(key, ["-m", "gateway", "--port", str(port)], **env)
    wait_until(lambda: Client(port, timeout=2).get("/health")[0] == 200, 30, what=f"{key} to listen")
    return port


def start_upstream(cluster, key: str, service: str, *args: str, **env) -> int:
    """A trivial upstream registered as `service`; returns its port once it
    is listening and registered."""
    port = free_port()
    cluster.spawn(key, [str(TRIVIAL_UPSTREAM), "--service", service, "--port", str(port), *args], **env)
    wait_until(lambda: Client(port, timeout=2).get("/health")[0] == 200, 30, what=f"{key} to listen")
    path = cluster.paths.service(service)
    wait_until(lambda: any(c.startswith(f"127.0.0.1:{port}-") for c in (cluster.zk.get_children(path)
                                                                          if cluster.zk.exists(path) else [])),
               15, what=f"{key} to register")
    return port


def healthy_count(gw_port: int, service: str) -> int:
    status, body, _ = Client(gw_port, timeout=2).get("/health")
    return body["upstreams"].get(service, {}).get("healthy", 0) if status == 200 else 0


def wait_healthy(gw_port: int, service: str, n: int, timeout: float = 20.0) -> None:
    wait_until(lambda: healthy_count(gw_port, service) == n, timeout, what=f"{n} healthy {service} instances")


@contextlib.contextmanager
def real_orchestrator(cluster, **env):
    """A real orchestrator (`python -m orchestrator`) of the test cluster, which
    starts the cluster's DB workers; yields its port. On exit it is stopped
    cleanly (it stops the workers it started), and any worker of this cluster
    still alive is killed."""
    port = free_port()
    proc = cluster.spawn("orch", ["-m", "orchestrator"], STRATUS_ORCHESTRATOR_PORT=str(port), **env)
    try:
        yield port
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        marker = f"STRATUS_CLUSTER={cluster.name}".encode()
        for d in Path("/proc").iterdir():
            try:
                if d.name.isdigit() and b"worker" in (d / "cmdline").read_bytes() and \
                        marker in (d / "environ").read_bytes().split(b"\0"):
                    os.kill(int(d.name), signal.SIGKILL)
            except OSError:
                continue
