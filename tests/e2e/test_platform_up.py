"""The whole platform as a new user meets it: `stratus up` (what `make up`
runs), the README's curl tour through the gateway, then `stratus down` or
Ctrl-C. Own cluster namespace, state directory and ports; every process it
started is gone at the end."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from harness import ROOT, LocalCluster, free_port, wait_for

pytestmark = pytest.mark.slow
STRATUS = [sys.executable, "-m", "stratus.cli"]
COMPONENTS = ["orchestrator", "users", "rides", "catalog", "order", "dashboard", "gateway"]   # each has a port
PLATFORM = ["orchestrator", "dashboard", "gateway"]   # what `stratus up` starts itself; the apps run under the orchestrator


def instance_pids(c) -> list[int]:
    """The pids of the built-in apps' instances, from the orchestrator's API."""
    out = []
    for tenant in ("rideshare", "toystore"):
        st, view = call(c.ports["orchestrator_port"], "GET", f"/api/v1/tenants/{tenant}/apps/{tenant}")
        assert st == 200, view
        out += [i["pid"] for r in view["roles"].values() for i in r["instances"]]
    return out


def call(port: int, method: str, path: str, body=None, token: str | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, (json.loads(raw) if raw else None)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie of ours is not alive
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture
def platform(tmp_path):
    """Settings for one platform: a fresh namespace, state dir and free ports."""
    ports = {f"{c}_port": free_port() for c in COMPONENTS}
    c = LocalCluster(tmp_path, **ports)
    c.ports = ports
    c.env.pop("STRATUS_ADMIN_PASSWORD", None)
    started: set[int] = set()
    c.started = started
    yield c
    # Backstop only: stop whatever of ours is still running, by pid.
    for pid in started | {w.get("pid") for w in c.workers().values() if w.get("pid")}:
        if alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    c.close()


def stratus(c: LocalCluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*STRATUS, *args], cwd=ROOT, env=c.env, capture_output=True, text=True, timeout=timeout)


def up_pids(c: LocalCluster) -> dict[str, int]:
    return json.loads((c.state_dir / "up.json").read_text())


def tour(c: LocalCluster) -> list[int]:
    """The README's quick tour; returns the workers' pids from /api/v1/worker/list."""
    gw = c.ports["gateway_port"]
    wait_for(lambda: call(gw, "GET", "/api/v1/users")[0] in (200, 204), 60, 0.3, "users through the gateway")
    sha = "8843d7f92416211de9ebb963ff4ce28125932878"  # sha1("foobar")
    assert call(gw, "PUT", "/api/v1/users", {"username": "alice", "password": sha}) == (201, {})
    assert call(gw, "PUT", "/api/v1/users", {"username": "bob", "password": sha.upper()}) == (201, {})
    assert call(gw, "POST", "/api/v1/rides", {"created_by": "alice", "timestamp": "21-08-2031:00-00-00",
                                              "source": "1", "destination": "2"}) == (201, {})
    st, rides = call(gw, "GET", "/api/v1/rides?source=1&destination=2")
    assert st == 200 and [r["username"] for r in rides] == ["alice"], rides
    ride = rides[0]["rideId"]
    assert call(gw, "POST", f"/api/v1/rides/{ride}", {"username": "bob"}) == (200, {})
    st, body = call(gw, "GET", f"/api/v1/rides/{ride}")
    assert st == 200 and body["users"] == ["bob"] and body["created_by"] == "alice", body

    wait_for(lambda: call(gw, "GET", "/products/Tux")[0] == 200, 30, 0.3, "the catalog through the gateway")
    st, body = call(gw, "GET", "/products/Tux")
    assert body["data"]["name"] == "Tux" and body["data"]["quantity"] == 100, body
    st, body = call(gw, "POST", "/orders", {"name": "Tux", "quantity": 3})
    assert st == 200, body
    n = body["data"]["order_number"]
    assert call(gw, "GET", f"/orders/{n}") == (200, {"data": {"number": n, "name": "Tux", "quantity": 3}})
    assert call(gw, "GET", "/products/Tux")[1]["data"]["quantity"] == 97
    assert call(gw, "GET", "/products/NoSuchToy")[0] == 404

    # Admin routes: 401 without a token, 403 with a user's, 200 with the admin's.
    assert call(gw, "GET", "/api/v1/worker/list")[0] == 401
    st, user = call(gw, "POST", "/api/v1/auth/token", {"username": "alice", "password": sha})
    assert st == 200 and user["role"] == "user", user
    assert call(gw, "GET", "/api/v1/worker/list", token=user["token"])[0] == 403
    pw_file = c.state_dir / "admin-password"
    assert pw_file.stat().st_mode & 0o077 == 0, oct(pw_file.stat().st_mode)
    st, admin = call(gw, "POST", "/api/v1/auth/token", {"username": "admin", "password": pw_file.read_text().strip()})
    assert st == 200 and admin["role"] == "admin", admin
    assert call(gw, "POST", "/api/v1/auth/token", {"username": "admin", "password": "wrong"})[0] == 401
    st, pids = call(gw, "GET", "/api/v1/worker/list", token=admin["token"])
    assert st == 200 and len(pids) >= 2 and pids == sorted(pids), pids
    # The orchestrator's own port answers the same route without a token.
    assert call(c.ports["orchestrator_port"], "GET", "/api/v1/worker/list") == (200, pids)
    return pids


def test_up_detached_tour_and_down(platform):
    c = platform
    r = stratus(c, "up", "--detach")
    assert r.returncode == 0, r.stdout + r.stderr
    pids = up_pids(c)
    c.started.update(pids.values())
    assert set(pids) == set(PLATFORM), pids
    for name in COMPONENTS:   # it prints where each one listens, the apps' first instances on their ports
        assert f"http://127.0.0.1:{c.ports[name + '_port']}" in r.stdout, r.stdout
    # The built-in apps were deployed through the API (paas.md, Built-in apps).
    st, apps = call(c.ports["orchestrator_port"], "GET", "/api/v1/tenants/toystore/apps")
    assert st == 200 and [a["name"] for a in apps] == ["toystore"], apps
    assert {r: v["running"] for r, v in apps[0]["roles"].items()} == {"catalog": 1, "order": 1, "restocker": 1, "receipts": 1}
    instances = instance_pids(c)
    c.started.update(instances)
    workers = tour(c)

    # Running it twice does no harm: nothing new is started.
    again = stratus(c, "up", "--detach")
    assert again.returncode == 0 and "already running" in again.stdout, again.stdout
    assert up_pids(c) == pids

    r = stratus(c, "down")
    assert r.returncode == 0, r.stdout + r.stderr
    gone = [*pids.values(), *workers, *instances]
    wait_for(lambda: not [p for p in gone if alive(p)], 30, 0.2, "every component and worker to exit")
    assert not (c.state_dir / "up.json").exists()
    assert "Nothing to stop" in stratus(c, "down").stdout   # twice: no harm


def test_up_in_the_foreground_stops_everything_on_ctrl_c(platform):
    c = platform
    logf = open(c.log_dir / "up.out", "w+")
    p = subprocess.Popen([*STRATUS, "up"], cwd=ROOT, env=c.env, stdout=logf, stderr=subprocess.STDOUT,
                         start_new_session=True)
    c.started.add(p.pid)
    try:
        wait_for(lambda: "Ctrl-C stops everything" in (c.log_dir / "up.out").read_text(), 90, 0.3,
                 "stratus up to report the platform up")
        pids = up_pids(c)
        c.started.update(pids.values())
        gw = c.ports["gateway_port"]
        wait_for(lambda: call(gw, "GET", "/api/v1/users")[0] in (200, 204), 60, 0.3, "users through the gateway")
        workers = wait_for(lambda: [w["pid"] for w in c.workers().values() if w.get("pid")], 30,
                           what="the workers in ZooKeeper")
        instances = instance_pids(c)
        c.started.update(instances)
        t0 = time.monotonic()
        os.kill(p.pid, signal.SIGINT)
        assert p.wait(60) == 0
        # Each component drains within a few seconds; nothing waits out the 20 s kill timeout.
        assert time.monotonic() - t0 < 15, f"Ctrl-C took {time.monotonic() - t0:.1f} s"
        gone = [*pids.values(), *workers, *instances]
        wait_for(lambda: not [q for q in gone if alive(q)], 30, 0.2, "every component and worker to exit")
        assert "Stopped." in (c.log_dir / "up.out").read_text()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        logf.close()
