"""Apps (paas.md, Apps and Behaviour the platform keeps), end to end on the
process runtime: a real orchestrator (DB workers, app controller, health
monitor), a real gateway, real RabbitMQ and ZooKeeper, and the example
tenant app of tests/data/apps/shop (written against paas.md only).

The module deploys the shop as a new tenant `acme-<n>` and takes it through
deploy, scale, restart under load, kill -9, unhealthy, tasks, per-tenant
control and delete, in that order (each test leaves the app as the next
expects: 2 web instances and 1 jobs instance)."""
from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest

from harness import LocalCluster
from kits.appskit import SHOP, AppsClient, shop_package
from kits.testkit import Client, real_orchestrator, start_gateway, wait_until
from stratus import builtin

pytestmark = pytest.mark.timeout(600)

class Platform(AppsClient):
    def __init__(self, cluster, orch: int, gw: int):
        self.cluster, self.orch, self.gw = cluster, orch, gw
        self.tenant = f"acme-{uuid.uuid4().hex[:6]}"
        self.other = f"beta-{uuid.uuid4().hex[:6]}"
        self.passwords: dict[str, str] = {}


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    cluster = LocalCluster(tmp_path_factory.mktemp("apps"), health_interval=0.5)
    try:
        with real_orchestrator(cluster) as orch:
            p = Platform(cluster, orch, 0)

            def created(name):
                status, body, _ = p.api("POST", "/api/v1/tenants", {"name": name})
                if status == 201:
                    p.passwords[name] = body["password"]
                    return True
                return None
            for name in (p.tenant, p.other):
                wait_until(lambda: created(name), 90, 0.5, what=f"tenant {name} created")
            p.gw = start_gateway(cluster, "gw")
            yield p
    finally:
        cluster.close()


def deploy(p: Platform, name="shop", manifest=None, tenant=None):
    m, package = shop_package()
    base = f"http://127.0.0.1:{p.orch}"
    return builtin.deploy(base, tenant or p.tenant, name, manifest or m, package)


# --- deploy ------------------------------------------------------------------------------

def test_deploy_two_web_instances_reached_through_the_gateway(platform):
    p = platform
    t0 = time.monotonic()
    view = deploy(p)
    assert view["roles"]["web"]["desired"] == 2 and view["roles"]["jobs"]["desired"] == 1
    first = wait_until(lambda: (p.gateway("GET", "/shop")[0] == 200) or None, 10, 0.02, what="the first 200")
    assert first
    print(f"PUT manifest -> first 200 through the gateway: {time.monotonic() - t0:.2f}s")
    p.wait_running("web", 2)
    p.wait_running("jobs", 1)
    status, body, _ = p.gateway("GET", "/shop")
    assert status == 200 and body["greeting"] == "hi" and body["app"] == "shop"
    # Without the affinity cookie, requests spread over both instances.
    seen = {p.gateway("GET", "/shop")[1]["instance"] for _ in range(40)}
    assert seen == {i["id"] for i in p.running("web")}
    view = p.app()
    for inst in view["roles"]["web"]["instances"]:
        assert set(inst) == {"id", "host", "port", "pid", "state", "restarts", "started"}
        assert inst["state"] == "running" and inst["pid"] > 0 and inst["port"] > 0
    types = [e["type"] for e in p.events()]
    assert "deployed" in types and types.count("started") >= 3


def test_the_instances_environment_has_no_platform_secret(platform):
    p = platform
    inst = p.running("web")[0]
    environ = Path(f"/proc/{inst['pid']}/environ").read_bytes().split(b"\0")
    env = dict(kv.split(b"=", 1) for kv in environ if b"=" in kv)
    assert env[b"STRATUS_TENANT"] == p.tenant.encode() and env[b"STRATUS_ROLE"] == b"web"
    assert env[b"STRATUS_INSTANCE"] == inst["id"].encode() and env[b"PORT"] == str(inst["port"]).encode()
    assert b"STRATUS_ADMIN_PASSWORD" not in env and b"STRATUS_TOKEN_SECRET" not in env
    assert b"stratus-" not in env.get(b"STRATUS_AMQP_URL", b"")   # no platform account (bus/broker_accounts.py)
    assert b"STRATUS_SECRETS_DIR" not in env
    assert f"stratus.{p.cluster.name}.{p.tenant}".encode() in env[b"STRATUS_AMQP_URL"]


