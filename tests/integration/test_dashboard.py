"""The dashboard (dashboard/; issue 16; paas.md, Dashboard) over HTTP, on a
real platform (tests/kits/dashboardkit.py: a real orchestrator with its DB
workers and the example app's instances, a real gateway, the dashboard
process registered as "dashboard"), everything reached through the gateway
at /dashboard/ as a browser reaches it: sign-in through the form, the
session cookie, CSRF on every POST, each role's pages, a tenant kept out of
another's, scale / restart / deploy from the forms with the platform's
effect checked through its own API, logs by request id, the DB cluster,
switchover and tenant creation. The module's tests share one platform and
run in order (the shop app keeps 2 web and 1 jobs instance between tests)."""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from kits.dashboardkit import dashboard_platform, percentile, shop_package, timed
from kits.testkit import Client, free_port, wait_until

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def p(tmp_path_factory):
    # No Prometheus is asked here: the charts' endpoint is pointed at a closed port
    # (the charts with real data are the browser test's).
    with dashboard_platform(tmp_path_factory.mktemp("dash"),
                            STRATUS_PROMETHEUS_URL=f"http://127.0.0.1:{free_port()}") as platform:
        yield platform


def _flash(html: str) -> list[str]:
    return re.findall(r'<p class="flash[^"]*"[^>]*>([^<]*)</p>', html)


def _rows(html: str, attr: str) -> list[str]:
    return re.findall(rf'{attr}="([^"]+)"', html)


# --- sessions ------------------------------------------------------------------------------

