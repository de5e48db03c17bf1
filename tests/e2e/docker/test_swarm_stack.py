"""The whole platform on Docker Swarm (STRATUS_RUNTIME=swarm): one
`docker stack deploy -c compose/docker-stack.yml` on a single-node swarm that
the module joins and leaves. Against it: the RideShare grader sequence through
the gateway, with every DB worker a service of one replica; the dashboard
and Prometheus; crash/master while
clients write, with the set check (every acknowledged write is read back once,
nothing that was never sent appears); a tenant's app (tests/data/apps/shop)
whose web role is one replicated service, scaled to 3 replicas and served by
each, a killed task restarted by Swarm in its slot, and the app deleted."""
import json
import re
import threading
import time
from collections import Counter

import pytest
from dockerkit import ADMIN_PASSWORD, Http, docker_available, grader_sequence, run, wait_for
from swarmkit import SwarmStack, swarm

from kits.appskit import shop_package
from stratus import builtin

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def stack():
    why = docker_available()
    if why:
        pytest.skip(f"no Docker engine: {why}")
    with swarm():
        # A window long enough that the read load of the tests only ever adds
        # slaves: no drain can start under a test that compares worker sets.
        s = SwarmStack("st", max_slaves=2, scale_window=3600)
        try:
            t0 = time.monotonic()
            s.deploy()
            s.wait_served(300)
            print(f"docker stack deploy to the built-in apps served: {time.monotonic() - t0:.1f} s")
            yield s
        finally:
            s.save_logs()
            left = s.teardown()
            assert not left, f"the Swarm stack left these behind: {left}"


def test_grader_sequence_and_workers_are_one_replica_services(stack):
    grader_sequence(stack.gateway, "swarm")
    def settled():   # a slave started at the last tick may still be starting
        members = {w["id"] for w in stack.cluster()["workers"]}
        services = stack.worker_services()
        ids = {s["labels"]["stratus.worker_id"] for s in services}
        return (members, services) if members and ids == members and all(s["running"] == 1 for s in services) \
            else None
    members, services = wait_for(settled, 60, what="every member a worker service with its task running")
    for s in services:
        assert s["replicas"] == 1, s
        assert s["name"] == f"stratus-{stack.id}-{s['labels']['stratus.worker_id']}", s
    # The built-in apps' roles are replicated services of their own.
    roles = {s["labels"].get("stratus.label.role") for s in stack.role_services(tenant="rideshare")}
    assert {"users", "rides"} <= roles, roles


def test_the_dashboard_and_prometheus_run_on_the_swarm(stack):
    """The dashboard reached through the gateway (it registered under its
    task's hostname), an admin signed in; Prometheus, asked from inside the
    stack, scrapes the gateway, the orchestrator, every worker service and the
    apps' tasks at the addresses the orchestrator wrote."""
    import requests
    from dockerkit import _TARGETS
    wait_for(lambda: stack.gateway.get("/dashboard/login")[0] == 200, 120, what="the gateway to route /dashboard/")
    http = requests.Session()
    http.trust_env = False
    page = http.get(stack.gateway.base + "/dashboard/login", timeout=30).text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    r = http.post(stack.gateway.base + "/dashboard/login",
                  data={"username": "admin", "password": ADMIN_PASSWORD, "csrf_token": csrf}, timeout=30)
    assert r.status_code == 200 and r.url.endswith("/dashboard/tenants"), (r.status_code, r.url)
    assert "rideshare" in r.text and "toystore" in r.text, r.text[:500]

    orch = stack.service_container("orchestrator")

    def scraped():
        targets = json.loads(run(["docker", "exec", orch, "python", "-c", _TARGETS], timeout=60).stdout)
        up = {}
        for t in targets:
            if t["health"] == "up" and t["labels"].get("cluster", stack.id) == stack.id:
                up.setdefault(t["job"], set()).add(t["instance"].rsplit(":", 1)[0])
        workers = {s["name"] for s in stack.worker_services()}
        roles = {t["labels"].get("role") for t in targets if t["job"] == "app" and t["health"] == "up"}
        ok = (up.get("gateway") and up.get("orchestrator") and workers and workers <= up.get("worker", set())
              and {"users", "rides", "catalog", "order"} <= roles)
        return up if ok else None
    up = wait_for(scraped, 90, interval=2, what="Prometheus scraping every component of the stack")
    print(f"swarm: Prometheus targets up: { {k: len(v) for k, v in up.items()} }")


