"""The reserved-routes rule of paas.md (Apps), as one pure function in
bus/routing.py: "Everything under /api, /dashboard, /health and /metrics,
compared by path segment and without regard to case, is reserved for the
platform; of it, only the built-in apps' documented paths (/api/v1/users,
/api/v1/rides) may be claimed, and only by their own tenant."

- `reserved`: by segment (/apix, /healthz, /dashboardx, /metricsfoo are not
  reserved), any case, trailing "/", "//", percent-encoding, dot segments;
- `claim_refusal` (the orchestrator's 409, through manifest.check_routes) and
  `builtin_claim`: the exceptions for rideshare only, exactly as written;
- `build` drops reserved prefixes that are not a built-in claim, and the
  gateway's `router.route` never gives a reserved path to another app, not
  even one owning "/" (properties over generated paths)."""
import string
from urllib.parse import quote

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bus import routing
from bus.routing import Entry, build, builtin_claim, claim_refusal, reserved
from gateway import router
from orchestrator.apps.manifest import ManifestError, check_routes, parse

ROOTS = ("api", "dashboard", "health", "metrics")


@pytest.mark.parametrize("path", [
    "/api", "/API/x", "/Api/", "/api/v1/login", "/api/v1/users", "/dashboard", "/Dashboard/x", "/HEALTH",
    "/health/", "/metrics", "/MeTrIcS/a/b", "//api", "/./api", "/x/../api/v1", "/%61pi", "/%41PI/v1",
    "/%2Fhealth", "/%2fmetrics/x", "/api%2Fv1", "/\\api", "///dashboard//x",
])
def test_reserved_by_segment_any_case_or_encoding(path):
    assert reserved(path), path


@pytest.mark.parametrize("path", [
    "/", "", "/apix", "/dashboardx", "/healthz", "/metricsfoo", "/shop", "/shop/api", "/x/health",
    "/v1/api", "/ap", "/api-v2", "/%61pix", "/api.v1",
])
def test_not_reserved(path):
    assert not reserved(path), path


def test_builtin_claims_only_for_rideshare_and_exactly_as_written():
    for p in ("/api/v1/users", "/api/v1/rides", "/api/v1/rides/count", "/api/v1/users/x"):
        assert builtin_claim(p, "rideshare") and claim_refusal(p, "rideshare") is None, p
        assert not builtin_claim(p, "acme") and claim_refusal(p, "acme") is not None, p
        assert claim_refusal(p, "toystore") is not None, p
    for p in ("/API/v1/users", "/api/V1/rides", "/api/v1/usersx", "/api/v1", "/api", "/api/v1/%75sers",
              "/api/v1/users/../tenants", "/api/v1/users/./x", "//api/v1/users", "/api/v1/users/",
              "/api/v1/tenants", "/api/v1/login"):
        assert not builtin_claim(p, "rideshare"), p
        assert claim_refusal(p, "rideshare") is not None, p


def test_claim_refusal_messages_and_what_is_free():
    assert "reserved for the platform" in claim_refusal("/API/v1/login", "acme")
    assert "/api" in claim_refusal("/API/v1/login", "acme")
    assert "cover" in claim_refusal("/", "acme")   # "/" takes the reserved paths along
    for p in ("/apix", "/dashboardx", "/healthz", "/metricsfoo", "/shop", "/products", "/x/api", "/x/health"):
        assert claim_refusal(p, "acme") is None, p


def web(routes):
    return parse({"roles": {"web": {"kind": "web", "command": ["x"], "routes": routes}}})


@pytest.mark.parametrize("route", ["/api/v1/login", "/API", "/Api/v1/x", "/Dashboard", "/HEALTH/x", "/Metrics",
                                   "/%61pi", "/api/v1/users", "/api/v1/rides"])
def test_manifest_check_routes_refuses_409(route):
    with pytest.raises(ManifestError) as e:
        check_routes(web([route]), {}, "acme", "shop")
    assert e.value.status == 409 and "reserved" in e.value.message


def test_manifest_check_routes_lets_rideshare_claim_its_paths():
    check_routes(web(["/api/v1/users", "/api/v1/rides"]), {}, "rideshare", "rideshare")
    check_routes(web(["/healthz", "/dashboardx"]), {}, "acme", "shop")
    with pytest.raises(ManifestError):
        check_routes(web(["/api/v1/login"]), {}, "rideshare", "rideshare")


