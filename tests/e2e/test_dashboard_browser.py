"""The dashboard in a real browser: headless Chromium (Debian's chromium and
chromium-driver, which `make test` installs) driven by selenium, against a
real platform (tests/kits/dashboardkit.py: a real orchestrator, its DB
workers and the example app's instances, a real gateway, the dashboard
process), through the gateway at /dashboard/ as a person would reach it.

- each role (admin, developer, a tenant) signs in from the keyboard alone;
- a tenant opening another tenant's app page gets the refusal and no data;
- a role is scaled from the page, and the instance count changes on the
  page by itself (the live refresh, no reload);
- a request's log lines are found by its request id;
- the status pages read with JavaScript off;
- no page asks for anything outside the platform (Chromium's network log);
- a chart is drawn with data points from real traffic: Prometheus (the one
  scripts/services.sh runs) scrapes this test cluster's gateway, found by the
  cluster's own file service discovery written into Prometheus's targets
  directory. Skipped with a message when no Prometheus runs here.
A screenshot of each view is saved in docs/screenshots/ by the run.

The module is skipped, with a message, only when chromium, chromedriver or
selenium is not installed (they could not be installed on this machine)."""
from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from pathlib import Path

import pytest

from kits.dashboardkit import Traffic, dashboard_platform, prometheus_sd_dir, prometheus_url
from kits.testkit import wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
try:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    SELENIUM = True
except ImportError:  # pragma: no cover - selenium comes with the dev extras
    SELENIUM = False

pytestmark = [
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER and SELENIUM),
                       reason="headless Chromium is not installed here (Debian's chromium and chromium-driver, "
                              "and selenium: `make test` installs them; they could not be installed)"),
    pytest.mark.timeout(900),
]

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "docs" / "screenshots"
WIDTH = 1280


@pytest.fixture(scope="module")
def p(tmp_path_factory):
    prom = prometheus_url()
    sd_dir = prometheus_sd_dir(prom) if prom else None
    orch_env = {"STRATUS_PROMETHEUS_SD_DIR": str(sd_dir)} if sd_dir else {}
    dash_env = {"STRATUS_PROMETHEUS_URL": prom} if prom else {}
    with dashboard_platform(tmp_path_factory.mktemp("dash-browser"), orchestrator_env=orch_env, **dash_env) as platform:
        platform.prometheus = prom if sd_dir else None
        # Real traffic from the start, for the charts (bounded: at most 10 minutes).
        with Traffic(platform.gw, ["/shop", "/shop", "/shop/nothing"], rate=8.0, limit=600) as traffic:
            platform.traffic = traffic
            yield platform


@pytest.fixture(scope="module")
def browsers():
    made = []

    def make(js: bool = True):
        o = webdriver.ChromeOptions()
        o.binary_location = CHROMIUM
        for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                  f"--window-size={WIDTH},900", "--lang=en-US", "--disable-extensions",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update",
                  "--disable-default-apps", "--disable-sync"):
            o.add_argument(a)
        if not js:
            o.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
        o.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
        try:
            d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=o)
        except WebDriverException as exc:
            pytest.fail(f"headless Chromium is installed but does not start: {exc.msg}")
        d.set_page_load_timeout(30)
        made.append(d)
        return d
    yield make
    for d in made:
        try:
            d.quit()
        except Exception:
            pass


# --- helpers --------------------------------------------------------------------------------

