"""The whole stack from compose/: one `docker-compose up -d`, in which the
one-shot `deploy` service creates the tenants rideshare and toystore and
deploys their apps through the orchestrator's API, and the orchestrator runs
their instances as containers. Then, against it: the RideShare grader
sequence, the toy store, the dashboard signed in to through the gateway (its
status pages and its charts drawn from the stack's Prometheus), Prometheus
scraping the gateway, the dashboard, the orchestrator, every DB worker, the
apps' instances and RabbitMQ by file service discovery, crash/slave, the
failover demo, an orchestrator killed and adopted, the autoscaling demo, and
a tenant's own app (the example of tests/data/apps/shop) deployed, scaled,
killed and deleted as containers.
A short scaling window (8 s) and at most 3 slaves keep the autoscaling demo
quick and the container count small."""
import json
import re
import threading
import time

import pytest
import requests
from dockerkit import ADMIN_PASSWORD, Http, Stack, grader_sequence, run, toystore_smoke, wait_for

from kits.appskit import shop_package
from stratus import builtin

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(900)]

WINDOW = 8


@pytest.fixture(scope="module")
def stack():
    s = Stack("all", scale_window=WINDOW, max_slaves=3)
    try:
        t0 = time.monotonic()
        s.up("compose", timeout=400)
        s.wait_gateway()
        # The apps are deployed after `up` returns: the images of their
        # packages are built on the first start.
        s.wait_rideshare(300)
        s.wait_toystore(300)
        print(f"compose up to the built-in apps served: {time.monotonic() - t0:.1f} s")
        yield s
    finally:
        print(f"logs of {s.id}: {s.save_logs()}")
        left = s.teardown()
        assert not left, f"`docker-compose down -v` left these behind: {left}"


def leader(stack) -> str | None:
    return stack.cluster().get("leader")


def ready_slaves(stack) -> list[dict]:
    c = stack.cluster()
    return [w for w in c["workers"] if w["id"] != c.get("leader") and w.get("ready") and w["role"] == "slave"]


def test_grader_sequence_through_the_gateway(stack):
    grader_sequence(stack.gateway, "all")
    # Only the gateway and the orchestrator are published, on loopback (not
    # the dashboard, reached through the gateway, nor Prometheus).
    ports = run(["docker", "ps", "--filter", f"label=com.docker.compose.project={stack.project('compose')}",
                 "--format", "{{.Names}} {{.Ports}}"]).stdout
    published = [line for line in ports.splitlines() if "->" in line]
    assert len(published) == 2, ports
    assert all("127.0.0.1:" in line for line in published), ports
    # Workers are containers of this cluster, labelled, and they are the cluster's members.
    containers = stack.running_workers()
    members = {w["id"] for w in stack.cluster()["workers"]}
    assert containers and {c["worker_id"] for c in containers} == members


def test_the_built_in_apps_were_deployed_through_the_api(stack):
    # The one-shot deploy service did its work and exited 0.
    ids = run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={stack.project('compose')}",
               "--filter", "label=com.docker.compose.service=deploy"]).stdout.split()
    assert len(ids) == 1, ids
    wait_for(lambda: json.loads(run(["docker", "inspect", ids[0]]).stdout)[0]["State"]["Status"] == "exited", 120,
             what="the deploy service to finish")
    state = json.loads(run(["docker", "inspect", ids[0]]).stdout)[0]["State"]
    logs = run(["docker", "logs", ids[0]]).stdout
    assert state["ExitCode"] == 0, logs
    assert "tenant rideshare" in logs and "app    toystore/toystore" in logs and "deploy: done" in logs, logs
    # No compose service runs them: each web role is the orchestrator's
    # instance container, built from its package, and the app views say so.
    services = run(["docker", "ps", "--filter", f"label=com.docker.compose.project={stack.project('compose')}",
                    "--format", "{{.Label \"com.docker.compose.service\"}}"]).stdout.split()
    # (amqp-relay: the broker's AMQP port on the tenants' networks; `secrets` ran once and exited)
    assert sorted(services) == ["amqp-relay", "dashboard", "gateway", "orchestrator", "prometheus", "rabbitmq",
                                "zookeeper"], services
    for tenant, roles in (("rideshare", {"users", "rides"}),
                          ("toystore", {"catalog", "order", "restocker", "receipts"})):
        status, view = stack.orchestrator.get(f"/api/v1/tenants/{tenant}/apps/{tenant}")
        assert status == 200 and set(view["roles"]) == roles, (status, view)
        containers = {c["instance"]: c for c in stack.instance_containers(tenant=tenant)}
        for role, r in view["roles"].items():
            assert r["running"] == r["desired"] == 1, (role, r)
            inst = r["instances"][0]
            c = containers[inst["id"]]
            assert c["role"] == role and c["status"] == "running" and c["pid"] == inst["pid"], (c, inst)
            assert c["image"].startswith(f"stratus-app/{tenant}-{tenant}:"), c
            if r["kind"] == "web":
                assert inst["host"] == c["name"], (inst, c)
    # A second run of the deploy service changes nothing (same package, same manifest).
    before = {c["instance"] for c in stack.instance_containers()}
    stack.compose("compose", "up", "-d", "deploy")

    def second_run():
        st = json.loads(run(["docker", "inspect", ids[0]]).stdout)[0]["State"]
        return st if st["Status"] == "exited" and st["StartedAt"] != state["StartedAt"] else None
    again = wait_for(second_run, 120, interval=1, what="the deploy service to run and finish again")
    assert again["ExitCode"] == 0, run(["docker", "logs", "--tail", "20", ids[0]]).stdout
    assert "tenant rideshare  exists" in run(["docker", "logs", "--tail", "10", ids[0]]).stdout
    assert {c["instance"] for c in stack.instance_containers()} == before