# --- properties --------------------------------------------------------------------
segment = st.text(alphabet=string.ascii_letters + string.digits + "-._~", min_size=1, max_size=8).filter(
    lambda s: s not in (".", ".."))
rest = st.lists(segment, max_size=3)


def case_variant(word: str, flips: list[bool]) -> str:
    return "".join(c.upper() if f else c for c, f in zip(word, flips + [False] * len(word)))


def mangle(path: str, how: int) -> str:
    """The same path as a server resolves it, written another way."""
    if how == 0:
        return path + "/"
    if how == 1:
        return "/" + path                        # "//..."
    if how == 2:
        return path.replace("/", "//")
    if how == 3:
        return "/./" + path.lstrip("/")
    if how == 4:
        return "/zz/.." + path
    if how == 5:
        return "".join(quote(c, safe="") if c.isalpha() else c for c in path)   # %-encoded letters
    return path


@given(st.sampled_from(ROOTS), st.lists(st.booleans(), max_size=9), rest, st.integers(0, 6))
def test_under_a_root_is_reserved_whatever_its_spelling(root, flips, tail, how):
    path = "/" + "/".join([case_variant(root, flips), *tail])
    assert reserved(path) and reserved(mangle(path, how))
    assert claim_refusal(path, "acme") is not None


@given(segment, rest, st.integers(0, 6))
def test_outside_the_roots_nothing_is_reserved(first, tail, how):
    assume(first.casefold() not in ROOTS)
    path = "/" + "/".join([first, *tail])
    assert not reserved(path) and not reserved(mangle(path, how))
    assert claim_refusal(path, "acme") is None   # e.g. /apix, /healthz: free by segment


# A table as the gateway builds it, with a hostile tenant's prefixes: "/" and case variants.
HOSTILE = {
    "evil.site": {"tenant": "evil", "app": "site", "routes": {
        p: {"role": "web", "service": "app.evil.site.web"}
        for p in ("/", "/API", "/Health", "/dashboard/x", "/api/v1/users/me", "/%61pi", "/metricsfoo")}},
    "rideshare.rideshare": {"tenant": "rideshare", "app": "rideshare", "routes": {
        "/api/v1/users": {"role": "users", "service": "users"},
        "/api/v1/rides": {"role": "rides", "service": "rides"}}},
}


class Table:
    def __init__(self, found):
        self.table = build(found)

    def match(self, path):
        return routing.match_prefix(self.table, path)


def test_build_drops_reserved_prefixes_of_other_tenants():
    t = build(HOSTILE)
    assert set(t) == {"/", "/metricsfoo", "/api/v1/users", "/api/v1/rides"}
    assert t["/api/v1/users"] == Entry("rideshare", "rideshare", "users", "users")


@settings(max_examples=300)
@given(st.sampled_from(ROOTS), st.lists(st.booleans(), max_size=9), rest, st.integers(0, 6))
def test_the_gateway_never_gives_a_platform_path_to_another_tenant(root, flips, tail, how):
    path = mangle("/" + "/".join([case_variant(root, flips), *tail]), how)
    try:
        router.check_path(path)
    except router.BadPath:
        return   # refused with 400 before routing
    r = router.route(path, Table(HOSTILE))
    assert r.owner in (None, "rideshare"), (path, r)
    if r.owner == "rideshare":   # only through its own documented paths, written exactly
        assert path.startswith(("/api/v1/users", "/api/v1/rides"))


@pytest.mark.parametrize("path,owner", [
    ("/health", None), ("/metrics", None), ("/dashboard/", None), ("/api/v1/tenants", None),
    ("/HEALTH", None), ("/Health/", None), ("/health//", None), ("//metrics", None), ("/Dashboard", None),
    ("/api/v1/users/me", "rideshare"), ("/API/v1/users", None), ("/apix", "evil"), ("/healthz", "evil"),
    ("/metricsfoo/1", "evil"), ("/", "evil"),
])
def test_the_platforms_own_routes_cannot_be_shadowed(path, owner):
    r = router.route(path, Table(HOSTILE))
    assert r.owner == owner, (path, r)
    if path in ("/health", "/metrics"):
        assert r in (router.HEALTH, router.METRICS)
    if path == "/dashboard/":
        assert r.service == router.DASHBOARD_SERVICE
