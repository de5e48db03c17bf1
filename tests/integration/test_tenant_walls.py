"""Walls between tenants and the platform (issue 22), end to end on the
process runtime: a real orchestrator, a real gateway, real RabbitMQ and
ZooKeeper, and the example app of tests/data/apps/shop.

- Reserved routes (paas.md, Apps): a deploy that claims a path under /api,
  /dashboard, /health or /metrics, by segment and in any case, answers 409
  with a JSON error and changes nothing; /healthz and /dashboardx are free;
  /api/v1/users and /api/v1/rides only for the tenant rideshare. Through the
  gateway the platform's own routes stay the platform's.
- Tenant deletion (paas.md, Accounts): a tenant that deployed the shop, logged,
  ran tasks and made events is deleted; created again under the same name it
  sees no logs, events, apps or packages of the old one, and the old files,
  znodes and task queues are gone."""
from __future__ import annotations

import json
import pwd
import time
import uuid

import pytest

from bus import zk as bzk
from bus.broker_admin import BrokerAdmin
from bus.names import Names
from bus.tasks import TaskQueue
from harness import LocalCluster
from kits.appskit import AppsClient, shop_package
from kits.testkit import Client, real_orchestrator, start_gateway, wait_until
from stratus import builtin

pytestmark = pytest.mark.timeout(600)


class Platform(AppsClient):
    def __init__(self, cluster, orch: int):
        self.cluster, self.orch, self.gw = cluster, orch, 0
        self.tenant = f"walls-{uuid.uuid4().hex[:6]}"
        self.passwords: dict[str, str] = {}

    def create(self, name: str) -> None:
        def created():
            status, body, _ = self.api("POST", "/api/v1/tenants", {"name": name})
            if status == 201:
                self.passwords[name] = body["password"]
                return True
            assert status in (503, 504), (status, body)   # the workers may still be starting
            return None
        wait_until(created, 90, 0.5, what=f"tenant {name} created")

    def put_manifest(self, tenant: str, app: str, manifest: dict):
        """PUT the manifest (a package of that app is uploaded already): (status, body)."""
        status, body, resp = self.api("PUT", f"/api/v1/tenants/{tenant}/apps/{app}", manifest)
        return status, body, resp


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    cluster = LocalCluster(tmp_path_factory.mktemp("walls"), health_interval=0.5)
    try:
        with real_orchestrator(cluster) as orch:
            p = Platform(cluster, orch)
            p.create(p.tenant)
            p.gw = start_gateway(cluster, "gw")
            yield p
    finally:
        cluster.close()


def idle(manifest: dict, routes: list[str]) -> dict:
    """The shop's manifest with no instance and the web role on `routes`."""
    roles = {name: {**r, "instances": 0} for name, r in manifest["roles"].items()}
    roles["web"]["routes"] = routes
    return {"roles": roles}


# --- reserved routes ----------------------------------------------------------------------
REFUSED = ["/api/v1/login", "/api", "/API", "/Api/v1/x", "/api/v1/users", "/api/v1/rides", "/dashboard",
           "/Dashboard/x", "/health", "/HEALTH", "/metrics", "/Metrics/x", "/%61pi/v1/x", "/"]


def test_reserved_routes_are_refused_with_409(platform):
    p = platform
    m, package = shop_package()
    status, body, _ = p.api("PUT", f"/api/v1/tenants/{p.tenant}/apps/probe/package", package,
                            {"Content-Type": "application/gzip"})
    assert status == 201, body
    for route in REFUSED:
        status, body, resp = p.put_manifest(p.tenant, "probe", idle(m, [route]))
        assert status == 409, (route, status, body)
        assert resp.getheader("Content-Type") == "application/json", (route, resp.getheaders())
        assert ("reserved" if route != "/" else "cover") in body["error"], (route, body)
        assert p.api("GET", f"/api/v1/tenants/{p.tenant}/apps/probe")[0] == 404   # nothing changed
    # By segment, these are not under the platform's prefixes: a tenant may take them.
    status, body, _ = p.put_manifest(p.tenant, "probe", idle(m, ["/healthz", "/dashboardx", "/apix", "/metricsfoo"]))
    assert status == 201, body
    assert body["roles"]["web"]["routes"] == ["/healthz", "/dashboardx", "/apix", "/metricsfoo"]
    assert p.api("DELETE", f"/api/v1/tenants/{p.tenant}/apps/probe")[0] == 200


def test_the_built_in_paths_are_rideshares_alone(platform):
    p = platform
    m, package = shop_package()
    try:
        # rideshare (a built-in tenant, known before `stratus up` makes it) may claim its paths...
        view = builtin.deploy(f"http://127.0.0.1:{p.orch}", "rideshare", "ridesprobe",
                              idle(m, ["/api/v1/users", "/api/v1/rides"]), package)
        assert view["roles"]["web"]["routes"] == ["/api/v1/users", "/api/v1/rides"]
        # ...but nothing else under /api, nor its paths in another case.
        for route in ("/api/v1/login", "/API/v1/users", "/api/v1"):
            status, body, _ = p.put_manifest("rideshare", "ridesprobe", idle(m, [route]))
            assert status == 409 and "reserved" in body["error"], (route, body)
        # Another tenant's owner, through the gateway with its own token: 409 too.
        with pytest.raises(builtin.DeployError) as e:
            builtin.deploy(f"http://127.0.0.1:{p.gw}", p.tenant, "mine", idle(m, ["/api/v1/users/x"]), package,
                           token=p.token(p.tenant))
        assert e.value.status == 409
    finally:
        p.api("DELETE", "/api/v1/tenants/rideshare/apps/ridesprobe")
        p.api("DELETE", f"/api/v1/tenants/{p.tenant}/apps/mine")


