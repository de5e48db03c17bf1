"""ZooKeeper's walls (issue #22; bus/zk.py, docs/architecture.md): a running
cluster (a real orchestrator, its DB workers, a tenant's app, a gateway) keeps
every znode of its tree under an ACL that grants ALL to the platform's digest
identity alone. An unauthenticated client, and one with a wrong digest, get
NoAuthError reading, listing, writing, creating or deleting any of them (the
app's desired record, its route, the leader record, ...), while the platform
works as before. What stays visible: exists() of a path one already knows
(ZooKeeper checks no ACL there). A tree made before ACLs is re-ACL'd when a
platform client connects, within a bounded time."""
from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError, NoNodeError
from kazoo.security import OPEN_ACL_UNSAFE, Permissions

from bus import zk as bzk
from bus.names import Paths
from bus.settings import load
from harness import LocalCluster
from kits.appskit import shop_package
from kits.testkit import Client, real_orchestrator, start_gateway, wait_until
from stratus import builtin

pytestmark = pytest.mark.timeout(300)


class Running:
    cluster: LocalCluster
    orch: int
    gw: int
    tenant: str


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    cluster = LocalCluster(tmp_path_factory.mktemp("zkacl"), health_interval=0.5)
    try:
        with real_orchestrator(cluster) as orch:
            r = Running()
            r.cluster, r.orch, r.tenant = cluster, orch, f"acme-{uuid.uuid4().hex[:6]}"

            def created():
                c = Client(orch, timeout=60)
                try:
                    return c.request("POST", "/api/v1/tenants", {"name": r.tenant})[0] == 201 or None
                finally:
                    c.close()
            wait_until(created, 90, 0.5, what=f"tenant {r.tenant} created")
            r.gw = start_gateway(cluster, "gw")
            manifest, package = shop_package()
            builtin.deploy(f"http://127.0.0.1:{orch}", r.tenant, "shop", manifest, package)
            paths = cluster.paths
            wait_until(lambda: all(cluster.zk.exists(p) for p in (
                paths.app(r.tenant, "shop"), paths.app_route(r.tenant, "shop"), paths.leader,
                paths.app_instances(r.tenant, "shop"))) or None, 60, 0.1, what="the app's znodes")
            yield r
    finally:
        cluster.close()


def _client(auth=None) -> KazooClient:
    zk = KazooClient(hosts=load().zk_hosts, timeout=2.0, auth_data=auth)
    zk.start(timeout=10)
    return zk


@pytest.fixture(params=["anonymous", "wrong digest"])
def intruder(request):
    zk = _client(None if request.param == "anonymous" else [("digest", "stratus:not-the-secret")])
    yield zk
    zk.stop()
    zk.close()


def _tree(zk: KazooClient, root: str) -> list[str]:
    out, level = [], [root]
    while level:
        out += level
        level = [f"{p}/{c}" for p in level for c in zk.get_children(p)]
    return out


def _platform_paths(r: Running) -> dict[str, str]:
    p = r.cluster.paths
    return {"root": p.root, "leader": p.leader, "workers": p.workers, "tenant": p.tenant(r.tenant),
            "app desired": p.app(r.tenant, "shop"), "route": p.app_route(r.tenant, "shop"),
            "routes": p.routes, "services": p.services, "orchestrator election": p.orchestrators,
            "instances": p.app_instances(r.tenant, "shop")}


def test_the_platform_works_under_its_acls(running):
    """The gateway reads the route and the registry, the controller the
    desired record: the app answers through the gateway."""
    wait_until(lambda: Client(running.gw, timeout=5).get("/shop")[0] == 200 or None, 60, 0.1,
               what="the shop to answer through the gateway")


def test_every_znode_of_the_cluster_is_the_platform_identitys_alone(running):
    zk = running.cluster.zk
    ident = bzk.platform_identity(running.cluster.settings)
    nodes = _tree(zk, running.cluster.paths.root)
    for name, path in _platform_paths(running).items():
        assert path in nodes, f"{name} ({path}) was not written by the running cluster"
    assert len(nodes) > 20
    for path in nodes:
        acl, _ = zk.get_acls(path)
        assert [(a.perms, a.id.scheme, a.id.id) for a in acl] == [(Permissions.ALL, "digest", ident.digest_id)], path
    # the secret: 0600 in a 0700 directory of the state dir
    secret = Path(running.cluster.settings.state_path) / "secrets" / "zookeeper"
    assert secret.stat().st_mode & 0o777 == 0o600 and secret.parent.stat().st_mode & 0o777 == 0o700


