"""Helpers for the Docker stage: compose projects with unique names, a small
HTTP client, the RideShare grader sequence, and cleanup by label and project.

Every test stack gets its own compose project name, network name
(STRATUS_NETWORK), cluster name (STRATUS_CLUSTER, which labels the worker and
app instance containers, the workers' volumes and the app images the
orchestrator builds) and free host ports, so tests never touch anything they
did not start. Every wait is bounded.

In compose/ the built-in apps are deployed through the API (the one-shot
`deploy` service) and run as the orchestrator's instance containers. The
per-directory files run users, rides, catalog and order directly instead:
each registers itself under its own name, and `publish_builtin_routes`
publishes the route entries that send the built-in paths to those names
(bus/routing.py, by "test"), as tests/kits/testkit.py route_builtins does for
the process suites."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

from bus.ports import free_port  # noqa: F401  (the Docker tests import it from here)
from stratus.measure import wait_for as _wait_for

ROOT = Path(__file__).resolve().parents[3]
LOG_DIR = ROOT / ".docker-cache" / "test-logs"
ADMIN_PASSWORD = "docker-stage-admin"
PASSWORD = "3d725109c7e7c0bfb9d709836735b56d943d263f"  # a SHA-1 hex
# The built-in paths -> the services that users/, rides/, catalog/ and order/
# register when run directly (as tests/kits/testkit.py BUILTIN_ROUTES).
BUILTIN_ROUTES = {
    ("rideshare", "rideshare"): {"/api/v1/users": ("users", "users"), "/api/v1/rides": ("rides", "rides")},
    ("toystore", "toystore"): {"/products": ("catalog", "catalog"), "/orders": ("order", "order")},
}
# Run inside the orchestrator's container (it has bus, and the stack's
# ZooKeeper address and cluster in its environment): publish argv[1]'s routes.
_PUBLISH = """
import json, sys
from bus import routing, zk
from bus.names import Paths
from bus.settings import load
s = load()
c = zk.connect(s)
try:
    for e in json.loads(sys.argv[1]):
        routing.publish(c, Paths(s.cluster), e["tenant"], e["app"], e["routes"], by="test")
        print("published", e["tenant"], e["app"], sorted(e["routes"]))
finally:
    c.stop()
    c.close()
"""

# Run inside a container of the stack: Prometheus's active targets, as JSON.
_TARGETS = """
import json, urllib.request
with urllib.request.urlopen("http://prometheus:9090/api/v1/targets?state=active", timeout=10) as r:
    data = json.load(r)["data"]["activeTargets"]
print(json.dumps([{"job": t["labels"].get("job"), "instance": t["labels"].get("instance"), "health": t["health"],
                   "labels": t["labels"], "error": t.get("lastError", "")} for t in data]))