def test_crash_master_loses_no_acknowledged_write(stack):
    admin = Http(stack.gateway.base, stack.admin_token())
    wait_for(lambda: any(w["role"] == "slave" and w.get("ready") for w in stack.cluster()["workers"]), 120,
             what="a ready slave")
    view = stack.cluster()
    old = view["leader"]
    old_pid = next(w["pid"] for w in view["workers"] if w["id"] == old)
    attempted: list[str] = []
    acked: list[str] = []
    acked_after: list[str] = []
    crashed = threading.Event()
    stop = threading.Event()

    def writer(k: int):
        i = 0
        while not stop.is_set():
            name = f"sw{k}x{i}"
            i += 1
            attempted.append(name)
            try:
                status, _ = stack.gateway.put("/api/v1/users", {"username": name, "password": "b" * 40})
            except Exception:
                status = None
            if status == 201:
                acked.append(name)
                if crashed.is_set():
                    acked_after.append(name)
            time.sleep(0.02)

    threads = [threading.Thread(target=writer, args=(k,), daemon=True) for k in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(acked) >= 30, 60, what="30 acknowledged writes before the crash")
        t0 = time.monotonic()
        status, body = admin.post("/api/v1/crash/master")
        assert status == 200 and body == [str(old_pid)], (status, body)   # the pid of the master's container
        crashed.set()
        new = wait_for(lambda: (lambda l: l if l and l != old else None)(stack.cluster().get("leader")), 60,
                       interval=0.1, what="a new master")
        wait_for(lambda: len(acked_after) >= 30, 90, what="30 writes acknowledged after the crash")
        print(f"swarm crash/master: {old} -> {new}; writes acknowledged again "
              f"{time.monotonic() - t0:.1f} s after the crash (30 of them)")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    # The set check, read through the gateway: no acknowledged write lost, none
    # twice, and nothing that was never attempted.
    ours = set(attempted)

    def read():
        status, users = stack.gateway.get("/api/v1/users")
        if status != 200:
            return None
        mine = [u for u in users if u.startswith("sw") and "x" in u]
        return mine if set(acked) <= set(mine) else None
    mine = wait_for(read, 60, what=f"all {len(acked)} acknowledged users readable")
    lost = set(acked) - set(mine)
    duplicated = [u for u, n in Counter(mine).items() if n > 1]
    unexpected = set(mine) - ours
    assert (len(lost), len(duplicated), len(unexpected)) == (0, 0, 0), (lost, duplicated, unexpected)
    # The old master's service is gone, and a new worker service replaced it.
    wait_for(lambda: old not in {s["labels"]["stratus.worker_id"] for s in stack.worker_services()}, 60,
             what="the dead master's service to be removed")