def test_toystore_through_the_gateway(stack):
    wait_for(lambda: stack.gateway.get("/products/Tux")[0] == 200, 60, what="the catalog behind the gateway")
    toystore_smoke(stack.gateway)


_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


class Browser:
    """A browser without a browser, through the gateway's published port: the
    dashboard's cookie kept, each form's CSRF token sent back."""

    def __init__(self, base: str):
        self.base = base.rstrip("/")
        self.http = requests.Session()
        self.http.trust_env = False      # the stack is on loopback: never through a proxy
        self.csrf = None

    def get(self, path: str, **kw) -> requests.Response:
        r = self.http.get(self.base + path, timeout=30, **kw)
        m = _CSRF.search(r.text) if "text/html" in r.headers.get("Content-Type", "") else None
        if m:
            self.csrf = m.group(1)
        return r

    def post(self, path: str, data: dict, **kw) -> requests.Response:
        return self.http.post(self.base + path, data={**data, "csrf_token": self.csrf}, timeout=30, **kw)


def chart_points(b: Browser, key: str, **params) -> int:
    """How many points of chart `key` hold a number (the dashboard asks
    Prometheus); 0 while there is no data yet."""
    r = b.get(f"/dashboard/api/charts/{key}", params=params)
    assert r.status_code == 200, (key, r.status_code, r.text[:300])
    return sum(1 for line in r.json()["series"] for v in line["values"] if v is not None)