def test_scale_to_3_to_0_and_back(platform):
    p = platform
    status, body, _ = p.api("PATCH", f"/api/v1/tenants/{p.tenant}/apps/shop/roles/web", {"instances": 3})
    assert status == 200 and body["roles"]["web"]["desired"] == 3, body
    p.wait_running("web", 3)
    wait_until(lambda: len({p.gateway("GET", "/shop")[1]["instance"] for _ in range(30)}) == 3, 10,
               what="the gateway to use 3 instances")
    assert p.api("PATCH", f"/api/v1/tenants/{p.tenant}/apps/shop/roles/web", {"instances": 0})[0] == 200
    p.wait_running("web", 0)
    wait_until(lambda: p.gateway("GET", "/shop")[0] == 503 or None, 5, what="no instance to answer")
    assert p.api("PATCH", f"/api/v1/tenants/{p.tenant}/apps/shop/roles/web", {"instances": 2})[0] == 200
    p.wait_running("web", 2)
    wait_until(lambda: p.gateway("GET", "/shop")[0] == 200 or None, 5, what="the app to answer again")
    scaled = [e for e in p.events() if e["type"] == "scaled"]
    assert [e["instances"] for e in scaled[-3:]] == [3, 0, 2]


def test_bad_scale_requests(platform):
    p = platform
    base = f"/api/v1/tenants/{p.tenant}/apps/shop"
    assert p.api("PATCH", f"{base}/roles/web", {"instances": -1})[0] == 400
    assert p.api("PATCH", f"{base}/roles/web", {"instances": "2"})[0] == 400
    assert p.api("PATCH", f"{base}/roles/web", {"count": 2})[0] == 400
    assert p.api("PATCH", f"{base}/roles/nope", {"instances": 1})[0] == 404
    assert p.api("PATCH", f"/api/v1/tenants/{p.tenant}/apps/nope/roles/web", {"instances": 1})[0] == 404
    # 16 in all per tenant: 16 web + 1 jobs is over the quota; nothing changes.
    status, body, _ = p.api("PATCH", f"{base}/roles/web", {"instances": 16})
    assert status == 409 and "quota" in body["error"], body
    assert p.app()["roles"]["web"]["desired"] == 2
    assert any(e["type"] == "quota_refused" for e in p.events())


def test_rolling_restart_fails_no_request(platform):
    p = platform
    before = {i["id"] for i in p.running("web")}
    failures, done = [], threading.Event()
    count = [0]

    def hammer():
        c = Client(p.gw, timeout=10)
        while not done.is_set():
            try:
                status, body, _ = c.get("/shop")
                count[0] += 1
                if status != 200:
                    failures.append((status, body))
            except Exception as exc:
                failures.append(repr(exc))
                c = Client(p.gw, timeout=10)
    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        status, body, _ = p.api("POST", f"/api/v1/tenants/{p.tenant}/apps/shop/restart")
        assert status == 202, body
        def replaced():
            insts = p.app()["roles"]["web"]["instances"]     # one read per look
            ids = {i["id"] for i in insts if i["state"] == "running"}
            return ids.isdisjoint(before) and len(ids) == 2 and len(insts) == 2
        wait_until(replaced, 60, 0.2, what="every web instance replaced")
        time.sleep(1.0)
    finally:
        done.set()
        for t in threads:
            t.join(15)
    assert count[0] > 50
    assert failures == [], failures[:5]


def test_kill_9_of_an_instance_is_replaced_and_told(platform):
    p = platform
    victim = p.running("web")[0]
    since = p.events()[-1]["seq"]
    t0 = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    wait_until(lambda: (ids := {i["id"] for i in p.running("web")}) and len(ids) == 2 and victim["id"] not in ids,
               15, 0.05, what="a replacement")   # one read per look: two could straddle the exit
    print(f"kill -9 -> replacement running: {time.monotonic() - t0:.2f}s")
    events = p.events(since)
    exited = [e for e in events if e["type"] == "exited" and e.get("instance") == victim["id"]]
    assert exited and exited[0]["code"] in (-9, 137), events
    assert any(e["type"] == "restarted" and e["role"] == "web" for e in events), events


def test_an_unhealthy_instance_leaves_the_pool_and_is_replaced(platform):
    p = platform
    running = p.running("web")
    sick = running[0]
    since = p.events()[-1]["seq"]
    c = Client(sick["port"])
    assert c.request("POST", "/shop/sick")[0] == 200
    t0 = time.monotonic()
    # 3 probes at 0.5 s: out of the registry (the gateway's pool) well within 3 s.
    wait_until(lambda: all(p.gateway("GET", "/shop")[1].get("instance") != sick["id"] for _ in range(10)), 5,
               0.1, what="the sick instance out of the pool")
    wait_until(lambda: (ids := {i["id"] for i in p.running("web")}) and len(ids) == 2 and sick["id"] not in ids,
               20, 0.1, what="a replacement")
    print(f"health failing -> replaced: {time.monotonic() - t0:.2f}s")
    types = [(e["type"], e.get("instance")) for e in p.events(since)]
    assert ("unhealthy", sick["id"]) in types, types