def test_an_app_role_is_a_replicated_service_scaled_to_3(stack):
    api = stack.orchestrator
    tenant, app = "acme", "shop"
    status, body = api.post("/api/v1/tenants", {"name": tenant})
    assert status == 201, (status, body)
    manifest, package = shop_package()

    def running(n):
        status, v = api.get(f"/api/v1/tenants/{tenant}/apps/{app}")
        assert status == 200, (status, v)
        r = v["roles"]["web"]
        live = [i for i in r["instances"] if i["state"] == "running"]
        return live if r["running"] == n and len(live) == n == len(r["instances"]) else None

    def served(ids, tries=90):
        seen = set()
        for _ in range(tries):
            status, body = stack.gateway.get("/shop")
            if status == 200:
                seen.add(body["instance"])
            if seen == ids:
                return True
        return False

    try:
        builtin.deploy(api.base, tenant, app, manifest, package)
        web = wait_for(lambda: running(2), 240, what="2 running web instances")
        [svc] = stack.role_services(tenant=tenant, role="web")
        assert svc["replicas"] == 2, svc

        status, body = api.request("PATCH", f"/api/v1/tenants/{tenant}/apps/{app}/roles/web", {"instances": 3})
        assert status == 200, (status, body)
        web = wait_for(lambda: running(3), 120, what="3 running web instances")
        [svc] = stack.role_services(tenant=tenant, role="web")
        assert svc["replicas"] == 3 and svc["running"] == 3, svc
        # One service, three tasks: each instance is a task (its id), and the
        # gateway reaches every one.
        tasks = run(["docker", "service", "ps", "-q", "--no-trunc", "--filter", "desired-state=running",
                     svc["id"]]).stdout.split()
        assert {i["id"] for i in web} == set(tasks), (web, tasks)
        slots = sorted(int(x) for x in run(["docker", "inspect", "--format", "{{.Slot}}", *tasks]).stdout.split())
        assert slots == [1, 2, 3], slots
        wait_for(lambda: served({i["id"] for i in web}), 60, what="the 3 tasks reached through the gateway")

        # A task's container killed: reported with its exit code, and Swarm
        # starts another task in its slot.
        since = max([e["seq"] for e in api.get(f"/api/v1/tenants/{tenant}/events")[1]["events"]] or [0])
        victim = web[0]
        cid = run(["docker", "inspect", "--format", "{{.Status.ContainerStatus.ContainerID}}", victim["id"]]).stdout
        run(["docker", "kill", cid.strip()])
        after = wait_for(lambda: (lambda r: r if r and victim["id"] not in {i["id"] for i in r} else None)(
            running(3)), 120, what="a task in place of the killed one")
        events = api.get(f"/api/v1/tenants/{tenant}/events?since={since}")[1]["events"]
        exits = [e for e in events if e["type"] == "exited" and e.get("instance") == victim["id"]]
        assert exits and exits[0]["code"] == 137 and not exits[0].get("retired"), events
        assert any(e["type"] == "restarted" for e in events), events
        wait_for(lambda: served({i["id"] for i in after}), 60, what="the new task reached through the gateway")

        status, body = api.delete(f"/api/v1/tenants/{tenant}/apps/{app}")
        assert status == 200, (status, body)
        wait_for(lambda: stack.gateway.get("/shop")[0] == 404, 30, interval=0.2, what="/shop to answer 404")
        wait_for(lambda: not stack.role_services(tenant=tenant), 60, what="the app's role services to be removed")
    finally:
        api.delete(f"/api/v1/tenants/{tenant}")


def test_a_restarted_orchestrator_adopts_the_worker_and_role_services(stack):
    """The orchestrator's container killed: Swarm starts another, which takes
    the lead and adopts every worker service and role task as they are."""
    def snapshot():
        workers = {s["labels"]["stratus.worker_id"]: s["id"] for s in stack.worker_services()}
        tasks = {}
        for s in stack.role_services(tenant="rideshare"):
            tasks[s["name"]] = sorted(run(["docker", "service", "ps", "-q", "--no-trunc", "--filter",
                                           "desired-state=running", s["id"]]).stdout.split())
        return workers, tasks
    def settled():   # no worker starting, draining or catching up: nothing the new leader would finish
        c = stack.cluster()
        slaves = [w for w in c["workers"] if w["role"] == "slave"]
        return c if (len(slaves) == c["slave_target"] and all(w.get("ready") for w in c["workers"])
                     and not any(w.get("draining") for w in c["workers"])) else None
    leader = wait_for(settled, 90, what="a settled DB cluster")["leader"]
    workers, tasks = snapshot()
    orch = stack.service_container("orchestrator")
    run(["docker", "kill", orch])
    wait_for(lambda: run(["docker", "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={stack.id}_orchestrator"]
                         ).stdout.split() not in ([], [orch]), 60, what="Swarm to start another orchestrator")
    wait_for(lambda: stack.orchestrator.get("/api/v1/cluster")[0] == 200, 90, what="the new orchestrator's API")
    wait_for(lambda: stack.cluster().get("leader") == leader, 30, what="the same master under the new orchestrator")
    time.sleep(5)       # several ticks of both controllers: nothing must be restarted
    assert snapshot() == (workers, tasks)
    grader_sequence(stack.gateway, "adopted")