def test_the_dashboard_signed_in_through_the_gateway_and_prometheus_scrapes_the_stack(stack):
    dash = stack.container_of("compose", "dashboard")
    # It registered under its container's hostname (its short id), which the
    # gateway resolves on the stack's network: /dashboard/ is routed to it.
    wait_for(lambda: stack.gateway.get("/dashboard/login")[0] == 200, 120, what="the gateway to route /dashboard/")
    b = Browser(stack.gateway.base)
    r = b.get("/dashboard/", allow_redirects=False)
    assert r.status_code == 302 and r.headers["Location"].startswith("/dashboard/login"), r.status_code
    r = b.get("/dashboard/login")
    assert r.status_code == 200 and b.csrf, r.text[:300]
    assert b.post("/dashboard/login", {"username": "admin", "password": "wrong"}).status_code == 401
    r = b.post("/dashboard/login", {"username": "admin", "password": ADMIN_PASSWORD}, allow_redirects=False)
    assert r.status_code == 303, (r.status_code, r.text[:300])
    cookie = r.headers.get("Set-Cookie", "")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie, cookie
    r = b.get(r.headers["Location"])
    assert r.status_code == 200 and r.url.endswith("/dashboard/tenants"), (r.status_code, r.url)
    assert "rideshare" in r.text and "toystore" in r.text, r.text[:500]

    # The status page: every component as the platform reports it.
    cluster = stack.cluster()
    r = b.get("/dashboard/components")
    assert r.status_code == 200, r.status_code
    page = r.text
    for part in ("gateway", "orchestrator", "dashboard", "app.rideshare.rideshare.users", "app.toystore.toystore.order"):
        assert f'data-component="{part}"' in page, part
    assert "leading" in page
    live = b.get("/dashboard/api/components").json()
    assert live["cluster"]["leader"] == cluster["leader"], live["cluster"]
    dashboard_svc = next(sv for sv in live["services"] if sv["name"] == "dashboard")
    assert dashboard_svc["healthy"] == dashboard_svc["instances"] == 1, dashboard_svc
    r = b.get("/dashboard/cluster")
    assert r.status_code == 200 and cluster["leader"] in r.text, r.status_code

    # Prometheus, from inside the stack: every component's target, up.
    def scraped():
        targets = stack.prometheus_targets()
        up = {}
        for t in targets:
            if t["health"] == "up" and t["labels"].get("cluster", stack.id) == stack.id:
                up.setdefault(t["job"], set()).add(t["instance"])
        workers = {c["name"] for c in stack.running_workers()}
        worker_hosts = {i.rsplit(":", 1)[0] for i in up.get("worker", set())}
        roles = {t["labels"].get("role") for t in targets if t["job"] == "app" and t["health"] == "up"}
        ok = (up.get("gateway") == {"gateway:8080"} and up.get("orchestrator") == {"orchestrator:8081"}
              and up.get("dashboard") == {f"{dash[:12]}:8086"} and up.get("rabbitmq") == {"rabbitmq:15692"}
              and workers and worker_hosts == workers and {"users", "rides", "catalog", "order"} <= roles)
        return (targets, up) if ok else None
    targets, up = wait_for(scraped, 90, interval=2, what="Prometheus to scrape every component of the stack up")
    print("Prometheus targets up:", {job: sorted(v) for job, v in sorted(up.items())})
    assert all(t["labels"]["cluster"] == stack.id for t in targets if t["job"] != "rabbitmq"), targets

    # The charts: the dashboard reads that Prometheus (STRATUS_PROMETHEUS_URL)
    # and draws points from the traffic sent now.
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            try:
                stack.gateway.get("/api/v1/rides?source=5&destination=6")
            except Exception:
                pass
            time.sleep(0.1)
    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    try:
        wait_for(lambda: chart_points(b, "requests", tenant="rideshare") > 0, 120, interval=3,
                 what="the requests chart of rideshare to have points")
        wait_for(lambda: chart_points(b, "db_reads") > 0, 60, interval=3, what="the DB reads chart to have points")
    finally:
        stop.set()
        t.join(10)
    r = b.get("/dashboard/api/charts/requests", params={"tenant": "rideshare"})
    assert any(line["label"] == "rides" for line in r.json()["series"]), r.json()["series"]
    # Signed out, the same JSON is refused.
    assert b.post("/dashboard/logout", {}).status_code == 200
    assert b.get("/dashboard/api/charts/requests", params={"tenant": "rideshare"}).status_code == 401