def test_a_role_that_crashes_at_start_backs_off(platform):
    p = platform
    m = {"roles": {"crash": {"kind": "worker", "command": ["python", "-c", "import sys; sys.exit(3)"],
                             "instances": 1}}}
    deploy(p, "crashy", m)
    wait_until(lambda: len([e for e in p.events() if e["type"] == "exited" and e.get("app") == "crashy"]) >= 5,
               40, 0.2, what="five exits of the crashing role")
    starts = [e["time"] for e in p.events() if e["type"] in ("started", "restarted") and e.get("app") == "crashy"]
    gaps = [b - a for a, b in zip(starts, starts[1:])][:4]
    print("intervals between starts:", [round(g, 2) for g in gaps])
    # 1, 2, 4, 8 s (+ the time the process takes to start and exit)
    for gap, want in zip(gaps, (1, 2, 4, 8)):
        assert want <= gap < want + 1.5, gaps
    codes = {e["code"] for e in p.events() if e["type"] == "exited" and e.get("app") == "crashy"}
    assert codes == {3}
    assert p.api("DELETE", f"/api/v1/tenants/{p.tenant}/apps/crashy")[0] == 200


def _log_of(p, role):
    d = p.cluster.state_dir / "clusters" / p.cluster.name / "logs" / "instances" / p.tenant / "shop"
    return "".join(f.read_text(errors="replace") for f in sorted(d.glob("*.log")))


def test_a_web_roles_task_reaches_the_worker_role(platform):
    p = platform
    status, body, _ = p.gateway("POST", "/shop/tasks", {"receipt": 42})
    assert status == 202, body
    task = body["task"]
    wait_until(lambda: f"done {task} " in _log_of(p, "jobs"), 20, 0.2, what="the task done")


def test_killing_the_worker_mid_task_redelivers_it(platform):
    p = platform
    jobs = p.running("jobs")[0]
    status, body, _ = p.gateway("POST", "/shop/tasks", {"sleep": 3, "n": 1})
    task = body["task"]
    wait_until(lambda: f"start {task} attempt 1" in _log_of(p, "jobs"), 20, 0.1, what="the task started")
    os.kill(jobs["pid"], signal.SIGKILL)
    wait_until(lambda: f"done {task} " in _log_of(p, "jobs"), 40, 0.2, what="the task done after a redelivery")
    assert f"start {task} attempt 2" in _log_of(p, "jobs")


def test_a_task_that_always_fails_ends_in_the_dead_letter_queue(platform):
    p = platform
    from bus.tasks import TaskQueue
    status, body, _ = p.gateway("POST", "/shop/tasks", {"fail": True})
    task = body["task"]
    q = TaskQueue(p.cluster.settings, p.tenant, "shop", "jobs")
    try:
        dead = wait_until(lambda: [t for t in q.dead_letters() if t.id == task], 30, 0.3,
                          what="the task in the dead-letter queue")
    finally:
        q.close()
    assert "always fails" in (dead[0].error or "")
    assert _log_of(p, "jobs").count(f"start {task} attempt") == 3


def test_control_is_per_tenant(platform):
    p = platform
    a, b = p.tenant, p.other
    tok_b = {"Authorization": f"Bearer {p.token(b)}"}
    base = f"/api/v1/tenants/{a}/apps"
    for method, path, body in [("GET", base, None), ("GET", f"{base}/shop", None),
                               ("PUT", f"{base}/shop", {"roles": {}}), ("PUT", f"{base}/shop/package", b"x"),
                               ("PATCH", f"{base}/shop/roles/web", {"instances": 1}),
                               ("POST", f"{base}/shop/restart", None), ("DELETE", f"{base}/shop", None),
                               ("GET", f"/api/v1/tenants/{a}/events", None)]:
        status, answer, _ = p.gateway(method, path, body, tok_b)
        assert status == 403, (method, path, status, answer)
        assert isinstance(answer, dict) and "error" in answer
    # B's own deploy through the gateway with its token: a prefix A owns, then a reserved one.
    m, package = shop_package()
    gw = f"http://127.0.0.1:{p.gw}"
    with pytest.raises(builtin.DeployError) as e:
        builtin.deploy(gw, b, "shop", m, package, token=p.token(b))
    assert e.value.status == 409
    m2 = {"roles": {"web": {**m["roles"]["web"], "routes": ["/api/v1/db"]}}}
    with pytest.raises(builtin.DeployError) as e:
        builtin.deploy(gw, b, "mine", m2, package, token=p.token(b))
    assert e.value.status == 409
    # A's owner reaches its own app with its token.
    status, body, _ = p.gateway("GET", f"{base}/shop", None, {"Authorization": f"Bearer {p.token(a)}"})
    assert status == 200 and body["name"] == "shop"