def test_the_gateway_routes_the_dashboard_and_the_login_form_sets_a_strict_cookie(p):
    s = p.session()
    r = s.get("/dashboard/", allow_redirects=False)
    assert r.status_code == 302 and r.headers["Location"].startswith("/dashboard/login")
    r = s.get("/dashboard/login")
    assert r.status_code == 200 and "text/html" in r.headers["Content-Type"]
    assert '<label for="username">' in r.text and '<label for="password">' in r.text
    assert 'name="csrf_token"' in r.text
    cookie = r.headers["Set-Cookie"]
    assert cookie.startswith("stratus_dashboard=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/dashboard" in cookie
    assert "Secure" not in cookie            # served over plain http here
    assert r.headers["Cache-Control"] == "no-store"
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    # No page refers to anything outside the platform: every src/href is the dashboard's own.
    refs = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert refs and all(x.startswith("/dashboard/") or x.startswith("#") for x in refs), refs
    # /dashboard without the slash, through the gateway too.
    r = s.get("/dashboard", allow_redirects=False)
    assert r.status_code in (301, 308) and r.headers["Location"].endswith("/dashboard/")


def test_each_role_signs_in_to_its_own_home_and_signs_out(p):
    homes = {"admin": "/dashboard/tenants", p.developer: "/dashboard/components",
             p.tenant: f"/dashboard/tenants/{p.tenant}/"}
    for user, home in homes.items():
        s = p.session(user)
        r = s.get("/dashboard/")
        assert r.status_code == 200 and r.url.endswith(home), (user, r.url)
        assert f"{user} <span class=\"role\">" in r.text
        r = s.post("/dashboard/logout")
        assert r.status_code == 200 and r.url.split("?")[0].endswith("/dashboard/login")
        r = s.get(home, allow_redirects=False)
        assert r.status_code == 302 and "/dashboard/login" in r.headers["Location"], user
        assert s.get("/dashboard/api/cluster").status_code == 401


def test_a_wrong_password_or_a_missing_csrf_token_signs_nobody_in(p):
    s = p.session()
    s.get("/dashboard/login")
    r = s.post("/dashboard/login", {"username": p.tenant, "password": "wrong"})
    assert r.status_code == 401 and "Wrong username or password" in r.text
    r = s.post("/dashboard/login", {"username": p.tenant, "password": p.passwords[p.tenant]}, csrf=False)
    assert r.status_code == 400 and "CSRF" in r.text
    r = s.post("/dashboard/login", {"username": p.tenant, "password": p.passwords[p.tenant],
                                    "csrf_token": "not-the-token"})
    assert r.status_code == 400
    assert s.get("/dashboard/", allow_redirects=False).status_code == 302       # still signed out
    # A forged session cookie is not a session.
    s.http.cookies.set("stratus_dashboard", "eyJ0b2tlbiI6IngifQ.forged.sig", path="/dashboard")
    assert s.get("/dashboard/", allow_redirects=False).status_code == 302
    # The next page after signing in: a dashboard path only.
    s = p.session()
    s.get("/dashboard/login")
    r = s.post("/dashboard/login", {"username": p.tenant, "password": p.passwords[p.tenant],
                                    "next": "https://elsewhere.example/"}, allow_redirects=False)
    assert r.status_code == 303 and r.headers["Location"] == "/dashboard/"


# --- the tenant's view ------------------------------------------------------------------------

def test_the_tenant_sees_its_apps_roles_instances_and_events(p):
    s = p.session(p.tenant)
    r = s.get(f"/dashboard/tenants/{p.tenant}/")
    assert r.status_code == 200 and 'data-app="shop"' in r.text
    assert "web (web): 2 / 2" in r.text and "jobs (worker): 1 / 1" in r.text
    assert "deployed" in r.text
    r = s.get(f"/dashboard/tenants/{p.tenant}/apps/shop")
    assert r.status_code == 200
    view = p.app()
    ids = sorted(i["id"] for role in view["roles"].values() for i in role["instances"])
    assert sorted(_rows(r.text, "data-instance")) == ids
    for i in view["roles"]["web"]["instances"]:
        assert f"{i['host']}:{i['port']}" in r.text
    assert '<label for="scale-web">Instances of web</label>' in r.text
    assert r.text.count('name="csrf_token"') >= 4      # sign out, scale web, scale jobs, restart
    # The live parts' JSON: the same data as the platform's, and the fragment the page shows.
    j = s.get(f"/dashboard/api/tenants/{p.tenant}/apps/shop").json()
    assert j["app"]["roles"]["web"]["desired"] == 2 and 'data-instance="' in j["html"]
    j = s.get(f"/dashboard/api/tenants/{p.tenant}/events?app=shop").json()
    assert any(e["type"] == "deployed" for e in j["events"])
    assert s.get(f"/dashboard/api/tenants/{p.tenant}/apps").json()["apps"][0]["name"] == "shop"


def test_a_tenant_cannot_open_another_tenants_pages(p):
    intruder = p.session(p.other)
    view = p.app()
    secrets = [i["id"] for role in view["roles"].values() for i in role["instances"]]
    for path in (f"/dashboard/tenants/{p.tenant}/apps/shop", f"/dashboard/tenants/{p.tenant}/",
                 f"/dashboard/tenants/{p.tenant}/deploy"):
        r = intruder.get(path)
        if path.endswith("/deploy"):   # the empty form: nothing of the tenant's in it
            assert r.status_code == 200 and not any(x in r.text for x in secrets)
            continue
        assert r.status_code == 403, (path, r.status_code)
        assert "Not allowed" in r.text and not any(x in r.text for x in secrets) and "data-instance" not in r.text
    for path in (f"/dashboard/api/tenants/{p.tenant}/apps/shop", f"/dashboard/api/tenants/{p.tenant}/apps",
                 f"/dashboard/api/tenants/{p.tenant}/events", f"/dashboard/api/charts/requests?tenant={p.tenant}",
                 "/dashboard/api/charts/requests", "/dashboard/api/charts/db_lag"):
        r = intruder.get(path)
        assert r.status_code == 403 and set(r.json()) == {"error"}, (path, r.status_code, r.text[:200])
    # Nor act on them: the scale form posted by hand is refused and changes nothing.
    r = intruder.post(f"/dashboard/tenants/{p.tenant}/apps/shop/roles/web/scale", {"instances": "0"})
    assert r.status_code == 403
    r = intruder.post(f"/dashboard/tenants/{p.tenant}/apps/shop/restart")
    assert r.status_code == 403
    assert p.app()["roles"]["web"]["desired"] == 2
    # Nor read its logs; nor the staff pages.
    r = intruder.get(f"/dashboard/logs?component={p.tenant}")
    assert r.status_code == 403 and "shop.web" not in r.text
    for path in ("/dashboard/cluster", "/dashboard/components", "/dashboard/tenants"):
        assert intruder.get(path).status_code == 403, path


def test_scale_a_role_from_the_form_and_see_the_instances_change(p):
    s = p.session(p.tenant)
    s.get(f"/dashboard/tenants/{p.tenant}/apps/shop")
    r = s.post(f"/dashboard/tenants/{p.tenant}/apps/shop/roles/web/scale", {"instances": "3"})
    assert r.status_code == 200 and "Scaling web to 3 instances" in r.text
    p.wait_running("web", 3)

    def page_shows(n):
        j = s.get(f"/dashboard/api/tenants/{p.tenant}/apps/shop").json()
        running = [i for i in j["app"]["roles"]["web"]["instances"] if i["state"] == "running"]
        return len(running) == n and len(_rows(j["html"], 'data-role="web" data-instance')) == n
    wait_until(lambda: page_shows(3), 30, 0.2, what="the page to show 3 web instances")
    # Without the CSRF token: 400, nothing changes.
    r = s.post(f"/dashboard/tenants/{p.tenant}/apps/shop/roles/web/scale", {"instances": "1"}, csrf=False)
    assert r.status_code == 400 and p.app()["roles"]["web"]["desired"] == 3
    # Bad input: said on the page, nothing changes.
    r = s.post(f"/dashboard/tenants/{p.tenant}/apps/shop/roles/web/scale", {"instances": "many"})
    assert r.status_code == 200 and "whole number" in r.text and p.app()["roles"]["web"]["desired"] == 3
    # More than a role may have (400), over the tenant's quota of 16 instances (409):
    # the platform's reason on the page, nothing changes.
    r = s.post(f"/dashboard/tenants/{p.tenant}/apps/shop/roles/web/scale", {"instances": "40"})
    assert r.status_code == 200 and "Not scaled" in r.text and "0 to 16" in r.text, _flash(r.text)
    r = s.post(f"/dashboard/tenants/{p.tenant}/apps/shop/roles/web/scale", {"instances": "16"})
    assert r.status_code == 200 and "Not scaled" in r.text and "quota" in r.text, _flash(r.text)
    assert p.app()["roles"]["web"]["desired"] == 3
    r = s.post(f"/dashboard/tenants/{p.tenant}/apps/shop/roles/web/scale", {"instances": "2"})
    assert r.status_code == 200
    p.wait_running("web", 2)
    wait_until(lambda: page_shows(2), 30, 0.2, what="the page to show 2 web instances")


def test_restart_from_the_form(p):
    s = p.session(p.tenant)
    before = {i["id"] for i in p.app()["roles"]["web"]["instances"]}
    s.get(f"/dashboard/tenants/{p.tenant}/apps/shop")
    r = s.post(f"/dashboard/tenants/{p.tenant}/apps/shop/restart")
    assert r.status_code == 200 and "Rolling restart" in r.text

    def replaced():
        ids = {i["id"] for i in p.app()["roles"]["web"]["instances"]}
        return not (ids & before) and len(p.running("web")) == 2
    wait_until(replaced, 90, 0.3, what="every web instance replaced by the rolling restart")
    p.wait_running("jobs", 1)
    events = s.get(f"/dashboard/api/tenants/{p.tenant}/events?app=shop").json()["events"]
    assert any(e["type"] == "restart_requested" for e in events)


def test_deploy_a_package_and_manifest_from_the_form(p):
    s = p.session(p.tenant)
    manifest, package = shop_package()
    manifest["roles"]["web"].update(routes=["/shop2"], instances=1)
    manifest["roles"]["jobs"]["instances"] = 0
    s.get(f"/dashboard/tenants/{p.tenant}/deploy")
    r = s.post(f"/dashboard/tenants/{p.tenant}/deploy", {"app": "shop2"},
               files={"package": ("shop.tar.gz", package, "application/gzip"),
                      "manifest": ("manifest.json", json.dumps(manifest), "application/json")})
    assert r.status_code == 200 and r.url.endswith(f"/dashboard/tenants/{p.tenant}/apps/shop2"), r.text[:500]
    assert "Deployed shop2" in r.text
    view = p.app("shop2")
    assert view["digest"] == "sha256:" + hashlib.sha256(package).hexdigest()
    wait_until(lambda: p.gateway("GET", "/shop2")[0] == 404 and len(p.running("web", "shop2")) == 1 or None, 60, 0.2,
               what="shop2's web instance")   # the shop answers 404 on a path it does not serve: it runs
    # A new version of the same app from a YAML manifest typed into the form and no
    # package: the platform deploys it on the package uploaded last.
    r = s.post(f"/dashboard/tenants/{p.tenant}/deploy",
               {"app": "shop2", "manifest_text": "roles:\n  web: {kind: web, command: [python, -m, shop.web], "
                                                 "instances: 1, routes: [/shop2], env: {GREETING: yo}}\n"})
    assert r.status_code == 200 and "Deployed shop2: generation 2" in r.text, _flash(r.text)
    again = p.app("shop2")
    assert again["generation"] == 2 and again["digest"] == view["digest"] and set(again["roles"]) == {"web"}
    # A new app without a package: the platform's 400, said on the form.
    r = s.post(f"/dashboard/tenants/{p.tenant}/deploy", {"app": "shop4", "manifest_text": json.dumps(manifest)})
    assert r.status_code == 400 and "no package uploaded" in r.text
    # Refusals: a route another app owns (409), an invalid manifest (400): the reason, nothing deployed.
    bad = dict(manifest, roles={"web": dict(manifest["roles"]["web"], routes=["/shop"])})
    r = s.post(f"/dashboard/tenants/{p.tenant}/deploy", {"app": "shop3", "manifest_text": json.dumps(bad)},
               files={"package": ("shop.tar.gz", package, "application/gzip")})
    assert r.status_code == 409 and "Not deployed" in r.text
    r = s.post(f"/dashboard/tenants/{p.tenant}/deploy", {"app": "shop3", "manifest_text": '{"roles": {"x": {"kind": "nope"}}}'},
               files={"package": ("shop.tar.gz", package, "application/gzip")})
    assert r.status_code == 400 and "Not deployed" in r.text
    r = s.post(f"/dashboard/tenants/{p.tenant}/deploy", {"app": "shop3", "manifest_text": "roles: [unclosed"},
               files={"package": ("shop.tar.gz", package, "application/gzip")})
    assert r.status_code == 400 and "neither JSON nor YAML" in r.text
    # Not a tar.gz: the platform's 400.
    r = s.post(f"/dashboard/tenants/{p.tenant}/deploy", {"app": "shop3", "manifest_text": json.dumps(manifest)},
               files={"package": ("shop.tar.gz", b"not a tarball", "application/gzip")})
    assert r.status_code == 400 and "Not deployed" in r.text
    assert p.api("GET", f"/api/v1/tenants/{p.tenant}/apps/shop3")[0] == 404
    status, _, _ = p.api("DELETE", f"/api/v1/tenants/{p.tenant}/apps/shop2")
    assert status == 200


# --- the developer's view -------------------------------------------------------------------

def test_the_developer_sees_every_components_status_and_reads_but_changes_nothing(p):
    s = p.session(p.developer)
    r = s.get("/dashboard/components")
    assert r.status_code == 200
    comps = _rows(r.text, "data-component")
    workers = [w["id"] for w in p.api("GET", "/api/v1/cluster")[1]["workers"]]
    assert "gateway" in comps and "orchestrator" in comps and "dashboard" in comps
    assert set(workers) <= set(comps)
    assert f"app.{p.tenant}.shop.web" in comps
    j = s.get("/dashboard/api/components").json()
    assert j["gateway"]["status"] == "ok" and {w["id"] for w in j["cluster"]["workers"]} == set(workers)
    # A developer reads a tenant's app page (no forms), but the platform refuses its changes.
    r = s.get(f"/dashboard/tenants/{p.tenant}/apps/shop")
    assert r.status_code == 200 and "data-instance" in r.text and "Scale web" not in r.text
    r = s.post(f"/dashboard/tenants/{p.tenant}/apps/shop/roles/web/scale", {"instances": "1"})
    assert r.status_code == 403 and p.app()["roles"]["web"]["desired"] == 2
    r = s.get("/dashboard/cluster")
    assert r.status_code == 200 and "Switch over" not in r.text
    assert s.post("/dashboard/cluster/switchover").status_code == 403
    assert s.get("/dashboard/tenants").status_code == 403


def test_logs_by_request_id_from_the_gateway_to_the_instance(p):
    rid = f"dash-{uuid.uuid4().hex}"
    status, body, _ = p.gateway("GET", "/shop", headers={"X-Request-Id": rid})
    assert status == 200
    instance = body["instance"]
    s = p.session(p.developer)

    def found():
        r = s.get(f"/dashboard/api/logs?request_id={rid}")
        assert r.status_code == 200, r.text
        comps = {x["component"] for x in r.json()["lines"]}
        return r.json() if "gateway" in comps and f"{p.tenant}/shop/{instance}" in comps else None
    j = wait_until(found, 20, 0.3, what=f"{rid} in the gateway's and the instance's lines")
    assert all(rid in x["line"] for x in j["lines"])
    r = s.get(f"/dashboard/logs?request_id={rid}")
    assert r.status_code == 200 and f"carrying request id <code>{rid}</code>" in r.text
    assert r.text.count(rid) >= len(j["lines"]) and f"{p.tenant}/shop/{instance}" in r.text
    # Narrowed to one component, and a text search.
    r = s.get(f"/dashboard/api/logs?request_id={rid}&component=gateway")
    assert {x["component"] for x in r.json()["lines"]} == {"gateway"}
    r = s.get(f"/dashboard/api/logs?request_id={rid}&q=GET%20/shop")
    assert r.json()["lines"] and all("GET /shop" in x["line"] for x in r.json()["lines"])
    # The tenant reads its own instances' lines of it, and never the gateway's.
    t = p.session(p.tenant)
    j = t.get(f"/dashboard/api/logs?request_id={rid}").json()
    assert {x["component"] for x in j["lines"]} == {f"{p.tenant}/shop/{instance}"}
    assert t.get(f"/dashboard/logs?component=gateway").status_code == 403
    # Bad parameters: 400.
    assert s.get("/dashboard/api/logs?minutes=7").status_code == 400
    assert s.get("/dashboard/api/logs?limit=0").status_code == 400
    assert s.get("/dashboard/logs?limit=x").status_code == 400


# --- the admin's view -----------------------------------------------------------------------

def test_the_admin_creates_a_tenant_and_sees_its_password_once(p):
    s = p.session("admin")
    r = s.get("/dashboard/tenants")
    assert r.status_code == 200 and f'data-tenant="{p.tenant}"' in r.text and f'data-tenant="{p.other}"' in r.text
    name = f"new-{uuid.uuid4().hex[:6]}"
    r = s.post("/dashboard/tenants", {"name": name})
    assert r.status_code == 201
    password = re.search(r'<output class="password" id="new-password">([^<]+)</output>', r.text).group(1)
    assert len(password) >= 12
    r = s.get("/dashboard/tenants")
    assert f'data-tenant="{name}"' in r.text and password not in r.text       # shown once
    assert password not in s.http.cookies.get("stratus_dashboard", "")
    status, grant, _ = p.gateway("POST", "/api/v1/auth/token", {"username": name, "password": password})
    assert status == 200 and grant["role"] == "tenant"
    r = s.post("/dashboard/tenants", {"name": name})
    assert r.status_code == 409 and "exists" in r.text
    r = s.post("/dashboard/tenants", {"name": "Bad Name!"})
    assert r.status_code == 400 and "No tenant created" in r.text
    assert s.post("/dashboard/tenants", {"name": name}, csrf=False).status_code == 400
    assert p.api("DELETE", f"/api/v1/tenants/{name}")[0] == 200


def test_the_admin_sees_the_db_cluster_and_switches_over(p):
    s = p.session("admin")
    view = wait_until(lambda: (v := p.api("GET", "/api/v1/cluster")[1]) and
                      any(w["role"] == "slave" and w["ready"] for w in v["workers"]) and v, 60, 0.3,
                      what="a ready slave")
    r = s.get("/dashboard/cluster")
    assert r.status_code == 200
    for w in view["workers"]:
        assert f'data-worker="{w["id"]}"' in r.text
    assert f'<dd class="leader"><code>{view["leader"]}</code></dd>' in r.text
    assert f'<dd class="term">{view["term"]}</dd>' in r.text
    assert '<label for="candidate">New master</label>' in r.text
    old, term = view["leader"], view["term"]
    r = s.post("/dashboard/cluster/switchover", {"candidate": ""})
    assert r.status_code == 200 and "Switchover done" in r.text, r.text[-800:]
    after = p.api("GET", "/api/v1/cluster")[1]
    assert after["leader"] != old and after["term"] > term
    j = s.get("/dashboard/api/cluster").json()
    assert j["cluster"]["leader"] == after["leader"]
    assert j["cluster"]["recent_elections"][0]["new"] == after["leader"]
    assert "switchover to" in j["html"]
    # A candidate that is no worker: the platform's refusal, on the page.
    r = s.post("/dashboard/cluster/switchover", {"candidate": "no-such-worker"})
    assert r.status_code == 200 and "No switchover" in r.text
    assert p.api("GET", "/api/v1/cluster")[1]["leader"] == after["leader"]


def test_the_admin_sees_every_tenants_pages(p):
    s = p.session("admin")
    assert s.get(f"/dashboard/tenants/{p.tenant}/apps/shop").status_code == 200
    assert s.get(f"/dashboard/tenants/{p.other}/").status_code == 200
    r = s.get(f"/dashboard/tenants/{p.other}/apps/nothing-here")
    assert r.status_code == 404 and "Not found" in r.text
    r = s.get("/dashboard/tenants/no-such-tenant/")
    assert r.status_code == 404


# --- the page holds up ----------------------------------------------------------------------

def test_charts_say_when_prometheus_cannot_be_asked_and_refuse_bad_input(p):
    s = p.session(p.tenant)
    r = s.get(f"/dashboard/api/charts/requests?tenant={p.tenant}")
    assert r.status_code == 503 and "Prometheus" in r.json()["error"]
    assert s.get("/dashboard/api/charts/nope").status_code == 400
    assert s.get(f"/dashboard/api/charts/requests?tenant={p.tenant}&app=a%22b").status_code == 400
    r = s.get(f"/dashboard/tenants/{p.tenant}/")
    assert r.text.count('class="chart"') == 4 and "The charts need JavaScript" in r.text


def test_unknown_paths_and_methods(p):
    s = p.session(p.tenant)
    r = s.get("/dashboard/nothing-here")
    assert r.status_code == 404 and "text/html" in r.headers["Content-Type"]
    r = s.get("/dashboard/api/nothing-here")
    assert r.status_code == 404 and r.json() == {"error": "not found"}
    r = s.http.delete(s._url("/dashboard/logs"))
    assert r.status_code == 405
    # A body over the dashboard's limit: 413, answered (the gateway allows 1 MiB on this route).
    r = s.post("/dashboard/tenants", {"name": "x" * 200_000})
    assert r.status_code == 413


def test_the_vendored_chart_library_is_the_pinned_release(p):
    readme = (ROOT / "dashboard" / "static" / "vendor" / "README.md").read_text()
    s = p.session()
    for name in ("uPlot.iife.min.js", "uPlot.min.css"):
        r = s.get(f"/dashboard/static/vendor/{name}")
        assert r.status_code == 200
        assert hashlib.sha256(r.content).hexdigest() in readme, name
    assert "MIT" in s.get("/dashboard/static/vendor/LICENSE").text
    assert "uplot 1.6.32" in readme


def test_pages_answer_fast(p):
    """Each page costs the dashboard a few API calls: on this idle platform a
    page answers well inside the 200 ms target (the target under 500 req/s
    of load is the benchmark's)."""
    s = p.session(p.tenant)
    pages = [f"/dashboard/tenants/{p.tenant}/", f"/dashboard/tenants/{p.tenant}/apps/shop",
             f"/dashboard/api/tenants/{p.tenant}/apps/shop"]
    for path in pages:
        s.get(path)
        t = timed(lambda: s.get(path), 30)
        p95 = percentile(t, 0.95)
        print(f"{path}: p50 {percentile(t, 0.5) * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms")
        assert p95 < 0.2, (path, p95)