"""


def wait_for(pred, timeout: float, interval: float = 0.5, what: str = "condition"):
    """stratus.measure.wait_for, where any exception is a service not answering yet."""
    return _wait_for(pred, timeout, interval, what, errors=(Exception,))


def run(cmd: list[str], *, env=None, cwd=None, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def compose_cmd() -> list[str]:
    """docker-compose (1.29) when installed, else `docker compose` (v2);
    STRATUS_COMPOSE overrides (e.g. STRATUS_COMPOSE="docker compose")."""
    if os.environ.get("STRATUS_COMPOSE"):
        return os.environ["STRATUS_COMPOSE"].split()
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return ["docker", "compose"]


def docker_available() -> str | None:
    """None when a Docker engine answers, else why not."""
    if not shutil.which("docker"):
        return "no docker CLI"
    try:
        p = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                           timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker info: {exc}"
    return None if p.returncode == 0 else f"docker info: {p.stderr.strip()[:300]}"


def image_env() -> dict[str, str]:
    """The image names scripts/docker-images.sh built (its env file), unless
    already in the environment."""
    env = {}
    f = ROOT / ".docker-cache" / "images.env"
    if f.exists():
        for line in f.read_text().splitlines():
            if "=" in line and not line.startswith("#"):
                k, v = line.split("=", 1)
                env[k.strip()] = v.strip()
    env.update({k: v for k, v in os.environ.items() if k.startswith("STRATUS_") and k in env})
    return env


class Http:
    def __init__(self, base: str, token: str | None = None, timeout: float = 15):
        self.base = base.rstrip("/")
        self.token = token
        self.timeout = timeout

    def request(self, method: str, path: str, body=None) -> tuple[int, object]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode(errors="replace")
        return status, parsed

    def get(self, path):
        return self.request("GET", path)

    def post(self, path, body=None):
        return self.request("POST", path, body if body is not None else {})

    def put(self, path, body):
        return self.request("PUT", path, body)

    def delete(self, path):
        return self.request("DELETE", path)


def future_timestamp(days: int = 365) -> str:
    return (datetime.now(timezone.utc) + timedelta(days=days)).strftime("%d-%m-%Y:%S-%M-%H")


def grader_sequence(gw: Http, tag: str) -> None:
    """The RideShare grader sequence through the gateway."""
    user = f"grader{tag}"
    src, dst = 17, 42
    assert gw.put("/api/v1/users", {"username": user, "password": PASSWORD}) == (201, {})
    ts = future_timestamp()
    status, body = gw.post("/api/v1/rides", {"created_by": user, "timestamp": ts, "source": str(src),
                                            "destination": str(dst)})
    assert (status, body) == (201, {}), (status, body)
    status, rides = gw.get(f"/api/v1/rides?source={src}&destination={dst}")
    assert status == 200, (status, rides)
    mine = [r for r in rides if r["username"] == user and r["timestamp"] == ts]
    assert len(mine) == 1 and isinstance(mine[0]["rideId"], int), rides
    ride_id = mine[0]["rideId"]
    status, ride = gw.get(f"/api/v1/rides/{ride_id}")
    assert status == 200 and ride["rideId"] == ride_id and ride["created_by"] == user, (status, ride)
    assert str(ride["source"]) == str(src) and str(ride["destination"]) == str(dst), ride
    assert gw.delete(f"/api/v1/rides/{ride_id}") == (200, {})
    assert gw.delete(f"/api/v1/users/{user}") == (200, {})
    status, _ = gw.delete(f"/api/v1/users/{user}")
    assert status == 400
    status, body = gw.get("/api/v1/rides?source=101&destination=102")
    assert status == 204 and body is None, (status, body)


def toystore_smoke(gw: Http) -> None:
    """The toy store through the gateway: a product, an order of it, the order back."""
    status, body = gw.get("/products/Tux")
    assert status == 200 and body["data"]["name"] == "Tux", (status, body)
    status, body = gw.post("/orders", {"name": "Tux", "quantity": 1})
    assert status == 200 and isinstance(body["data"]["order_number"], int), (status, body)
    n = body["data"]["order_number"]
    status, body = gw.get(f"/orders/{n}")
    assert status == 200 and body["data"] == {"number": n, "name": "Tux", "quantity": 1}, (status, body)


class Stack:
    """One test's containers: one or more compose projects sharing a network
    and a cluster name, plus the worker containers the orchestrator starts."""

    def __init__(self, name_hint: str, **settings):
        self.id = f"st{name_hint}{uuid.uuid4().hex[:6]}".lower()
        self.network = f"{self.id}-net"
        self.gateway_port = free_port()
        self.orchestrator_port = free_port()
        self.env = {**os.environ, **image_env(),
                    "STRATUS_NETWORK": self.network,
                    "STRATUS_CLUSTER": self.id,
                    "STRATUS_GATEWAY_HOST_PORT": str(self.gateway_port),
                    "STRATUS_ORCHESTRATOR_HOST_PORT": str(self.orchestrator_port),
                    "STRATUS_ADMIN_PASSWORD": ADMIN_PASSWORD}
        for k, v in settings.items():
            self.env[f"STRATUS_{k.upper()}"] = str(v)
        self.env.setdefault("STRATUS_DOCKER_GID", str(_socket_gid()))
        self.projects: list[tuple[str, Path]] = []   # (project name, directory), in bring-up order
        self.gateway = Http(f"http://127.0.0.1:{self.gateway_port}")
        self.orchestrator = Http(f"http://127.0.0.1:{self.orchestrator_port}")

    # --- compose ---------------------------------------------------------------------
    def project(self, directory: str) -> str:
        return f"{self.id}-{Path(directory).name}"

    def compose(self, directory: str, *args: str, timeout: float = 300, check: bool = True):
        d = ROOT / directory
        return run([*compose_cmd(), "-p", self.project(directory), "-f", str(d / "docker-compose.yml"), *args],
                   env=self.env, cwd=d, timeout=timeout, check=check)

    def up(self, directory: str, timeout: float = 300) -> None:
        if (self.project(directory), ROOT / directory) not in self.projects:
            self.projects.append((self.project(directory), ROOT / directory))
        self.compose(directory, "up", "-d", timeout=timeout)

    def down(self, directory: str, timeout: float = 120) -> None:
        self.compose(directory, "down", "-v", "--remove-orphans", "-t", "45", timeout=timeout)

    # --- the platform ----------------------------------------------------------------
    def admin_token(self) -> str:
        status, body = self.gateway.post("/api/v1/auth/token", {"username": "admin", "password": ADMIN_PASSWORD})
        assert status == 200 and body.get("role") == "admin", (status, body)
        return body["token"]

    def wait_gateway(self, timeout: float = 120) -> None:
        wait_for(lambda: self.gateway.get("/health")[0] == 200, timeout, what="the gateway's /health")

    def wait_toystore(self, timeout: float = 120) -> None:
        wait_for(lambda: self.gateway.get("/products/Tux")[0] == 200, timeout, what="the catalog behind the gateway")
        # The order service answers a bad body 400; the gateway, before it routes /orders, 404.
        wait_for(lambda: self.gateway.post("/orders", {})[0] == 400, timeout, what="the orders behind the gateway")

    def wait_rideshare(self, timeout: float = 120) -> None:
        """Users and rides registered behind the gateway and the DB answering."""
        wait_for(lambda: self.gateway.get("/api/v1/rides?source=1&destination=2")[0] in (200, 204), timeout,
                 what="GET rides through the gateway")
        wait_for(lambda: self.gateway.get("/api/v1/users")[0] in (200, 204), timeout,
                 what="GET users through the gateway")

    def cluster(self) -> dict:
        status, body = self.orchestrator.get("/api/v1/cluster")
        assert status == 200, (status, body)
        return body

    def worker_containers(self, all_: bool = False) -> list[dict]:
        """This stack's worker containers: [{id, name, worker_id, pid, status}]."""
        args = ["docker", "ps", "-q", "--filter", f"label=stratus.cluster={self.id}",
                "--filter", "label=stratus.role=worker"]
        if all_:
            args.insert(2, "-a")
        ids = run(args).stdout.split()
        if not ids:
            return []
        p = run(["docker", "inspect", *ids], check=False)
        out = []
        for c in json.loads(p.stdout or "[]"):
            out.append({"id": c["Id"], "name": c["Name"].lstrip("/"),
                        "worker_id": c["Config"]["Labels"].get("stratus.worker_id"),
                        "pid": c["State"]["Pid"], "status": c["State"]["Status"]})
        return out

    def running_workers(self) -> list[dict]:
        return [c for c in self.worker_containers() if c["status"] == "running"]

    def instance_containers(self, all_: bool = False, **labels: str) -> list[dict]:
        """This stack's app instance containers (orchestrator/runtimes/docker.py),
        optionally of a tenant, app or role: [{id, name, instance, tenant, app,
        role, image, pid, status}]."""
        args = ["docker", "ps", "-q", "--filter", f"label=stratus.cluster={self.id}",
                "--filter", "label=stratus.kind=instance"]
        for k, v in labels.items():
            args += ["--filter", f"label=stratus.label.{k}={v}"]
        if all_:
            args.insert(2, "-a")
        ids = run(args).stdout.split()
        if not ids:
            return []
        p = run(["docker", "inspect", *ids], check=False)
        out = []
        for c in json.loads(p.stdout or "[]"):
            lb = c["Config"]["Labels"]
            out.append({"id": c["Id"], "name": c["Name"].lstrip("/"), "instance": lb.get("stratus.instance_id"),
                        "tenant": lb.get("stratus.label.tenant"), "app": lb.get("stratus.label.app"),
                        "role": lb.get("stratus.label.role"), "image": c["Config"]["Image"],
                        "pid": c["State"]["Pid"], "status": c["State"]["Status"]})
        return out

    def container_of(self, directory: str, service: str) -> str:
        """The id of the one running container of `service` in `directory`'s project."""
        ids = run(["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={self.project(directory)}",
                   "--filter", f"label=com.docker.compose.service={service}"]).stdout.split()
        assert len(ids) == 1, f"{service} of {self.project(directory)}: {ids}"
        return ids[0]

    def python_in(self, directory: str, service: str, code: str, *args: str, timeout: float = 60) -> str:
        """Run `python -c code args...` in `service`'s container (an image
        built on stratus/app) and return its stdout: a look from inside the
        stack's network, at what is not published on the host."""
        return run(["docker", "exec", self.container_of(directory, service), "python", "-c", code, *args],
                   timeout=timeout).stdout

    def prometheus_targets(self, directory: str = "compose", via: str = "orchestrator") -> list[dict]:
        """Prometheus's active targets (GET http://prometheus:9090/api/v1/targets,
        from `via`'s container): [{job, instance, health, labels, error}]."""
        out = self.python_in(directory, via, _TARGETS, timeout=30)
        return json.loads(out)

    def publish_builtin_routes(self, directory: str = "orchestrator") -> None:
        """Route the built-in paths to the directly run services (see the
        module docstring), from inside the orchestrator's container."""
        entries = [{"tenant": t, "app": a, "routes": {p: list(v) for p, v in routes.items()}}
                   for (t, a), routes in BUILTIN_ROUTES.items()]
        out = run(["docker", "exec", self.container_of(directory, "orchestrator"), "python", "-c", _PUBLISH,
                   json.dumps(entries)], timeout=60).stdout
        assert out.count("published") == len(entries), out

    # --- cleanup ---------------------------------------------------------------------
    def save_logs(self) -> Path:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        path = LOG_DIR / f"{self.id}.log"
        with path.open("w") as f:
            for project, d in self.projects:
                p = run([*compose_cmd(), "-p", project, "-f", str(d / "docker-compose.yml"), "logs", "--no-color",
                         "--tail", "300"], env=self.env, cwd=d, check=False, timeout=60)
                f.write(f"===== {project}\n{p.stdout}\n{p.stderr}\n")
            for c in self.worker_containers(all_=True):
                p = run(["docker", "logs", "--tail", "200", c["id"]], check=False, timeout=30)
                f.write(f"===== worker {c['name']}\n{p.stdout}\n{p.stderr}\n")
            for c in self.instance_containers(all_=True):
                p = run(["docker", "logs", "--tail", "200", c["id"]], check=False, timeout=30)
                f.write(f"===== instance {c['name']} ({c['tenant']}/{c['app']}/{c['role']})\n{p.stdout}\n{p.stderr}\n")
        return path

    def leftovers(self) -> dict[str, list[str]]:
        """Whatever of this stack still exists."""
        def names(args):
            return [n for n in run(args, check=False).stdout.split() if n]
        containers = names(["docker", "ps", "-aq", "--filter", f"label=stratus.cluster={self.id}"])
        vols = names(["docker", "volume", "ls", "-q", "--filter", f"label=stratus.cluster={self.id}"])
        for project, _ in self.projects:
            containers += names(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"])
            vols += names(["docker", "volume", "ls", "-q", "--filter",
                           f"label=com.docker.compose.project={project}"])
        nets = names(["docker", "network", "ls", "-q", "--filter", f"name=^{self.network}$"])
        # the tenants' networks the orchestrator made (orchestrator/runtimes/docker.py)
        nets += names(["docker", "network", "ls", "-q", "--filter", f"label=stratus.cluster={self.id}"])
        return {"containers": sorted(set(containers)), "volumes": sorted(set(vols)), "networks": nets}

    def teardown(self) -> dict[str, list[str]]:
        """`down -v` every project (last first), then report and remove
        anything left: the worker and instance containers are the
        orchestrator's to remove. The app images the orchestrator built for
        this cluster (labelled with it) are kept by design (a tag cache);
        the test's are removed here and not reported."""
        for project, d in reversed(self.projects):
            run([*compose_cmd(), "-p", project, "-f", str(d / "docker-compose.yml"), "down", "-v",
                 "--remove-orphans", "-t", "45"], env=self.env, cwd=d, check=False, timeout=180)
        left = self.leftovers()
        if left["containers"]:
            run(["docker", "rm", "-f", "-v", *left["containers"]], check=False)
        if left["volumes"]:
            run(["docker", "volume", "rm", "-f", *left["volumes"]], check=False)
        if left["networks"]:
            run(["docker", "network", "rm", *left["networks"]], check=False)
        images = run(["docker", "image", "ls", "-q", "--filter", f"label=stratus.cluster={self.id}"],
                     check=False).stdout.split()
        if images:
            run(["docker", "image", "rm", "-f", *sorted(set(images))], check=False)
        return {k: v for k, v in left.items() if v}


def _socket_gid() -> int:
    try:
        return os.stat("/var/run/docker.sock").st_gid
    except OSError:
        return 0
