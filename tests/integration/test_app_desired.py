"""The desired state of apps in the real ZooKeeper (orchestrator/apps/desired.py):
put/get/list/delete, the route index, compare-and-set between two writers on
their own ZooKeeper sessions (no update lost), set_instances, and the 404/409
refusals. Each test has its own cluster namespace (the `cluster` fixture),
removed afterwards."""
from __future__ import annotations

import dataclasses
import threading

import pytest

from bus import zk as bzk
from orchestrator.apps import AppError
from orchestrator.apps.desired import App, Desired
from orchestrator.apps.manifest import parse


def manifest(route="/shop", web=2, jobs=1):
    return parse({"roles": {
        "web": {"kind": "web", "command": ["python", "-m", "shop.web"], "instances": web, "routes": [route]},
        "jobs": {"kind": "worker", "command": ["python", "-m", "shop.jobs"], "instances": jobs},
    }})


DIGEST = "sha256:" + "ab" * 32


@pytest.fixture
def desired(cluster):
    return Desired(cluster.zk, cluster.name)


@pytest.fixture
def second(cluster):
    """Another orchestrator: its own ZooKeeper session."""
    zk = bzk.connect(cluster.settings)
    yield Desired(zk, cluster.name)
    zk.stop()
    zk.close()


def status(fn, *a, **kw) -> int:
    with pytest.raises(AppError) as e:
        fn(*a, **kw)
    assert e.value.message
    return e.value.status


def test_put_get_list_delete(desired, cluster):
    assert desired.get("acme", "shop") is None and desired.list("acme") == []
    app, created = desired.put("acme", "shop", manifest(), DIGEST)
    assert created and app.generation == 1 and app.digest == DIGEST
    got = desired.get("acme", "shop")
    assert got == app and got.manifest == manifest()
    # the znode holds the documented record
    rec = bzk.get_json(cluster.zk, cluster.paths.app("acme", "shop"))
    assert set(rec) == {"manifest", "digest", "generation", "updated", "restart"} and rec["generation"] == 1
    assert rec["manifest"] == manifest().to_dict()

    again, created = desired.put("acme", "shop", manifest(web=3), "sha256:" + "cd" * 32)
    assert not created and again.generation == 2 and again.manifest.roles["web"].instances == 3
    desired.put("acme", "blog", manifest("/blog"), DIGEST)
    desired.put("beta", "shop", manifest("/beta-shop"), DIGEST)
    assert [a.name for a in desired.list("acme")] == ["blog", "shop"]
    assert {(a.tenant, a.name) for a in desired.all()} == {("acme", "blog"), ("acme", "shop"), ("beta", "shop")}
    assert desired.routes() == {"/shop": ("acme", "shop"), "/blog": ("acme", "blog"), "/beta-shop": ("beta", "shop")}

    desired.delete("acme", "shop")
    assert desired.get("acme", "shop") is None
    assert [a.name for a in desired.list("acme")] == ["blog"]
    assert status(desired.delete, "acme", "shop") == 404
    desired.delete("acme", "blog")
    assert desired.list("acme") == [] and "/blog" not in desired.routes()


def test_routes_owned_by_another_app_or_reserved(desired):
    desired.put("acme", "shop", manifest("/shop"), DIGEST)
    for t, a, route in [("beta", "shop", "/shop"), ("beta", "x", "/shop/cart"), ("acme", "other", "/shop"),
                        ("beta", "x", "/api/v1/tenants/beta"), ("beta", "x", "/")]:
        assert status(desired.put, t, a, manifest(route), DIGEST) == 409
        assert desired.get(t, a) is None
    # its own app may keep or move its routes
    desired.put("acme", "shop", manifest("/shop/v2"), DIGEST)
    desired.put("beta", "shopping", manifest("/shopping"), DIGEST)
    assert desired.routes()["/shopping"] == ("beta", "shopping")


def test_quota_across_apps(cluster):
    d = Desired(cluster.zk, cluster.name, quota=6)
    d.put("acme", "one", manifest("/one", web=2, jobs=2), DIGEST)            # 4
    assert status(d.put, "acme", "two", manifest("/two", web=2, jobs=1), DIGEST) == 409   # 4 + 3 > 6
    assert d.get("acme", "two") is None
    d.put("acme", "two", manifest("/two", web=1, jobs=1), DIGEST)            # 6
    d.put("beta", "one", manifest("/b", web=2, jobs=2), DIGEST)              # another tenant's quota
    # redeploying an app counts its new size, not old + new
    d.put("acme", "one", manifest("/one", web=3, jobs=1), DIGEST)
    assert status(d.set_instances, "acme", "one", "web", 4) == 409
    assert d.get("acme", "one").manifest.roles["web"].instances == 3