def test_the_gateway_keeps_the_platforms_paths(platform):
    c = Client(platform.gw, timeout=10)
    status, body, _ = c.get("/health")
    assert status == 200 and body["service"] == "gateway"
    assert c.get("/metrics")[0] == 200
    assert c.get("/api/v1/cluster")[0] == 401
    for path in ("/HEALTH", "/Health/", "//health", "/METRICS", "/%6detrics", "/API/v1/cluster", "/Api/",
                 "/Dashboard/", "/api/v1/login"):
        status, body, resp = c.get(path)
        assert status == 404 and "error" in body and resp.getheader("Content-Type") == "application/json", \
            (path, status, body)


# --- tenant deletion ----------------------------------------------------------------------
def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _logs(p, tenant):
    status, body, _ = p.api("GET", f"/api/v1/logs?component={tenant}&limit=10000")
    if status == 404:
        return []
    assert status == 200, body
    return body["lines"]


def test_a_deleted_tenants_name_comes_back_empty(platform):
    p = platform
    t = f"gone-{uuid.uuid4().hex[:6]}"
    p.create(t)
    base = f"http://127.0.0.1:{p.orch}"
    m, package = shop_package()
    m["roles"]["web"]["instances"] = 1
    view = builtin.deploy(base, t, "shop", m, package)
    digest = view["digest"]

    def running():
        roles = p.app("shop", t)["roles"]
        return all(r["running"] == 1 for r in roles.values()) or None
    wait_until(running, 60, 0.2, what="the shop's web and jobs instances running")
    ids = {i["id"] for r in p.app("shop", t)["roles"].values() for i in r["instances"]}

    # Logs (the web role logs each request line: a marker in the query), events, the
    # tenant's task queue (a task handed to its jobs role), a heartbeat.
    marker = f"marker-{uuid.uuid4().hex}"
    wait_until(lambda: p.gateway("GET", f"/shop?{marker}")[0] == 200 or None, 20, 0.2, what="the shop's route")
    wait_until(lambda: any(marker in line["line"] for line in _logs(p, t)) or None, 30, 0.3,
               what="the request's log line")
    q = TaskQueue(p.cluster.settings, t, "shop", "jobs")
    try:
        q.submit({"marker": marker})
    finally:
        q.close()
    assert {e["type"] for e in p.events(tenant=t)} >= {"deployed", "started"}
    state = p.cluster.state_dir
    cluster_dir = state / "clusters" / p.cluster.name
    dirs = [state / "packages" / t, cluster_dir / "apps" / t, cluster_dir / "logs" / "instances" / t]
    assert all(d.is_dir() for d in dirs), dirs
    assert any((cluster_dir / "heartbeats" / i).exists() for i in ids)
    names = Names(p.cluster.name)
    admin = BrokerAdmin(p.cluster.settings)
    assert admin.names("queues", names.task_exchange(t) + ".")
    paths = p.cluster.paths
    from orchestrator.runtimes.confine import Jail, account_name
    unix_account = account_name(Jail(p.cluster.settings).scope, t)
    confined = _user_exists(unix_account)   # the process runtime made the tenant an account here

    # Delete the tenant: its instances stop first, then everything goes.
    status, body, _ = p.api("DELETE", f"/api/v1/tenants/{t}", timeout=120)
    assert status == 200 and body == {}, body
    for d in dirs:
        assert not d.exists(), d
    for i in ids:
        assert not (cluster_dir / "heartbeats" / i).exists(), i
        assert not (cluster_dir / "runtime" / "instances" / f"{i}.json").exists(), i
    zk = p.cluster.zk
    assert not [r for r in zk.get_children(paths.routes) if r.startswith(t + ".")]
    for node in (f"{paths.apps}/{t}", f"{paths.instances}/{t}", paths.tenant_events(t), paths.tenant(t)):
        assert zk.exists(node) is None, node
    assert admin.names("queues", names.task_exchange(t) + ".") == []
    assert names.task_exchange(t) not in admin.names("exchanges", names.task_exchange(t))
    assert p.gateway("GET", "/shop")[0] == 404
    if confined:
        assert not _user_exists(unix_account), unix_account
    time.sleep(1.0)   # an exit told late would land now: none may
    assert zk.exists(paths.tenant_events(t)) is None

    # The same name again: a new tenant that sees nothing of the old one.
    p.create(t)
    assert p.api("GET", f"/api/v1/tenants/{t}/apps")[1] == []
    status, body, _ = p.api("GET", f"/api/v1/tenants/{t}/events")
    assert status == 200 and body == {"events": [], "next": 0}, body
    assert _logs(p, t) == []
    tok = {"Authorization": f"Bearer {p.token(t)}"}
    status, body, _ = p.gateway("GET", "/api/v1/logs", None, tok)   # as its owner, through the gateway
    assert status == 200 and body["lines"] == [], body
    assert not any(marker in json.dumps(line) for line in body["lines"])
    status, body, _ = p.api("PUT", f"/api/v1/tenants/{t}/apps/shop", m)   # no package of the old one
    assert status == 400 and "no package" in body["error"], body
    status, body, _ = p.api("PUT", f"/api/v1/tenants/{t}/apps/shop?digest={digest}", m)
    assert status == 400 and "no package" in body["error"], body
    assert not (state / "packages" / t).exists()
    assert bzk.get_json(zk, paths.tenant(t))["name"] == t
    assert p.api("DELETE", f"/api/v1/tenants/{t}", timeout=120)[0] == 200
