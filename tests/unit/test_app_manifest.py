"""App manifests (paas.md, Apps): every validation rule (400), route
ownership with the platform's reserved prefixes and other apps' (409), the
instance quota (409). Pure: orchestrator.apps.manifest has no I/O."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st

from orchestrator.apps import AppError
from orchestrator.apps import manifest as mf
from orchestrator.apps.manifest import ManifestError, check_quota, check_routes, covers, overlaps, parse

EXAMPLE = {
    "roles": {
        "web": {"kind": "web", "command": ["python", "-m", "shop.web"], "instances": 2,
                "routes": ["/shop"], "health": "/health", "env": {"GREETING": "hi"}},
        "jobs": {"kind": "worker", "command": ["python", "-m", "shop.jobs"], "instances": 1},
    }
}


def web(**kw):
    return {"roles": {"web": {"kind": "web", "command": ["run"], **kw}}}


def refused(data, status=400, quota=16) -> str:
    with pytest.raises(ManifestError) as e:
        parse(data, quota=quota)
    assert e.value.status == status
    assert isinstance(e.value, AppError) and e.value.message
    return e.value.message


def test_the_spec_example_parses():
    m = parse(EXAMPLE)
    w, j = m.roles["web"], m.roles["jobs"]
    assert (w.kind, w.command, w.instances, w.routes, w.health, w.env) == \
        ("web", ("python", "-m", "shop.web"), 2, ("/shop",), "/health", {"GREETING": "hi"})
    assert (j.kind, j.routes, j.health, j.image) == ("worker", (), "/health", None)
    assert m.instances == 3 and m.routes == ("/shop",)


def test_round_trip_and_text_forms():
    m = parse(EXAMPLE)
    assert parse(m.to_dict()) == m
    assert parse(json.dumps(EXAMPLE)) == m
    assert parse(json.dumps(EXAMPLE).encode()) == m


def test_defaults():
    r = parse({"roles": {"w": {"kind": "web", "image": "shop:1"}}}).roles["w"]
    assert (r.instances, r.health, r.routes, r.env, r.command, r.image) == (1, "/health", (), {}, None, "shop:1")


def test_frozen():
    m = parse(EXAMPLE)
    with pytest.raises(Exception):
        m.roles["web"].instances = 5  # type: ignore[misc]


@pytest.mark.parametrize("data", [None, [], "[]", "not json", b"\xff\xfe", 3, {"roles": {}}, {"roles": []},
                                  {"roles": {"web": {}}, "extra": 1}, {}])
def test_not_a_manifest(data):
    refused(data)


@pytest.mark.parametrize("kind", ["daemon", "", None, 1, "WEB"])
def test_unknown_kind(kind):
    assert "kind" in refused({"roles": {"r": {"kind": kind, "command": ["x"]}}})


@pytest.mark.parametrize("n", [-1, 17, 1.5, "2", True, None])
def test_instances_outside_0_to_quota(n):
    assert "instances" in refused(web(instances=n))


def test_instances_bounds_follow_the_quota():
    assert parse(web(instances=0)).roles["web"].instances == 0
    assert parse(web(instances=16)).roles["web"].instances == 16
    assert parse(web(instances=3), quota=3).roles["web"].instances == 3
    refused(web(instances=4), quota=3)


@pytest.mark.parametrize("route", ["shop", "", "shop/x", "//x", "/a//b", "/a/", "/a/../b", "/./a", "/a b",
                                   "/a?x=1", "/a#f", 5, None])
def test_bad_routes(route):
    assert "route" in refused(web(routes=[route]))


def test_routes_must_be_a_list_and_unique():
    refused(web(routes="/shop"))
    refused(web(routes=["/shop", "/shop"]))
    two = {"roles": {"a": {"kind": "web", "command": ["x"], "routes": ["/s"]},
                     "b": {"kind": "web", "command": ["x"], "routes": ["/s"]}}}
    assert "both" in refused(two)


def test_routes_only_on_web_roles():
    assert "only web roles" in refused({"roles": {"j": {"kind": "worker", "command": ["x"], "routes": ["/j"]}}})


def test_root_route_and_nested_routes_are_valid_paths():
    assert parse(web(routes=["/"])).roles["web"].routes == ("/",)
    assert parse(web(routes=["/shop", "/shop-admin/v1"])).routes == ("/shop", "/shop-admin/v1")


@pytest.mark.parametrize("spec", [{"kind": "web"}, {"kind": "web", "command": []}, {"kind": "web", "command": "run"},
                                  {"kind": "web", "command": ["ok", ""]}, {"kind": "web", "command": [1]},
                                  {"kind": "web", "image": ""}, {"kind": "web", "image": 3},
                                  {"kind": "web", "command": None, "image": None}])
def test_command_or_image(spec):
    refused({"roles": {"r": spec}})


def test_command_and_image_both_allowed():
    r = parse({"roles": {"r": {"kind": "worker", "command": ["x"], "image": "i:1"}}}).roles["r"]
    assert r.command == ("x",) and r.image == "i:1"


@pytest.mark.parametrize("name", ["", "Web", "1web", "we b", "web.x", "w" * 33, "-w", "_w", "web_2"])
def test_role_names_are_identifiers(name):
    assert "role name" in refused({"roles": {name: {"kind": "web", "command": ["x"]}}})


@pytest.mark.parametrize("name", ["w", "web", "web2", "jobs-a", "r" * 32])
def test_good_role_names(name):
    assert name in parse({"roles": {name: {"kind": "worker", "command": ["x"]}}}).roles


@pytest.mark.parametrize("env", [{"A": 1}, {"A": None}, {"A": ["x"]}, {"1A": "x"}, {"A-B": "x"}, {"": "x"},
                                 {"A": "x\x00"}, ["A=x"], "A=x"])
def test_env_keys_and_values_are_strings(env):
    assert "env" in refused(web(env=env))


@pytest.mark.parametrize("key", ["STRATUS_TENANT", "STRATUS_AMQP_URL", "stratus_role", "STRATUS_", "PORT"])
def test_platform_env_keys_refused(key):
    assert "platform" in refused(web(env={key: "x"}))


@pytest.mark.parametrize("health", ["health", "", "/a/", 3])
def test_health_path(health):
    assert "health" in refused(web(health=health))


def test_unknown_role_key_refused():
    assert "unknown" in refused(web(instance=2))


def test_scaled():
    m = parse(EXAMPLE)
    s = m.scaled("web", 5)
    assert s.roles["web"].instances == 5 and m.roles["web"].instances == 2
    assert s.roles["jobs"] == m.roles["jobs"]
    with pytest.raises(ManifestError) as e:
        m.scaled("web", 17)
    assert e.value.status == 400
    with pytest.raises(KeyError):
        m.scaled("nope", 1)


def test_app_names():
    assert mf.check_app_name("shop-2") == "shop-2"
    for bad in ["s", "Shop", "2shop", "a" * 33, "a/b", "..", None]:
        with pytest.raises(ManifestError):
            mf.check_app_name(bad)


# --- ownership (409) -------------------------------------------------------------------
def conflict(m, owned, tenant="acme", app="shop") -> str:
    with pytest.raises(ManifestError) as e:
        check_routes(m, owned, tenant, app)
    assert e.value.status == 409
    return e.value.message


@pytest.mark.parametrize("route", ["/api/v1/auth", "/api/v1/auth/token", "/api/v1/tenants", "/api/v1/tenants/x",
                                   "/api/v1/db/read", "/dashboard", "/dashboard/x", "/health", "/metrics",
                                   "/api/v1/logs", "/api/v1/cluster", "/api/v1/switchover", "/api/v1/worker/x",
                                   "/api/v1/crash", "/api/v1/developers", "/api/v1", "/api", "/",
                                   # everything under /api, by segment, any case (paas.md, Apps)
                                   "/api/v1/login", "/api/v1/db2", "/API", "/Health/x", "/DASHBOARD",
                                   # the built-in paths, for any tenant but their own
                                   "/api/v1/users", "/api/v1/rides"])
def test_reserved_prefixes(route):
    assert "platform" in conflict(parse(web(routes=[route])), {})


@pytest.mark.parametrize("route", ["/shop", "/healthz", "/metricsx", "/dashboards", "/apix", "/x/api"])
def test_near_reserved_is_fine(route):
    check_routes(parse(web(routes=[route])), {}, "acme", "shop")


def test_the_built_in_paths_are_their_own_tenants():
    check_routes(parse(web(routes=["/api/v1/users", "/api/v1/rides"])), {}, "rideshare", "rideshare")


def test_another_apps_prefix():
    owned = {"/shop": ("beta", "store"), "/x/y": ("acme", "other")}
    for p in ["/shop", "/shop/cart", "/x", "/x/y/z"]:
        assert "another app" in conflict(parse(web(routes=[p])), owned)
    check_routes(parse(web(routes=["/shopping", "/x/z"])), owned, "acme", "shop")


def test_own_routes_do_not_conflict():
    owned = {"/shop": ("acme", "shop")}
    check_routes(parse(web(routes=["/shop", "/shop/x"])), owned, "acme", "shop")
    # the same app name in another tenant is another app
    conflict(parse(web(routes=["/shop"])), {"/shop": ("beta", "shop")})


segment = st.text(alphabet="abc", min_size=1, max_size=3)
paths = st.lists(segment, min_size=0, max_size=4).map(lambda s: "/" + "/".join(s))


@given(paths, paths)
def test_overlap_is_symmetric_and_means_a_shared_path(a, b):
    assert overlaps(a, b) == overlaps(b, a)
    # a and b overlap exactly when one's segments are a prefix of the other's
    sa, sb = [x for x in a.split("/") if x], [x for x in b.split("/") if x]
    n = min(len(sa), len(sb))
    assert overlaps(a, b) == (sa[:n] == sb[:n])
    assert covers("/", a) and covers(a, a)


@given(paths, paths)
def test_check_routes_agrees_with_overlaps(a, b):
    m = parse(web(routes=[a]))
    try:
        check_routes(m, {b: ("other", "app")}, "acme", "shop")
        ok = True
    except ManifestError as e:
        assert e.status == 409
        ok = False
    assert ok == (not overlaps(a, b))


# --- quota (409) ------------------------------------------------------------------------
def test_quota():
    check_quota(16, 0)
    check_quota(10, 6)
    check_quota(0, 16)
    for n, others, q in [(17, 0, 16), (10, 7, 16), (1, 16, 16), (3, 0, 2)]:
        with pytest.raises(ManifestError) as e:
            check_quota(n, others, q)
        assert e.value.status == 409 and str(q) in e.value.message