def test_an_intruder_can_neither_read_nor_write(running, intruder):
    platform = running.cluster.zk
    for name, path in _platform_paths(running).items():
        before = platform.get(path)[0]
        for op, call in [("get", lambda: intruder.get(path)),
                         ("get_children", lambda: intruder.get_children(path)),
                         ("get_acls", lambda: intruder.get_acls(path)),
                         ("set", lambda: intruder.set(path, b'{"instances":99}')),
                         ("create child", lambda: intruder.create(path + "/evil", b"x")),
                         ("set_acls", lambda: intruder.set_acls(path, OPEN_ACL_UNSAFE))]:
            with pytest.raises(NoAuthError):
                call()
                pytest.fail(f"{op} on the {name} ({path}) was allowed")
        assert platform.get(path)[0] == before, f"the {name} changed"
    # deleting a leaf needs DELETE on its parent: refused too
    with pytest.raises(NoAuthError):
        intruder.delete(running.cluster.paths.leader)
    with pytest.raises(NoAuthError):
        intruder.delete(running.cluster.paths.app_route(running.tenant, "shop"))
    # /stratus lists no cluster to anyone but the identity that made it private
    with pytest.raises(NoAuthError):
        intruder.get_children("/stratus")
    # what stays visible: exists() of a path one already knows (ZooKeeper
    # checks no ACL there; the stat carries sizes, versions and times)
    assert intruder.exists(running.cluster.paths.leader) is not None
    assert intruder.exists(running.cluster.paths.root + "/no-such-node") is None
    # ...and the platform's own client still reads it all
    assert bzk.get_json(platform, running.cluster.paths.app_route(running.tenant, "shop"))["app"] == "shop"


def test_a_tree_made_before_acls_is_secured_at_connect(tmp_path):
    """A cluster tree written without ACLs (an upgrade) is given the platform's
    ACL by the first platform client's connect(), the root last; past its time
    budget it leaves the root open and the next connect() goes on."""
    name = f"t{uuid.uuid4().hex[:10]}"
    paths = Paths(name)
    settings = dataclasses.replace(load(), cluster=name, state_dir=str(tmp_path / "state"))
    old = _client()
    try:
        legacy = [paths.leader, paths.app("acme", "shop"), paths.app_route("acme", "shop"),
                  paths.tenant("acme"), paths.worker("w1")] + [f"{paths.events}/acme/e{i:04d}" for i in range(300)]
        for p in legacy:
            old.create(p, b'{"x":1}', makepath=True)
        assert old.get_acls(paths.root)[0] == OPEN_ACL_UNSAFE
        # a zero budget: nothing is half done at the root, which stays open for the next start
        ident = bzk.platform_identity(settings)
        pzk = bzk.connect(settings, secure=False)
        try:
            bzk.secure_cluster(pzk, settings, ident, budget=0.0)
            assert old.get_acls(paths.root)[0] == OPEN_ACL_UNSAFE
        finally:
            pzk.stop()
            pzk.close()
        zk = bzk.connect(settings)     # the start that secures it
        try:
            nodes = _tree(zk, paths.root)
            assert len(nodes) >= len(legacy)
            for p in nodes:
                assert [a.id.scheme for a in zk.get_acls(p)[0]] == ["digest"], p
            for p in (paths.root, paths.leader, paths.app("acme", "shop"), f"{paths.events}/acme/e0299"):
                with pytest.raises(NoAuthError):
                    old.get(p)
            assert bzk.get_json(zk, paths.leader) == {"x": 1}
            assert bzk.secure_cluster(zk, settings, ident) == 0    # done: one getACL at the next start
        finally:
            zk.delete(paths.root, recursive=True)
            zk.stop()
            zk.close()
        with pytest.raises(NoNodeError):
            old.get(paths.root)
    finally:
        old.stop()
        old.close()
