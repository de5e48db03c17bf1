"""Unit tests of bus/routing.py's pure parts: prefix matching (longest
prefix, whole segments, "/" covering everything), prefix checks, parsing
entries and building the table (invalid routes left out, one owner per
prefix). The watches are tested against the real ZooKeeper in
tests/integration/test_gateway_app_routes.py."""
import json

import pytest

from bus import routing
from bus.routing import BadRoute, Entry, build, check_prefix, match_prefix, parse


def _entry(tenant, app, routes, by="orchestrator"):
    return {"tenant": tenant, "app": app, "by": by,
            "routes": {p: {"role": r, "service": s} for p, (r, s) in routes.items()}}


SHOP = Entry("acme", "shop", "web", "app.acme.shop.web")
API = Entry("acme", "shop", "api", "app.acme.shop.api")
ROOT = Entry("beta", "site", "web", "app.beta.site.web")


@pytest.mark.parametrize("path,expected", [
    ("/shop", "/shop"), ("/shop/", "/shop"), ("/shop/x", "/shop"), ("/shop/x/y", "/shop"),
    ("/shop/api", "/shop/api"), ("/shop/api/", "/shop/api"), ("/shop/api/v2/items", "/shop/api"),
    ("/shop/apis", "/shop"),              # a whole segment, not a string prefix
    ("/shopping", None), ("/sho", None), ("/", None), ("", None), ("/SHOP", None), ("//shop", None),
])
def test_longest_whole_segment_prefix_wins(path, expected):
    table = {"/shop": SHOP, "/shop/api": API}
    found = match_prefix(table, path)
    assert (found[0] if found else None) == expected
    if expected:
        assert found[1] == {"/shop": SHOP, "/shop/api": API}[expected]


def test_root_covers_every_path_others_do_not_own():
    table = {"/": ROOT, "/shop": SHOP}
    assert match_prefix(table, "/") == ("/", ROOT)
    assert match_prefix(table, "") == ("/", ROOT)
    assert match_prefix(table, "/shopping/cart") == ("/", ROOT)
    assert match_prefix(table, "/shop/cart") == ("/shop", SHOP)
    assert match_prefix({}, "/anything") is None


def test_match_costs_one_lookup_per_segment():
    class Counting(dict):
        lookups = 0

        def get(self, k, default=None):
            Counting.lookups += 1
            return super().get(k, default)
    table = Counting({"/a": SHOP})
    assert match_prefix(table, "/a/b/c/d/e")[0] == "/a"
    assert Counting.lookups == 5      # /a/b/c/d/e, /a/b/c/d, /a/b/c, /a/b, /a


@pytest.mark.parametrize("prefix", ["/", "/shop", "/shop/api", "/a-b_c.d~e", "/%7Euser"])
def test_good_prefixes(prefix):
    assert check_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["", "shop", "/shop/", "//shop", "/a//b", "/a/./b", "/..", "/a?x=1", "/a#f",
                                    "/a b", "/a\\b", "/a\x00", None, 5, "/" + "x" * 1024])
def test_bad_prefixes(prefix):
    with pytest.raises(BadRoute):
        check_prefix(prefix)


def test_parse_accepts_entries_only():
    good = _entry("acme", "shop", {"/shop": ("web", "app.acme.shop.web")})
    assert parse(json.dumps(good).encode()) == good
    for raw in (None, b"", b"{", b"\xff", b"[]", b"{}", json.dumps({"tenant": "a", "app": "b"}).encode(),
                json.dumps({"tenant": 1, "app": "b", "routes": {}}).encode(),
                json.dumps({"tenant": "a", "app": "b", "routes": []}).encode()):
        assert parse(raw) is None, raw


def test_build_leaves_out_invalid_routes_and_keeps_one_owner_per_prefix():
    found = {
        "acme.shop": _entry("acme", "shop", {"/shop": ("web", "app.acme.shop.web"),
                                             "/shop/api": ("api", "app.acme.shop.api")}),
        "beta.site": {"tenant": "beta", "app": "site", "routes": {
            "/": {"role": "web", "service": "app.beta.site.web"},
            "/shop": {"role": "web", "service": "app.beta.site.web"},   # acme.shop sorts first: it keeps /shop
            "no-slash": {"role": "web", "service": "x"},
            "/bad/": {"role": "web", "service": "x"},
            "/norole": {"service": "x"},
            "/emptyservice": {"role": "web", "service": ""},
            "/notadict": "web",
        }},
    }
    assert build(found) == {"/shop": SHOP, "/shop/api": API, "/": ROOT}
    assert build({}) == {}


def test_publish_refuses_what_it_could_not_route():
    class NoZK:
        def __getattr__(self, name):
            raise AssertionError("nothing may be written")
    from bus.names import Paths
    paths = Paths("unit")
    for tenant, app, routes, by in [
            ("acme", "shop", {"/shop/": ("web", "s")}, "orchestrator"),
            ("acme", "shop", {"/shop": ("", "s")}, "orchestrator"),
            ("acme", "shop", {"/shop": ("web", "a/b")}, "orchestrator"),
            ("acme", "shop", {"/shop": ("web", "s")}, "someone"),
            ("ac.me", "shop", {"/shop": ("web", "s")}, "orchestrator"),
            ("acme", "", {"/shop": ("web", "s")}, "orchestrator")]:
        with pytest.raises(BadRoute):
            routing.publish(NoZK(), paths, tenant, app, routes, by=by)
    assert paths.app_route("acme", "shop").endswith("/routes/acme.shop")
