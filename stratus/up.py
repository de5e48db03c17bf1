"""`stratus up` (what `make up` runs) and `stratus down`.

up: runs the whole platform as local processes: the orchestrator (which
starts the DB workers and every app's instances), the dashboard and the
gateway. Once they answer, it creates the built-in tenants rideshare and toystore through the
orchestrator's API (one that exists is kept as it is; a new tenant's owner
password goes to $STRATUS_STATE_DIR/tenants/<name>-password, readable by its
owner alone) and deploys their apps from rideshare/ and toystore/ (stratus/builtin.py),
as any tenant deploys. Prints where each listens. In the foreground, Ctrl-C stops everything it started
and nothing else; with --detach it returns and `stratus down` stops it.
Each component is a `python -m <component>` child; this module imports none."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bus.settings import Settings, load

from .ctl import ApiError, call

BUILT_IN_TENANTS = ("rideshare", "toystore")

# The platform's own components: (component, settings attribute of its port).
# The tenants' apps, the built-in ones included, are not here: the
# orchestrator runs them, and `up` deploys the built-in ones through its API.
COMPONENTS = [("orchestrator", "orchestrator_port"), ("dashboard", "dashboard_port"), ("gateway", "gateway_port")]


def pid_file(settings: Settings) -> Path:
    return settings.state_path / "up.json"


def log_dir(settings: Settings) -> Path:
    d = settings.state_path / "logs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def alive(pid: int) -> bool:
    # In the foreground the components are our children: reap one that has
    # exited, or it stays a zombie that kill(pid, 0) still finds.
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return r.status == 200
    except Exception:
        return False


def running(settings: Settings) -> dict[str, int]:
    try:
        pids = json.loads(pid_file(settings).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in pids.items() if alive(v)}


def start_all(settings: Settings) -> dict[str, subprocess.Popen]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "STRATUS_STATE_DIR": str(settings.state_path)}
    procs = {}
    for name, _ in COMPONENTS:
        if importlib.util.find_spec(name) is None or importlib.util.find_spec(f"{name}.__main__") is None:
            print(f"  {name:<13} not built in this checkout; skipped")
            continue
        logf = open(log_dir(settings) / f"{name}.log", "ab")
        procs[name] = subprocess.Popen([sys.executable, "-m", name], env=env, stdout=logf, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        if name == "orchestrator":
            time.sleep(1.0)  # let it claim leadership and start the master first
    return procs


def wait_healthy(settings: Settings, procs: dict[str, subprocess.Popen], timeout: float = 60.0) -> None:
    ports = dict(COMPONENTS)
    deadline = time.monotonic() + timeout
    pending = set(procs)
    while pending and time.monotonic() < deadline:
        for name in list(pending):
            if procs[name].poll() is not None:
                print(f"  {name:<13} exited with {procs[name].returncode}; see {log_dir(settings) / (name + '.log')}")
                pending.discard(name)
            elif healthy(getattr(settings, ports[name])):
                pending.discard(name)
        time.sleep(0.3)
    for name in pending:
        print(f"  {name:<13} not healthy after {timeout:.0f}s; see {log_dir(settings) / (name + '.log')}")


def ensure_tenants(settings: Settings, names=BUILT_IN_TENANTS, timeout: float = 60.0) -> dict[str, str]:
    """Create the tenants that do not exist yet, through the orchestrator's
    API; retries while the database is not ready (503/504), for at most
    `timeout` seconds. Returns {name: "created" | "exists" | the error}."""
    done: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    for name in names:
        while True:
            try:
                r = call(settings.orchestrator_base_url(), "POST", "/api/v1/tenants", {"name": name}, timeout=30)
            except ApiError as exc:
                if exc.status == 409:
                    done[name] = "exists"
                    break
                if (exc.status is None or exc.status >= 500) and time.monotonic() < deadline:
                    time.sleep(1.0)
                    continue
                done[name] = str(exc)
                break
            save_password(settings, name, r["password"])
            done[name] = "created"
            break
    return done


def password_file(settings: Settings, tenant: str) -> Path:
    return settings.state_path / "tenants" / f"{tenant}-password"


def save_password(settings: Settings, tenant: str, password: str) -> None:
    path = password_file(settings, tenant)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")


def tenant_env(settings: Settings, tenant: str, db=None) -> dict[str, str]:
    """The environment a tenant's instances reach the bus with: its own
    broker account (bus.accounts), never the platform's. `db` is a platform
    DBClient (one is made and closed when None). LookupError: no such tenant."""
    from bus import accounts
    from bus.client import DBClient
    client = db if db is not None else DBClient(settings, name="up")
    try:
        acct = accounts.get(client, tenant)
    finally:
        if db is None:
            client.close()
    if acct is None or acct.get("kind") != "tenant" or not acct.get("broker_password"):
        raise LookupError(f"no tenant {tenant!r}")
    return {"STRATUS_AMQP_URL": accounts.tenant_amqp_url(settings.amqp_url, settings.cluster, tenant,
                                                         acct["broker_password"]),
            "STRATUS_TENANT": tenant}


def deploy_builtin_apps(settings: Settings, timeout: float = 90.0) -> dict[str, dict]:
    """Deploy the built-in apps through the API and wait until they run;
    returns {tenant: app view} for those that run."""
    from . import builtin
    base = settings.orchestrator_base_url()
    views = {}
    for tenant in builtin.BUILT_IN:
        try:
            builtin.deploy_builtin(base, tenant, timeout=timeout)
            views[tenant] = builtin.wait_running(base, tenant, tenant, timeout=timeout)
            print(f"  app    {tenant + '/' + tenant:<20} deployed")
        except builtin.DeployError as exc:
            print(f"  app    {tenant + '/' + tenant:<20} not running: {exc}")
    return views


def describe(settings: Settings, procs, apps: dict | None = None) -> None:
    ports = dict(COMPONENTS)
    print("\nStratus is up (cluster %r):" % settings.cluster)
    for name in procs:
        port = getattr(settings, ports[name])
        note = " (the public entry point)" if name == "gateway" else ""
        note = " (admin API, loopback only)" if name == "orchestrator" else note
        note = f" (in a browser: {settings.gateway_base_url()}/dashboard/)" if name == "dashboard" else note
        print(f"  {name:<13} http://127.0.0.1:{port}{note}   pid {procs[name].pid}")
    for tenant, view in (apps or {}).items():
        for role, r in view["roles"].items():
            where = ", ".join(f"http://{i['host']}:{i['port']}" if i.get("port") else f"pid {i['pid']}"
                              for i in r["instances"])
            print(f"  {role:<13} {where}   ({tenant}'s {r['kind']} role)")
    print(f"  {'rabbitmq':<13} {settings.amqp_url.split('@')[-1]}")
    print(f"  {'zookeeper':<13} {settings.zk_hosts}")
    pw = settings.state_path / "admin-password"
    if not os.environ.get("STRATUS_ADMIN_PASSWORD"):
        print(f"  admin password: {pw} (readable by you alone)")
    print(f"  logs:           {log_dir(settings)}/")


def stop(procs: dict[str, int], timeout: float = 20.0) -> None:
    # Gateway and services first, the orchestrator (which stops its workers) last.
    order = [n for n, _ in reversed(COMPONENTS) if n in procs]
    for name in order:
        try:
            os.killpg(procs[name], signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(procs[n]) for n in order):
        time.sleep(0.2)
    for name in order:
        if alive(procs[name]):
            try:
                os.killpg(procs[name], signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def up(args: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="stratus up", description="Run the whole platform as local processes.")
    ap.add_argument("--detach", action="store_true", help="start in the background; `stratus down` stops it")
    opts = ap.parse_args(args)
    settings = load()
    settings.state_path.mkdir(parents=True, exist_ok=True)
    already = running(settings)
    if already:
        print(f"Stratus is already running here (pids {sorted(already.values())}); `stratus down` stops it.")
        return 0
    if healthy(settings.gateway_port) or healthy(settings.orchestrator_port):
        print("Something already answers on the gateway or orchestrator port; not starting a second platform.")
        return 1
    print("Starting Stratus...")
    procs = start_all(settings)
    pid_file(settings).write_text(json.dumps({n: p.pid for n, p in procs.items()}))
    wait_healthy(settings, procs)
    apps = {}
    if "orchestrator" in procs:
        for name, outcome in ensure_tenants(settings).items():
            note = f"; owner password in {password_file(settings, name)}" if outcome == "created" else ""
            print(f"  tenant {name:<10} {outcome}{note}")
        apps = deploy_builtin_apps(settings)
    describe(settings, procs, apps)
    if opts.detach:
        print("\nRunning in the background: `make down` (or `stratus down`) stops it.")
        return 0
    print("\nCtrl-C stops everything started here.")
    stopping = {"now": False}

    def on_signal(*_):
        stopping["now"] = True
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        while not stopping["now"]:
            for name, p in procs.items():
                if p.poll() is not None and not stopping["now"]:
                    print(f"{name} exited with {p.returncode}; see {log_dir(settings) / (name + '.log')}")
                    stopping["now"] = True
            time.sleep(0.3)
    finally:
        print("\nStopping...")
        stop({n: p.pid for n, p in procs.items()})
        pid_file(settings).unlink(missing_ok=True)
        print("Stopped.")
    return 0


def down(args: list[str]) -> int:
    settings = load()
    procs = running(settings)
    if not procs:
        print("Nothing to stop: no platform started with `make up DETACH=1` is running here.")
        pid_file(settings).unlink(missing_ok=True)
        return 0
    print(f"Stopping {', '.join(procs)}...")
    stop(procs)
    pid_file(settings).unlink(missing_ok=True)
    print("Stopped.")
    return 0


def main(cmd: str, args: list[str]) -> int:
    return up(args) if cmd == "up" else down(args)