def test_packages_through_the_gateway_up_to_50_mib(platform):
    p = platform
    import io
    import tarfile
    tok = {"Authorization": f"Bearer {p.token(p.tenant)}", "Content-Type": "application/gzip"}
    path = f"/api/v1/tenants/{p.tenant}/apps/big/package"

    def package(n):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w:gz", compresslevel=1) as tar:
            data = os.urandom(n)       # incompressible: the .tar.gz is a little over n bytes
            info = tarfile.TarInfo("blob.bin")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        return raw.getvalue()
    status, body, _ = p.gateway("PUT", path, package(5 * 1024 * 1024), tok)
    assert status == 201 and body["digest"].startswith("sha256:"), body
    status, body, _ = p.gateway("PUT", path, package(51 * 1024 * 1024), tok)
    assert status == 413, body
    status, body, _ = p.gateway("PUT", path, b"not a tarball", tok)
    assert status == 400 and "error" in body, body


def test_tenant_list_counts_apps_and_instances(platform):
    p = platform
    status, rows, _ = p.api("GET", "/api/v1/tenants")
    mine = [r for r in rows if r["name"] == p.tenant][0]
    assert mine["apps"] == 1 and mine["instances"] == 3


def test_delete_stops_the_instances_and_the_routes_answer_404(platform):
    p = platform
    pids = [i["pid"] for r in p.app()["roles"].values() for i in r["instances"]]
    status, body, _ = p.api("DELETE", f"/api/v1/tenants/{p.tenant}/apps/shop")
    assert status == 200 and body == {}
    wait_until(lambda: p.gateway("GET", "/shop")[0] == 404 or None, 1.5, 0.05, what="404 on /shop")
    status, body, _ = p.gateway("GET", "/shop/anything")
    assert status == 404 and "error" in body
    assert p.api("GET", f"/api/v1/tenants/{p.tenant}/apps/shop")[0] == 404
    assert p.api("DELETE", f"/api/v1/tenants/{p.tenant}/apps/shop")[0] == 404

    def gone():
        return all(not Path(f"/proc/{pid}").exists() or
                   Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z" for pid in pids)
    wait_until(gone, 15, 0.1, what="every instance stopped")
    assert any(e["type"] == "deleted" for e in p.events())


def test_the_cli_deploys_scales_restarts_and_reads(platform):
    """stratus deploy/apps/scale/restart/events/logs against the real orchestrator."""
    import subprocess
    import sys
    p = platform
    env = {**p.cluster.env, "STRATUS_ORCHESTRATOR_URL": f"http://127.0.0.1:{p.orch}"}

    def stratus(*args, timeout=120):
        r = subprocess.run([sys.executable, "-m", "stratus.cli", *args], env=env, capture_output=True, text=True,
                           timeout=timeout)
        return r.returncode, r.stdout + r.stderr
    rc, out = stratus("deploy", str(SHOP), "--tenant", p.tenant)
    assert rc == 0, out
    assert "web" in out and "2/2" in out, out           # progress lines until every role runs
    wait_until(lambda: p.gateway("GET", "/shop")[0] == 200 or None, 5, what="the app through the gateway")
    rc, out = stratus("apps", p.tenant)
    assert rc == 0 and "shop" in out, out
    rc, out = stratus("scale", f"{p.tenant}/shop/web", "3")
    assert rc == 0, out
    assert len(p.running("web")) == 3
    before = {i["id"] for i in p.running("web")}
    rc, out = stratus("restart", f"{p.tenant}/shop")
    assert rc == 0, out
    assert before.isdisjoint({i["id"] for i in p.running("web")})
    rc, out = stratus("events", p.tenant)
    assert rc == 0 and "restart_requested" in out and "scaled" in out, out
    inst = p.running("web")[0]["id"]
    rc, out = stratus("logs", f"{p.tenant}/shop/{inst}")
    assert rc == 0 and f"shop.web {inst} listening" in out, out
    rc, out = stratus("scale", f"{p.tenant}/shop/nope", "1")
    assert rc == 1 and "error" in out, out
    assert p.api("DELETE", f"/api/v1/tenants/{p.tenant}/apps/shop")[0] == 200