def test_a_tenant_app_runs_as_containers_scaled_killed_and_deleted(stack):
    api = stack.orchestrator
    tenant, app = "acme", "shop"
    status, body = api.post("/api/v1/tenants", {"name": tenant})
    assert status == 201 and body["name"] == tenant, (status, body)
    manifest, package = shop_package()
    base = api.base

    def view():
        status, v = api.get(f"/api/v1/tenants/{tenant}/apps/{app}")
        assert status == 200, (status, v)
        return v

    def running(role, n):
        v = view()["roles"][role]
        live = [i for i in v["instances"] if i["state"] == "running"]
        return live if v["running"] == n and len(live) == n == len(v["instances"]) else None

    def served(ids, tries=60):   # without a cookie or token, the gateway spreads requests over the pool
        seen = set()
        for _ in range(tries):
            status, body = stack.gateway.get("/shop")
            if status != 200:
                return False
            seen.add(body["instance"])
            if seen == ids:
                return True
        return False

    try:
        t0 = time.monotonic()
        v = builtin.deploy(base, tenant, app, manifest, package)
        assert v["roles"]["web"]["desired"] == 2 and v["roles"]["jobs"]["desired"] == 1, v
        web = wait_for(lambda: running("web", 2), 180, what="2 running web instances")
        wait_for(lambda: running("jobs", 1), 60, what="the jobs instance")
        status, body = stack.gateway.get("/shop")
        assert status == 200 and body["greeting"] == "hi" and body["app"] == app, (status, body)
        print(f"shop: PUT to 2 web instances served through the gateway in {time.monotonic() - t0:.1f} s")
        wait_for(lambda: served({i["id"] for i in web}), 30, what="both web instances reached through the gateway")
        # Each instance is a container of this cluster, built from the package on the base image.
        containers = {c["instance"]: c for c in stack.instance_containers(tenant=tenant)}
        assert {i["id"] for i in web} <= set(containers) and len(containers) == 3, containers
        for i in web:
            c = containers[i["id"]]
            assert c["role"] == "web" and c["status"] == "running" and i["host"] == c["name"], (c, i)
            assert c["image"].startswith(f"stratus-app/{tenant}-{app}:"), c

        # scaled to 3, live
        status, body = api.request("PATCH", f"/api/v1/tenants/{tenant}/apps/{app}/roles/web", {"instances": 3})
        assert status == 200, (status, body)
        web = wait_for(lambda: running("web", 3), 120, what="3 running web instances")
        wait_for(lambda: served({i["id"] for i in web}), 30, what="the 3 web instances reached through the gateway")
        assert len(stack.instance_containers(tenant=tenant, role="web")) == 3

        # one container killed: reported with its exit code, replaced in its slot
        since = max([e["seq"] for e in api.get(f"/api/v1/tenants/{tenant}/events")[1]["events"]] or [0])
        victim = web[0]
        run(["docker", "kill", victim["host"]])
        after = wait_for(lambda: (lambda r: r if r and victim["id"] not in {i["id"] for i in r} else None)(
            running("web", 3)), 120, what="a replacement of the killed instance")
        events = api.get(f"/api/v1/tenants/{tenant}/events?since={since}")[1]["events"]
        exits = [e for e in events if e["type"] == "exited" and e.get("instance") == victim["id"]]
        assert exits and exits[0]["code"] == 137, events
        assert any(e["type"] == "restarted" for e in events), events
        wait_for(lambda: served({i["id"] for i in after}), 30, what="the replacement reached through the gateway")
        wait_for(lambda: victim["id"] not in {c["instance"] for c in stack.instance_containers(all_=True)}, 30,
                 what="the killed container to be removed")

        # deleted: its routes answer 404, its containers go
        status, body = api.delete(f"/api/v1/tenants/{tenant}/apps/{app}")
        assert status == 200, (status, body)
        wait_for(lambda: stack.gateway.get("/shop")[0] == 404, 10, interval=0.1, what="/shop to answer 404")
        wait_for(lambda: not stack.instance_containers(all_=True, tenant=tenant), 60,
                 what="the app's containers to be removed")
        assert api.get(f"/api/v1/tenants/{tenant}/apps/{app}")[0] == 404
    finally:
        api.delete(f"/api/v1/tenants/{tenant}")


def test_admin_routes_need_a_token(stack):
    status, _ = stack.gateway.post("/api/v1/crash/slave")
    assert status == 401
    admin = Http(stack.gateway.base, token=stack.admin_token())

    def same_pids():  # the worker list is the containers' host pids (bounded: scaling may be moving)
        status, pids = admin.get("/api/v1/worker/list")
        assert status == 200, pids
        return pids == sorted(c["pid"] for c in stack.running_workers())
    wait_for(same_pids, 30, what="/api/v1/worker/list to match the worker containers' pids")


def test_crash_slave_replaces_the_container_with_the_highest_pid(stack):
    admin = Http(stack.gateway.base, token=stack.admin_token())
    wait_for(lambda: ready_slaves(stack), 60, what="a ready slave")
    master = leader(stack)
    before = stack.running_workers()
    slaves = [c for c in before if c["worker_id"] != master]
    victim = max(slaves, key=lambda c: c["pid"])
    status, body = admin.post("/api/v1/crash/slave")
    assert status == 200, body
    assert isinstance(body, list) and len(body) == 1, body
    # Whichever slave it killed, its container stops and a new one replaces it.
    before_ids = {c["worker_id"] for c in before}
    wait_for(lambda: len([c for c in stack.running_workers() if c["worker_id"] in before_ids]) == len(before) - 1,
             30, what="one slave container to stop")
    gone = before_ids - {c["worker_id"] for c in stack.running_workers()}
    wait_for(lambda: any(c["worker_id"] not in before_ids for c in stack.running_workers()), 60,
             what="a replacement worker container")
    assert leader(stack) == master and master not in gone
    # The pid reported is the container's main pid on the host (State.Pid), not
    # the 1 the worker sees inside its own pid namespace.
    assert body == [str(victim["pid"])], (body, slaves)
    assert gone == {victim["worker_id"]}


