"""A standby orchestrator that takes over adopts the running app instances
and restarts none of them (issue 15, Controller); it then keeps them, as the
old leader did: a killed instance is replaced by the new leader."""
from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

from harness import wait_for
from kits.testkit import Client, start_gateway
from stratus import builtin
from kits.appskit import shop_package
from test_orchestrator import Orch, cleanup


def instance_pids_of(cluster) -> set[int]:
    """Live app instances of this cluster (matched by their environment): each
    instance's first process, the leader of its own process group (the
    processes inside its walls are in that group too, and are not counted)."""
    found = set()
    marker = f"STRATUS_CLUSTER={cluster.name}".encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            if (marker in env and any(e.startswith(b"STRATUS_INSTANCE=") for e in env)
                    and os.getpgid(int(d.name)) == int(d.name)):
                if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    found.add(int(d.name))
        except OSError:
            continue
    return found


def test_a_standby_adopts_the_instances_and_restarts_none(cluster):
    a = Orch(cluster, "orch-a")
    b = None
    tenant = f"ha-{uuid.uuid4().hex[:6]}"
    try:
        a.wait_healthy_cluster(1)
        wait_for(lambda: a.post("/api/v1/tenants", {"name": tenant})[0] == 201, 60, 0.5, what="the tenant")
        manifest, package = shop_package()
        view = builtin.deploy(f"http://127.0.0.1:{a.port}", tenant, "shop", manifest, package)
        assert view["roles"]["web"]["desired"] == 2
        builtin.wait_running(f"http://127.0.0.1:{a.port}", tenant, "shop", 30)
        gw = start_gateway(cluster, "gw")
        wait_for(lambda: Client(gw).get("/shop")[0] == 200, 10, 0.1, what="the app through the gateway")
        b = Orch(cluster, "orch-b")
        wait_for(lambda: b.view()["orchestrator"]["candidates"] == 2, 10, 0.1, what="two candidates")

        def instances(o):
            st, v, _ = o.get(f"/api/v1/tenants/{tenant}/apps/shop")
            assert st == 200, v
            return {i["id"]: i["pid"] for r in v["roles"].values() for i in r["instances"]}
        before = instances(a)
        assert len(before) == 3 and set(before.values()) == instance_pids_of(cluster)
        st, ev, _ = a.get(f"/api/v1/tenants/{tenant}/events")
        seq = ev["next"]

        os.killpg(a.proc.pid, signal.SIGKILL)
        a.proc.wait(10)
        wait_for(lambda: b.view()["orchestrator"]["leading"], 20, 0.05, what="the standby to lead")
        time.sleep(3)   # several ticks and probes of the new leader
        assert instances(b) == before
        assert instance_pids_of(cluster) == set(before.values())
        st, ev, _ = b.get(f"/api/v1/tenants/{tenant}/events?since={seq}")
        assert [e for e in ev["events"] if e["type"] in ("started", "restarted", "exited")] == [], ev
        served = {Client(gw).get("/shop")[1]["instance"] for _ in range(20)}
        assert served <= set(before) and len(served) == 2
        assert "app controller leading: 3 instances adopted" in cluster.log("orch-b")

        # The new leader keeps them: kill -9 of an adopted instance is seen and replaced.
        victim = next(iter(before))
        os.kill(before[victim], signal.SIGKILL)
        wait_for(lambda: victim not in instances(b) and len(instances(b)) == 3
                 and all(s == "running" for s in _states(b, tenant)), 20, 0.1, what="a replacement")
        st, ev, _ = b.get(f"/api/v1/tenants/{tenant}/events?since={seq}")
        assert any(e["type"] == "exited" and e["instance"] == victim for e in ev["events"]), ev
    finally:
        cleanup(cluster, *[o for o in (a, b) if o is not None])
        for pid in instance_pids_of(cluster):
            os.kill(pid, signal.SIGKILL)


def _states(o, tenant):
    st, v, _ = o.get(f"/api/v1/tenants/{tenant}/apps/shop")
    return [i["state"] for r in v["roles"].values() for i in r["instances"]]