def test_set_instances(desired):
    desired.put("acme", "shop", manifest(), DIGEST)
    app = desired.set_instances("acme", "shop", "web", 5)
    assert app.generation == 2 and app.manifest.roles["web"].instances == 5
    assert app.manifest.roles["jobs"] == manifest().roles["jobs"]
    assert desired.get("acme", "shop") == app
    assert desired.set_instances("acme", "shop", "web", 0).manifest.roles["web"].instances == 0
    assert status(desired.set_instances, "acme", "shop", "nope", 1) == 404
    assert status(desired.set_instances, "acme", "nope", "web", 1) == 404
    assert status(desired.set_instances, "acme", "shop", "web", -1) == 400
    assert status(desired.set_instances, "acme", "shop", "web", 17) == 400
    assert status(desired.set_instances, "acme", "shop", "web", 16) == 409   # 16 + its 1 job > 16
    assert desired.get("acme", "shop").generation == 3


def test_expected_generation(desired):
    app, _ = desired.put("acme", "shop", manifest(), DIGEST, expect=0)
    assert status(desired.put, "acme", "shop", manifest(web=1), DIGEST, expect=0) == 409
    desired.put("acme", "shop", manifest(web=1), DIGEST, expect=app.generation)
    assert status(desired.set_instances, "acme", "shop", "web", 3, expect=app.generation) == 409
    assert desired.get("acme", "shop").manifest.roles["web"].instances == 1


def test_cas_conflict_between_two_writers_loses_nothing(desired, second):
    """Writer A reads, writer B changes the node, A's write then fails its
    version check and A recomputes from B's state: both changes survive."""
    desired.put("acme", "shop", manifest(web=1, jobs=1), DIGEST)
    calls = []

    def a_change(old: App) -> App:
        calls.append(old.generation)
        if len(calls) == 1:   # B writes between A's read and A's write
            second.update("acme", "shop", lambda o: dataclasses.replace(o, manifest=o.manifest.scaled("jobs", 4)))
        return dataclasses.replace(old, manifest=old.manifest.scaled("web", 3))

    result = desired.update("acme", "shop", a_change)
    assert calls == [1, 2]                     # A retried once, from B's record
    final = second.get("acme", "shop")
    assert final == result and final.generation == 3
    assert final.manifest.roles["web"].instances == 3 and final.manifest.roles["jobs"].instances == 4


def test_concurrent_increments_from_two_sessions(desired, second):
    """Two orchestrators, several threads each, every one adding 1 to a role
    by compare-and-set: the final count is the number of increments."""
    desired.put("acme", "shop", manifest(web=0, jobs=0), DIGEST)
    per, writers = 4, [desired, second, desired, second]
    errors = []

    def bump(d: Desired, role: str):
        try:
            for _ in range(per):
                d.update("acme", "shop", lambda o: dataclasses.replace(
                    o, manifest=o.manifest.scaled(role, o.manifest.roles[role].instances + 1)))
        except Exception as exc:   # reported below, not swallowed
            errors.append(exc)

    threads = [threading.Thread(target=bump, args=(d, "web" if i % 2 else "jobs")) for i, d in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a writer did not finish within 60 s"
    assert errors == []
    final = desired.get("acme", "shop")
    assert final.manifest.roles["web"].instances == 2 * per
    assert final.manifest.roles["jobs"].instances == 2 * per
    assert final.generation == 1 + len(writers) * per


def test_concurrent_deploys_of_one_prefix_one_wins(desired, second):
    """Two orchestrators deploy two apps claiming the same prefix at once:
    the apps lock orders them, exactly one succeeds, the other gets 409."""
    results = {}

    def deploy(d: Desired, app: str):
        try:
            d.put("acme" if app == "one" else "beta", app, manifest("/same"), DIGEST)
            results[app] = 200
        except AppError as exc:
            results[app] = exc.status

    threads = [threading.Thread(target=deploy, args=(desired, "one")),
               threading.Thread(target=deploy, args=(second, "two"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results.values()) == [200, 409], results
    assert len([p for p in desired.routes() if p == "/same"]) == 1


def test_an_unreadable_record_is_503_and_can_be_deleted(desired, cluster):
    cluster.zk.create(cluster.paths.app("acme", "shop"), b"{not json", makepath=True)
    assert status(desired.get, "acme", "shop") == 503
    assert status(desired.list, "acme") == 503
    cluster.zk.set(cluster.paths.app("acme", "shop"), b"{}")
    assert status(desired.get, "acme", "shop") == 503
    assert status(desired.put, "acme", "shop", manifest(), DIGEST) == 503   # never built on a broken record
    # delete still removes it, and a deploy starts again at generation 1
    desired.delete("acme", "shop")
    assert desired.put("acme", "shop", manifest(), DIGEST)[0].generation == 1