def shot(d, name: str) -> Path:
    """A full-page screenshot in docs/screenshots/<name>.png."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    height = d.execute_script("return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)")
    d.set_window_size(WIDTH, min(max(int(height) + 20, 600), 3000))
    path = SHOTS / f"{name}.png"
    d.save_screenshot(str(path))
    d.set_window_size(WIDTH, 900)
    assert path.stat().st_size > 5000, path
    return path


def wait(d, pred, timeout: float = 20.0, what: str = "the page"):
    def attempt():
        try:
            return pred(d)
        except StaleElementReferenceException:   # the live refresh replaced the element under us: not yet
            return None
    return wait_until(attempt, timeout, 0.2, what=what)


def login(d, p, user: str) -> None:
    """Sign in from the keyboard alone: type, Tab, type, Enter."""
    d.delete_all_cookies()
    d.get(p.url + "login")
    # the username field has the focus (autofocus lands at a rendering step after load: wait for it)
    field = wait(d, lambda d: (e := d.switch_to.active_element).get_attribute("id") == "username" and e, 5,
                 what="the focus on the username field")
    field.send_keys(user, Keys.TAB)
    active = d.switch_to.active_element
    assert active.get_attribute("id") == "password"
    active.send_keys(p.passwords[user], Keys.ENTER)
    wait(d, lambda d: "/dashboard/login" not in d.current_url and d.find_elements(By.CSS_SELECTOR, "form.logout"),
         what=f"{user} to be signed in")


def h1(d) -> str:
    return d.find_element(By.TAG_NAME, "h1").text


def requests_made(d) -> list[str]:
    urls = []
    for entry in d.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    return urls


# --- the tests ------------------------------------------------------------------------------

def test_each_role_signs_in_from_the_keyboard(p, browsers):
    d = browsers()
    d.get(p.url)
    wait(d, lambda d: "/dashboard/login" in d.current_url)
    assert [e.text for e in d.find_elements(By.CSS_SELECTOR, "form label")] == ["Username", "Password"]
    shot(d, "login")
    login(d, p, "admin")
    assert d.current_url.endswith("/dashboard/tenants") and h1(d) == "Tenants"
    assert d.find_elements(By.CSS_SELECTOR, f'tr[data-tenant="{p.tenant}"]')
    login(d, p, p.developer)
    assert d.current_url.endswith("/dashboard/components") and h1(d) == "Components"
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, f'tr[data-component="app.{p.tenant}.shop.web"]'))
    login(d, p, p.tenant)
    assert d.current_url.endswith(f"/dashboard/tenants/{p.tenant}/") and p.tenant in h1(d)
    # Sign out from the keyboard: focus the button, Enter.
    d.find_element(By.CSS_SELECTOR, "form.logout button").send_keys(Keys.ENTER)
    wait(d, lambda d: "/dashboard/login" in d.current_url and h1(d) == "Sign in")
    d.get(p.url + f"tenants/{p.tenant}/")
    wait(d, lambda d: "/dashboard/login" in d.current_url, what="a signed-out page to ask for the login")


def test_a_tenant_cannot_open_another_tenants_app_page(p, browsers):
    d = browsers()
    login(d, p, p.other)
    view = p.app()
    ids = [i["id"] for r in view["roles"].values() for i in r["instances"]]
    d.get(p.url + f"tenants/{p.tenant}/apps/shop")
    assert h1(d).startswith("Not allowed") and "(403)" in h1(d)
    src = d.page_source
    assert not any(i in src for i in ids) and "data-instance" not in src and "Scale" not in src
    shot(d, "forbidden")
    # Its own page: its own (empty) apps.
    d.get(p.url + f"tenants/{p.other}/")
    assert p.other in h1(d) and "No apps yet" in d.page_source


def test_scale_a_role_from_the_page_and_see_the_count_change_live(p, browsers):
    d = browsers()
    login(d, p, p.tenant)
    d.get(p.url + f"tenants/{p.tenant}/apps/shop")

    def running(d):
        return d.find_element(By.CSS_SELECTOR, 'tr[data-role="web"] td.running').text

    wait(d, lambda d: running(d) == "2", 10, what="the page to show 2 running web instances")
    field = d.find_element(By.ID, "scale-web")
    assert d.find_element(By.CSS_SELECTOR, 'label[for="scale-web"]').text == "Instances of web"
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys("3", Keys.ENTER)                       # submitted from the keyboard
    wait(d, lambda d: "Scaling web to 3 instances" in d.page_source, what="the scale to be accepted")
    # From here the page is not reloaded: the count changes by itself (the live refresh).
    d.execute_script("window.__sameDocument = 'yes';")
    wait(d, lambda d: running(d) == "3" and len(d.find_elements(By.CSS_SELECTOR, 'tr[data-role="web"][data-instance]')) == 3,
         60, what="the page to show 3 running web instances")
    assert d.execute_script("return window.__sameDocument") == "yes"
    assert len(p.running("web")) == 3
    shot(d, "tenant-app-scaled")
    field = d.find_element(By.ID, "scale-web")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys("2", Keys.ENTER)
    wait(d, lambda d: "Scaling web to 2 instances" in d.page_source)
    wait(d, lambda d: running(d) == "2" and len(d.find_elements(By.CSS_SELECTOR, 'tr[data-role="web"][data-instance]')) == 2,
         60, what="the page to show 2 running web instances")
    p.wait_running("web", 2)


def test_find_a_requests_log_lines_by_its_request_id(p, browsers):
    rid = f"browser-{uuid.uuid4().hex[:16]}"
    status, body, _ = p.gateway("GET", "/shop", headers={"X-Request-Id": rid})
    assert status == 200
    instance = f"{p.tenant}/shop/{body['instance']}"
    d = browsers()
    login(d, p, p.developer)
    d.find_element(By.LINK_TEXT, "Logs").click()
    wait(d, lambda d: h1(d) == "Logs")
    box = d.find_element(By.ID, "request_id")
    assert d.find_element(By.CSS_SELECTOR, 'label[for="request_id"]').text == "Request id"

    box.send_keys(rid, Keys.ENTER)
    wait(d, lambda d: f"request_id={rid}" in d.current_url, what="the search to be sent")

    def found(d):
        # Read from the page's source (the live refresh may replace elements under us).
        src = d.page_source
        comps = set(re.findall(r'<td class="c"><a [^>]*>([^<]+)</a></td>', src))
        if f"carrying request id <code>{rid}</code>" in src and {"gateway", instance} <= comps:
            return comps
        d.refresh()                  # the lines may take a moment to be written
        return None
    comps = wait(d, found, 30, what=f"the log lines of {rid} from the gateway and {instance}")
    assert comps == {"gateway", instance}, comps        # the request went nowhere else
    rows = d.find_elements(By.CSS_SELECTOR, "table.log tbody tr")
    assert rows and all(rid in r.text for r in rows)
    shot(d, "developer-logs")
    # The components' status view, with the links to their logs.
    d.find_element(By.LINK_TEXT, "Components").click()
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-component="gateway"]'))
    shot(d, "developer-components")


def test_the_status_pages_read_without_javascript(p, browsers):
    d = browsers(js=False)
    login(d, p, p.tenant)
    d.get(p.url + f"tenants/{p.tenant}/apps/shop")
    assert d.execute_script is not None
    rows = d.find_elements(By.CSS_SELECTOR, 'table.instances tr[data-instance]')
    assert len(rows) == 3 and all(r.find_element(By.CSS_SELECTOR, ".badge").text == "running" for r in rows)
    assert "The charts need JavaScript" in d.page_source
    login(d, p, "admin")
    d.get(p.url + "cluster")
    members = d.find_elements(By.CSS_SELECTOR, "table.members tr[data-worker]")
    assert len(members) >= 2 and any("master" in m.text for m in members)
    d.get(p.url + "components")
    assert d.find_elements(By.CSS_SELECTOR, 'tr[data-component="orchestrator"]')


def test_the_admin_views(p, browsers):
    d = browsers()
    login(d, p, "admin")
    d.get(p.url + "cluster")
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "table.members tr[data-worker]"))
    assert d.find_element(By.CSS_SELECTOR, 'label[for="candidate"]').text == "New master"
    d.get(p.url + f"tenants/{p.tenant}/deploy")
    labels = [e.text for e in d.find_elements(By.CSS_SELECTOR, "form.deploy label")]
    assert labels[:3] == ["App name", "Package (.tar.gz, at most 50 MiB)", "Manifest file (JSON or YAML)"]
    shot(d, "tenant-deploy")
    # Tenant creation from the keyboard: the password is shown once.
    d.get(p.url + "tenants")
    name = f"web-{uuid.uuid4().hex[:6]}"
    d.find_element(By.ID, "tenant-name").send_keys(name, Keys.ENTER)
    wait(d, lambda d: d.find_elements(By.ID, "new-password"))
    password = d.find_element(By.ID, "new-password").text
    assert len(password) >= 12
    status, grant, _ = p.gateway("POST", "/api/v1/auth/token", {"username": name, "password": password})
    assert status == 200 and grant["role"] == "tenant"
    d.get(p.url + "tenants")
    assert d.find_elements(By.CSS_SELECTOR, f'tr[data-tenant="{name}"]') and password not in d.page_source
    assert p.api("DELETE", f"/api/v1/tenants/{name}")[0] == 200


def test_no_page_asks_for_anything_outside_the_platform(p, browsers):
    d = browsers()
    login(d, p, "admin")
    d.get_log("performance")       # drop what came before
    for path in (f"tenants/{p.tenant}/", f"tenants/{p.tenant}/apps/shop", "logs", "components", "cluster", "tenants"):
        d.get(p.url + path)
        time.sleep(0.5)             # the charts' and live parts' first fetches
    urls = requests_made(d)
    origin = f"http://127.0.0.1:{p.gw}/dashboard/"
    assert urls and any("/dashboard/api/charts/" in u for u in urls)
    outside = [u for u in urls if not u.startswith(origin)]
    assert not outside, outside
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE" and "/api/charts/" not in e["message"]]
    assert not errors, errors


def test_a_chart_is_drawn_with_data_points_from_real_traffic(p, browsers):
    if p.prometheus is None:
        pytest.skip("no Prometheus answers at STRATUS_PROMETHEUS_URL with file service discovery "
                    "(scripts/services.sh start runs one): the charts have no history to draw")
    assert p.traffic.sent > 0
    d = browsers()
    login(d, p, p.tenant)
    d.get(p.url + f"tenants/{p.tenant}/")

    def points(d, chart):
        fig = d.find_element(By.CSS_SELECTOR, f'figure.chart[data-chart="{chart}"]')
        n = int(fig.get_attribute("data-points") or 0)
        return n if n > 0 and fig.find_elements(By.CSS_SELECTOR, "canvas") else None

    def drawn(d):
        if (points(d, "requests") or 0) >= 3 and points(d, "p99"):     # a line, not a dot
            return True
        d.refresh()                  # the page draws its charts when it loads, then every 15 s
        return None
    wait(d, drawn, 120, what="the requests/s and p99 charts drawn from Prometheus's data")
    fig = d.find_element(By.CSS_SELECTOR, 'figure.chart[data-chart="requests"]')
    legend = fig.text
    assert "shop" in legend or "web" in legend, legend                  # the route's line
    assert fig.find_element(By.CSS_SELECTOR, ".chart-note").text == ""
    # The same data the page drew, from the dashboard's JSON: real requests per second.
    data = d.execute_script(
        "return fetch('/dashboard/api/charts/requests?tenant=' + arguments[0]).then(r => r.json());", p.tenant)
    values = [v for s in data["series"] for v in s["values"] if v is not None]
    assert values and max(values) > 0.5, data["series"]
    shot(d, "tenant-apps")
    d.get(p.url + f"tenants/{p.tenant}/apps/shop")            # one app's charts
    wait(d, lambda d: points(d, "requests") or d.refresh(), 60, what="the app's requests/s chart")
    errors = d.find_element(By.CSS_SELECTOR, 'figure.chart[data-chart="errors"]')
    wait(d, lambda d: errors.get_attribute("data-points") not in (None, "0") or None, 30,
         what="the error rate chart (0 %: the shop answers no 5xx)")
    shot(d, "tenant-app")
    # The admin's DB cluster charts: the workers' and the orchestrator's metrics.
    login(d, p, "admin")
    d.get(p.url + "cluster")

    def db_drawn(d):
        if points(d, "db_lag") and points(d, "db_elections"):
            return True
        d.refresh()
        return None
    wait(d, db_drawn, 90, what="the replication lag and elections charts drawn")
    shot(d, "admin-cluster")
    d.get(p.url + "tenants")
    wait(d, lambda d: points(d, "requests"), 30, what="the requests chart of every tenant")
    shot(d, "admin-tenants")