def test_failover_when_the_master_container_is_killed(stack):
    wait_for(lambda: ready_slaves(stack), 90, what="a ready slave")
    old = leader(stack)
    before = stack.running_workers()
    victim = next(c for c in before if c["worker_id"] == old)
    acked: list[str] = []
    after_failover = threading.Event()
    acked_after: list[str] = []
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            name = f"fo{i}"
            i += 1
            try:
                status, _ = stack.gateway.put("/api/v1/users", {"username": name, "password": "a" * 40})
            except Exception:
                status = None
            if status == 201:
                acked.append(name)
                if after_failover.is_set():
                    acked_after.append(name)
            time.sleep(0.02)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        wait_for(lambda: len(acked) >= 20, 60, what="20 acknowledged writes before the kill")
        killed_at = time.monotonic()
        run(["docker", "kill", victim["name"]])
        new = wait_for(lambda: (lambda l: l if l and l != old else None)(leader(stack)), 60, interval=0.1,
                       what="a new master")
        print(f"failover: {old} killed, {new} master after {time.monotonic() - killed_at:.1f} s")
        after_failover.set()
        wait_for(lambda: len(acked_after) >= 20, 60, what="20 writes acknowledged by the new master")
    finally:
        stop.set()
        t.join(30)
    assert new != old
    want = set(acked)

    def all_there():
        status, users = stack.gateway.get("/api/v1/users")
        return status == 200 and want <= set(users)
    wait_for(all_there, 30, what=f"all {len(want)} acknowledged users to be readable")
    # docker ps shows a replacement worker, and the dead master's container is gone.
    before_ids = {c["worker_id"] for c in before}
    wait_for(lambda: any(c["worker_id"] not in before_ids for c in stack.running_workers()), 60,
             what="a replacement worker container")
    wait_for(lambda: victim["id"] not in {c["id"] for c in stack.worker_containers(all_=True)}, 30,
             what="the dead master's container to be removed")


def test_a_restarted_orchestrator_adopts_the_running_worker_containers(stack):
    wait_for(lambda: ready_slaves(stack), 90, what="a ready slave")
    master = leader(stack)
    before = {c["worker_id"]: c["id"] for c in stack.running_workers()}
    instances = {c["instance"]: c["id"] for c in stack.instance_containers()}
    assert {c["role"] for c in stack.instance_containers()} >= {"users", "rides", "catalog", "order"}
    orch = run(["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={stack.project('compose')}",
                "--filter", "label=com.docker.compose.service=orchestrator"]).stdout.split()
    assert len(orch) == 1, orch
    run(["docker", "kill", orch[0]])  # a crash: no chance to clean up
    assert {c["worker_id"] for c in stack.running_workers()} == set(before)  # the workers outlive it
    assert {c["instance"]: c["id"] for c in stack.instance_containers()} == instances   # and the app instances
    stack.compose("compose", "up", "-d", "orchestrator")
    wait_for(lambda: stack.cluster()["orchestrator"]["leading"], 90, what="the orchestrator to lead again")
    # It took over the same containers: the master kept its container and its role.
    assert leader(stack) == master
    running = {c["worker_id"]: c["id"] for c in stack.running_workers()}
    assert running.get(master) == before[master]
    kept = [w for w in before if running.get(w) == before[w]]
    assert len(kept) >= min(len(before), 2), (before, running)
    logs = run(["docker", "logs", orch[0]], check=False)
    assert "adopted" in logs.stdout + logs.stderr
    # The app instances too: the same containers serve, none was restarted.
    for tenant in ("rideshare", "toystore"):
        wait_for(lambda: (lambda v: all(r["running"] == r["desired"] for r in v["roles"].values()))(
            stack.orchestrator.get(f"/api/v1/tenants/{tenant}/apps/{tenant}")[1]), 60,
            what=f"the {tenant} app running under the new leader")
    assert {c["instance"]: c["id"] for c in stack.instance_containers()} == instances
    grader_sequence(stack.gateway, "adopt")
    toystore_smoke(stack.gateway)


def test_autoscaling_grows_then_shrinks(stack):
    wait_for(lambda: len(ready_slaves(stack)) >= 1, 90, what="a ready slave")
    start = len(stack.running_workers())
    stop = threading.Event()
    peak = [start]

    def reader():
        while not stop.is_set():
            try:
                stack.gateway.get("/api/v1/rides?source=3&destination=4")
            except Exception:
                pass
            time.sleep(0.05)

    threads = [threading.Thread(target=reader, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        def grown():
            n = len(stack.running_workers())
            peak[0] = max(peak[0], n)
            return n >= 3  # master + at least 2 slaves
        wait_for(grown, 6 * WINDOW + 60, interval=1, what="the worker containers to grow under load")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert peak[0] >= 3
    # No reads now: after the next windows the cluster returns to one slave.
    wait_for(lambda: len(stack.running_workers()) == 2, 6 * WINDOW + 60, interval=1,
             what="the worker containers to shrink back to master + 1 slave")
    assert stack.cluster()["slave_target"] == 1
