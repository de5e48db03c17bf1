"""The Docker stage's Swarm kit: a single-node swarm for the length of a
test module, and one stack (compose/docker-stack.yml) deployed on it under
names of its own.

  swarm()        a context: `docker swarm init --advertise-addr 127.0.0.1`
                 unless this engine is in a swarm already; on exit, `docker
                 swarm leave --force`, only when it was this kit that joined.
  SwarmStack     `docker stack deploy` with its own stack name, cluster
                 (STRATUS_CLUSTER), overlay network and free host ports; it
                 looks at its services by label (stratus.cluster=<cluster> for
                 what the orchestrator runs, com.docker.stack.namespace=<stack>
                 for the stack's own), and teardown() removes exactly those,
                 their volumes, configs and network. Every wait is bounded."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import uuid

from dockerkit import ADMIN_PASSWORD, LOG_DIR, ROOT, Http, free_port, image_env, run, wait_for

STACK_FILE = ROOT / "compose" / "docker-stack.yml"


def swarm_state() -> str:
    return run(["docker", "info", "--format", "{{.Swarm.LocalNodeState}}"], timeout=30).stdout.strip()


@contextlib.contextmanager
def swarm():
    joined = False
    if swarm_state() != "active":
        run(["docker", "swarm", "init", "--advertise-addr", "127.0.0.1"], timeout=60)
        joined = True
    try:
        yield
    finally:
        if joined:
            run(["docker", "swarm", "leave", "--force"], check=False, timeout=60)


class SwarmStack:
    def __init__(self, name_hint: str, **settings):
        self.id = f"sw{name_hint}{uuid.uuid4().hex[:6]}".lower()
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
        self.gateway = Http(f"http://127.0.0.1:{self.gateway_port}")
        self.orchestrator = Http(f"http://127.0.0.1:{self.orchestrator_port}")

    # --- the stack -------------------------------------------------------------------
    def deploy(self) -> None:
        run(["docker", "stack", "deploy", "-c", str(STACK_FILE), self.id], env=self.env, cwd=ROOT, timeout=180)

    def admin_token(self) -> str:
        status, body = self.gateway.post("/api/v1/auth/token", {"username": "admin", "password": ADMIN_PASSWORD})
        assert status == 200 and body.get("role") == "admin", (status, body)
        return body["token"]

    def cluster(self) -> dict:
        status, body = self.orchestrator.get("/api/v1/cluster")
        assert status == 200, (status, body)
        return body

    def wait_served(self, timeout: float = 300) -> None:
        wait_for(lambda: self.gateway.get("/health")[0] == 200, timeout, what="the gateway's /health")
        wait_for(lambda: self.gateway.get("/api/v1/rides?source=1&destination=2")[0] in (200, 204), timeout,
                 what="GET rides through the gateway")
        wait_for(lambda: self.gateway.get("/api/v1/users")[0] in (200, 204), timeout,
                 what="GET users through the gateway")

    # --- looking ---------------------------------------------------------------------
    def service_container(self, service: str) -> str:
        """The id of the one running container of the stack's `service` (on this node)."""
        ids = run(["docker", "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={self.id}_{service}"],
                  timeout=60).stdout.split()
        assert len(ids) == 1, f"{service}: {ids}"
        return ids[0]

    def services(self, *labels: str) -> list[dict]:
        """The orchestrator's services of this cluster (workers, app roles),
        optionally narrowed by more labels: [{id, name, labels, replicas, running}]."""
        args = ["docker", "service", "ls", "-q", "--filter", f"label=stratus.cluster={self.id}"]
        for lb in labels:
            args += ["--filter", f"label={lb}"]
        ids = run(args, timeout=60).stdout.split()
        if not ids:
            return []
        out = []
        for s in json.loads(run(["docker", "service", "inspect", *ids], check=False, timeout=60).stdout or "[]"):
            spec = s["Spec"]
            tasks = run(["docker", "service", "ps", "-q", "--filter", "desired-state=running", s["ID"]],
                        check=False, timeout=60).stdout.split()
            running = 0
            if tasks:
                for t in json.loads(run(["docker", "inspect", *tasks], check=False, timeout=60).stdout or "[]"):
                    running += t["Status"]["State"] == "running"
            out.append({"id": s["ID"], "name": spec["Name"], "labels": spec.get("Labels") or {},
                        "replicas": ((spec.get("Mode") or {}).get("Replicated") or {}).get("Replicas"),
                        "running": running})
        return out

    def worker_services(self) -> list[dict]:
        return self.services("stratus.role=worker")

    def role_services(self, **labels: str) -> list[dict]:
        return self.services("stratus.kind=role", *(f"stratus.label.{k}={v}" for k, v in labels.items()))

    # --- cleanup ---------------------------------------------------------------------
    def save_logs(self) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        path = LOG_DIR / f"{self.id}.log"
        with path.open("w") as f:
            names = run(["docker", "service", "ls", "--format", "{{.Name}}"], check=False).stdout.split()
            for name in names:
                if name.startswith(f"{self.id}_") or name.startswith(f"stratus-{self.id}-"):
                    try:   # diagnostics only: a log that will not come does not fail the test
                        p = run(["docker", "service", "logs", "--no-task-ids", "--tail", "3000", name], check=False,
                                timeout=60)
                        f.write(f"===== {name}\n{p.stdout}\n{p.stderr}\n")
                    except subprocess.TimeoutExpired:
                        f.write(f"===== {name}\n(docker service logs gave nothing within 60 s)\n")
        print(f"logs of {self.id}: {path}")

    def leftovers(self) -> dict[str, list[str]]:
        def names(args):
            return [n for n in run(args, check=False).stdout.split() if n]
        services = names(["docker", "service", "ls", "-q", "--filter", f"label=stratus.cluster={self.id}"])
        services += names(["docker", "service", "ls", "-q", "--filter", f"label=com.docker.stack.namespace={self.id}"])
        containers = names(["docker", "ps", "-aq", "--filter", f"label=stratus.cluster={self.id}"])
        containers += names(["docker", "ps", "-aq", "--filter", f"label=com.docker.stack.namespace={self.id}"])
        vols = names(["docker", "volume", "ls", "-q", "--filter", f"label=stratus.cluster={self.id}"])
        vols += names(["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.stack.namespace={self.id}"])
        nets = names(["docker", "network", "ls", "-q", "--filter", f"name=^{self.network}$"])
        configs = names(["docker", "config", "ls", "-q", "--filter", f"label=com.docker.stack.namespace={self.id}"])
        return {"services": sorted(set(services)), "containers": sorted(set(containers)),
                "volumes": sorted(set(vols)), "networks": nets, "configs": configs}

    def teardown(self) -> dict[str, list[str]]:
        """`docker stack rm`, then whatever the orchestrator's services left
        (a stack removed whole stops ZooKeeper with the orchestrator, which
        then cannot tell it still leads, so it leaves its roles: by design a
        non-leader never removes them). Returns what had to be removed by hand
        besides those, after the stack's own went."""
        run(["docker", "stack", "rm", self.id], check=False, timeout=120)
        # Its containers too: the orchestrator may run for its grace period yet.
        wait_for(lambda: not run(["docker", "ps", "-aq", "--filter", f"label=com.docker.stack.namespace={self.id}"],
                                 check=False).stdout.split(), 120, what="the stack's containers to go")
        ours = run(["docker", "service", "ls", "-q", "--filter", f"label=stratus.cluster={self.id}"],
                   check=False).stdout.split()
        if ours:
            run(["docker", "service", "rm", *ours], check=False, timeout=120)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            left = self.leftovers()
            if not left["containers"]:
                break
            time.sleep(1)
        left = self.leftovers()
        if left["containers"]:
            run(["docker", "rm", "-f", "-v", *left["containers"]], check=False)
        for _ in range(20):     # a volume stays "in use" until its task's container is gone
            left = self.leftovers()
            if not left["volumes"]:
                break
            run(["docker", "volume", "rm", "-f", *left["volumes"]], check=False)
            time.sleep(1)
        if left["configs"]:
            run(["docker", "config", "rm", *left["configs"]], check=False)
        if left["networks"]:
            run(["docker", "network", "rm", *left["networks"]], check=False)
        images = run(["docker", "image", "ls", "-q", "--filter", f"label=stratus.cluster={self.id}"],
                     check=False).stdout.split()
        if images:
            run(["docker", "image", "rm", "-f", *sorted(set(images))], check=False)
        final = self.leftovers()
        return {k: v for k, v in final.items() if v}
