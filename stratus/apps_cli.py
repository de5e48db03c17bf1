"""The apps commands of the `stratus` CLI (paas.md, CLI; issue 15):

    stratus deploy PATH [--tenant T] [--app A] [--timeout S] [--no-wait]
    stratus apps [TENANT] [--json]
    stratus scale TENANT/APP/ROLE N [--timeout S] [--no-wait]
    stratus restart TENANT/APP [--timeout S] [--no-wait]
    stratus events [TENANT] [--since N] [--follow]
    stratus logs [COMPONENT] [--since T] [--grep TEXT] [--limit N] [--follow]

Every command takes --url URL and --token TOKEN (or STRATUS_URL and
STRATUS_TOKEN). Without them it talks to the orchestrator's own port
(settings.orchestrator_base_url()), which acts as the admin; with a token
it goes through the gateway (--url, else settings.gateway_base_url()) with
`Authorization: Bearer <token>`. A tenant not named (TENANT, --tenant) is
$STRATUS_TENANT, else the token's own `tenant` claim.

deploy: PATH is a directory holding manifest.json, or manifest.yaml/.yml
(read with PyYAML when it is installed), and the app's code. The directory
is packed as a .tar.gz of its files, paths relative to it, leaving out
__pycache__, .git (and other cache) directories, *.pyc files and symbolic
links (the platform refuses links), at most 50 MiB. Then, through paas.md's
routes: PUT .../apps/{a}/package, PUT .../apps/{a}?digest=<its digest>
with the manifest (so that package is the one deployed), and
(unless --no-wait) GET .../apps/{a} every 0.5 s, printing one line each
time the roles' counts change, until every role runs its desired count
(exit 0) or --timeout seconds pass (exit 1). The app's name is --app, else
the directory's name. scale and restart show their progress the same way;
a restart is done when every instance seen before it has been replaced or
restarted and every role runs its desired count.

events and logs print one line per event or log line; --follow keeps
polling (every second) for new ones until Ctrl-C. --since for logs is unix
seconds or a duration ago (90s, 15m, 2h, 1d).

An error answer prints its JSON ({"error": ...}) on stderr and exits 1; bad
arguments exit 2."""
from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import re
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from bus.settings import load

from .builtin import tarball, walk
from .ctl import ApiError, call, table

COMMANDS = ("deploy", "apps", "scale", "restart", "events", "logs")
PACKAGE_LIMIT = 50 * 1024 * 1024      # bytes of .tar.gz (paas.md)
UNPACKED_LIMIT = 512 * 1024 * 1024    # bytes of files (orchestrator/apps/packages.py refuses more)
MANIFESTS = ("manifest.json", "manifest.yaml", "manifest.yml")
POLL = 0.5
FOLLOW_POLL = 1.0
DEFAULT_TIMEOUT = 120.0


class Usage(Exception):
    """A command line that cannot be run (exit 2)."""


# --- where, and as whom -------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    url: str
    token: str | None


def target(url: str | None, token: str | None, settings=None, env=None) -> Target:
    """The API to talk to: --url/--token, else STRATUS_URL/STRATUS_TOKEN; a
    token without a URL goes through the gateway; neither: the
    orchestrator's own port (as the admin)."""
    env = os.environ if env is None else env
    settings = settings or load()
    token = token or env.get("STRATUS_TOKEN") or None
    url = url or env.get("STRATUS_URL") or None
    if url is None:
        url = settings.gateway_base_url() if token else settings.orchestrator_base_url()
    return Target(url, token)


def token_tenant(token: str | None) -> str | None:
    """The `tenant` claim of a JWT, read without checking it (the server
    checks it); None when there is none."""
    if not token or token.count(".") != 2:
        return None
    payload = token.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, UnicodeDecodeError):
        return None
    t = claims.get("tenant") if isinstance(claims, dict) else None
    return t if isinstance(t, str) and t else None


def tenant_of(named: str | None, t: Target, env=None) -> str | None:
    env = os.environ if env is None else env
    return named or env.get("STRATUS_TENANT") or token_tenant(t.token)


def q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def app_path(tenant: str, app: str) -> str:
    return f"/api/v1/tenants/{q(tenant)}/apps/{q(app)}"


def split_ref(ref: str, parts: int, what: str) -> list[str]:
    """TENANT/APP or TENANT/APP/ROLE split, each part non-empty."""
    items = ref.split("/")
    if len(items) != parts or not all(items):
        raise Usage(f"expected {what}, got {ref!r}")
    return items


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_since(text: str, now: float | None = None) -> float:
    """Unix seconds, or a duration ago: 90s, 15m, 2h, 1d."""
    m = _DURATION.match(text.strip())
    if m:
        now = time.time() if now is None else now
        return max(0.0, now - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)])
    try:
        v = float(text)
    except ValueError:
        raise Usage(f"--since: unix seconds or a duration like 15m, not {text!r}") from None
    if v < 0 or v != v or v in (float("inf"),):
        raise Usage(f"--since: unix seconds or a duration like 15m, not {text!r}")
    return v


# --- the package ------------------------------------------------------------------------------
def read_manifest(directory: Path) -> dict:
    """The manifest in `directory`: manifest.json, else manifest.yaml/.yml."""
    for name in MANIFESTS:
        p = directory / name
        if not p.is_file():
            continue
        text = p.read_text(encoding="utf-8")
        if name.endswith(".json"):
            try:
                data = json.loads(text)
            except ValueError as exc:
                raise Usage(f"{p}: not valid JSON ({exc})") from None
        else:
            try:
                import yaml
            except ImportError:
                raise Usage(f"{p}: reading YAML needs PyYAML (pip install pyyaml), or write manifest.json") from None
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise Usage(f"{p}: not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise Usage(f"{p}: the manifest must be a mapping (an object)")
        return data
    raise Usage(f"{directory}: no manifest.json, manifest.yaml or manifest.yml")


def package(directory: Path, limit: int = PACKAGE_LIMIT) -> tuple[bytes, list[str], list[str]]:
    """(the .tar.gz, its member names, what was left out because it is a
    link or not a regular file). The members are the directory's files,
    named relative to it, packed as the built-in apps are (builtin.tarball:
    sorted, no times, no owners), so the same tree packs to the same bytes
    and the same digest. Empty directories are not kept."""
    directory = Path(directory)
    if not directory.is_dir():
        raise Usage(f"{directory}: not a directory")
    files, skipped = walk(directory)
    total = sum(p.stat().st_size for _, p in files)
    if total > UNPACKED_LIMIT:
        raise Usage(f"{directory}: more than {UNPACKED_LIMIT // (1024 * 1024)} MiB of files "
                    "(the platform unpacks no more)")
    data = tarball(files)
    if len(data) > limit:
        raise Usage(f"{directory}: the package is {len(data)} bytes, over {limit // (1024 * 1024)} MiB")
    return data, sorted(rel for rel, _ in files), skipped


# --- progress -----------------------------------------------------------------------------------
def role_counts(view: dict) -> dict[str, tuple[int, int, dict[str, int]]]:
    """role -> (running, desired, {state: count}) from an app as GET shows it."""
    out = {}
    for name, r in sorted((view.get("roles") or {}).items()):
        instances = r.get("instances") or []
        states: dict[str, int] = {}
        for i in instances:
            states[i.get("state", "?")] = states.get(i.get("state", "?"), 0) + 1
        running = r.get("running")
        if not isinstance(running, int):
            running = states.get("running", 0)
        desired = r.get("desired")
        if not isinstance(desired, int):
            desired = r.get("instances") if isinstance(r.get("instances"), int) else len(instances)
        out[name] = (running, desired, states)
    return out


def progress_line(view: dict) -> str:
    parts = []
    for name, (running, desired, states) in role_counts(view).items():
        extra = ", ".join(f"{n} {s}" for s, n in sorted(states.items()) if s != "running")
        parts.append(f"{name} {running}/{desired} running" + (f" ({extra})" if extra else ""))
    return "; ".join(parts) if parts else "no roles"


def settled(view: dict) -> bool:
    """Every role runs its desired count, and no instance is in another state."""
    for running, desired, states in role_counts(view).values():
        if running != desired or sum(n for s, n in states.items() if s != "running"):
            return False
    return True


def instance_marks(view: dict) -> set[tuple]:
    """(id, started, restarts) of every instance: a restart changes each."""
    return {(i.get("id"), i.get("started"), i.get("restarts"))
            for r in (view.get("roles") or {}).values() for i in (r.get("instances") or [])}


def wait_for_app(t: Target, tenant: str, app: str, timeout: float, *, before: set | None = None,
                 out=None, sleep=time.sleep, clock=time.monotonic) -> bool:
    """Poll the app every POLL s, one line per change, until it is settled
    (and, with `before`, none of those instances is left as it was)."""
    out = out or sys.stdout
    started = clock()
    last = None
    while True:
        view = call(t.url, "GET", app_path(tenant, app), token=t.token, timeout=10)
        line = progress_line(view)
        stale = len(before & instance_marks(view)) if before else 0
        if stale:
            line += f"; {stale} instance(s) not restarted yet"
        if line != last:
            print(f"[{clock() - started:5.1f}s] {line}", file=out, flush=True)
            last = line
        if settled(view) and not stale:
            return True
        if clock() - started >= timeout:
            print(f"not settled after {timeout:g}s: {line}", file=out, flush=True)
            return False
        sleep(POLL)


# --- rendering ----------------------------------------------------------------------------------
def _when(ts) -> str:
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return "-"
    return dt.datetime.fromtimestamp(float(ts)).strftime("%Y-%m-%d %H:%M:%S")


def render_apps(apps: list[dict]) -> str:
    rows = []
    for a in apps:
        counts = role_counts(a)
        roles = a.get("roles") or {}
        if not counts:
            rows.append([a.get("tenant", ""), a.get("name", ""), "-", "-", "-", ""])
        for name, (running, desired, _) in counts.items():
            r = roles.get(name) or {}
            rows.append([a.get("tenant", ""), a.get("name", ""), name, r.get("kind", ""), f"{running}/{desired}",
                         " ".join(r.get("routes") or [])])
    if not rows:
        return "no apps"
    return table(["Tenant", "App", "Role", "Kind", "Running", "Routes"], rows)


def render_event(e: dict, tenant: str | None = None) -> str:
    rest = {k: v for k, v in e.items() if k not in ("seq", "time", "type")}
    who = f"{tenant} " if tenant else ""
    tail = " ".join(f"{k}={v if isinstance(v, (int, float, str)) else json.dumps(v)}" for k, v in rest.items())
    return f"{_when(e.get('time'))} {who}#{e.get('seq')} {e.get('type')} {tail}".rstrip()


def render_log(x: dict) -> str:
    return f"{x.get('component')} | {x.get('line')}"


class Seen:
    """Lines already printed while following: a poll asks from the newest
    time printed (inclusive), so lines at that time come again."""

    def __init__(self):
        self.since: float | None = None
        self._at: set[tuple] = set()   # lines printed at time `since`

    def new(self, lines: list[dict]) -> list[dict]:
        out = []
        for x in lines:
            key = (x.get("component"), x.get("time"), x.get("line"))
            t = x.get("time")
            if not isinstance(t, (int, float)):
                continue
            if self.since is not None and (t < self.since or (t == self.since and key in self._at)):
                continue
            if self.since is None or t > self.since:
                self.since, self._at = t, set()
            self._at.add(key)
            out.append(x)
        return out


# --- commands -----------------------------------------------------------------------------------
def parser(cmd: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"stratus {cmd}")
    p.add_argument("--url", help="the API's base URL (default: $STRATUS_URL, else the orchestrator's own port, "
                                 "or the gateway with a token)")
    p.add_argument("--token", help="a bearer token (default: $STRATUS_TOKEN)")
    if cmd == "deploy":
        p.add_argument("path", help="a directory holding manifest.json (or .yaml) and the code")
        p.add_argument("--tenant", help="the tenant (default: $STRATUS_TENANT, else the token's)")
        p.add_argument("--app", help="the app's name (default: the directory's name)")
    elif cmd == "apps":
        p.add_argument("tenant", nargs="?", help="the tenant (default: $STRATUS_TENANT, the token's, else all)")
        p.add_argument("--json", action="store_true", help="print the answers' JSON")
    elif cmd == "scale":
        p.add_argument("ref", metavar="TENANT/APP/ROLE")
        p.add_argument("instances", metavar="N", type=int)
    elif cmd == "restart":
        p.add_argument("ref", metavar="TENANT/APP")
    elif cmd == "events":
        p.add_argument("tenant", nargs="?", help="the tenant (default: $STRATUS_TENANT, the token's, else all)")
        p.add_argument("--since", type=int, default=0, metavar="N", help="after this sequence number")
        p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    elif cmd == "logs":
        p.add_argument("component", nargs="?", help="gateway, a worker id, TENANT[/APP[/INSTANCE]] (default: all)")
        p.add_argument("--since", metavar="T", help="unix seconds, or a duration ago: 90s, 15m, 2h, 1d")
        p.add_argument("--grep", metavar="TEXT", help="lines holding TEXT (case-sensitive), e.g. a request id")
        p.add_argument("--limit", type=int, default=1000, help="lines at most (1-10000, default 1000)")
        p.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    else:
        raise Usage(f"unknown command {cmd!r}")
    if cmd in ("deploy", "scale", "restart"):
        p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait for the app to settle")
        p.add_argument("--no-wait", action="store_true", help="do not wait for the app to settle")
    return p


def parse(cmd: str, args: list[str]) -> argparse.Namespace:
    p = parser(cmd)
    a = p.parse_args(args)
    try:
        if cmd == "scale":
            a.tenant, a.app, a.role = split_ref(a.ref, 3, "TENANT/APP/ROLE")
            if a.instances < 0:
                raise Usage("N must be 0 or more")
        elif cmd == "restart":
            a.tenant, a.app = split_ref(a.ref, 2, "TENANT/APP")
        elif cmd == "logs":
            a.since_t = parse_since(a.since) if a.since is not None else None
            if not 1 <= a.limit <= 10_000:
                raise Usage("--limit is 1 to 10000")
        elif cmd == "events" and a.since < 0:
            raise Usage("--since is a sequence number, 0 or more")
    except Usage as exc:
        p.error(str(exc))
    return a


def deploy(a, t: Target) -> int:
    directory = Path(a.path).resolve()
    tenant = tenant_of(a.tenant, t)
    if not tenant:
        raise Usage("name the tenant: --tenant T, or STRATUS_TENANT")
    app = a.app or directory.name
    manifest = read_manifest(directory)
    data, members, skipped = package(directory)
    note = f"; left out {len(skipped)} link(s) or special file(s): {', '.join(skipped[:5])}" if skipped else ""
    print(f"packed {directory} ({len(members)} members, {len(data)} bytes){note}", flush=True)
    r = call(t.url, "PUT", app_path(tenant, app) + "/package", token=t.token, data=data,
             content_type="application/gzip", timeout=120)
    digest = r.get("digest") if isinstance(r, dict) else None
    print(f"package uploaded: {digest}", flush=True)
    view = call(t.url, "PUT", app_path(tenant, app), manifest, token=t.token, timeout=60,
                query={"digest": digest})
    print(f"manifest applied: {tenant}/{app}"
          + (f" (generation {view.get('generation')})" if isinstance(view, dict) and "generation" in view else ""),
          flush=True)
    if a.no_wait:
        return 0
    return 0 if wait_for_app(t, tenant, app, a.timeout) else 1


def apps(a, t: Target) -> int:
    tenant = tenant_of(a.tenant, t)
    tenants = [tenant] if tenant else [x["name"] for x in call(t.url, "GET", "/api/v1/tenants", token=t.token)]
    found = []
    for name in tenants:
        listed = call(t.url, "GET", f"/api/v1/tenants/{q(name)}/apps", token=t.token)
        if isinstance(listed, dict):
            listed = listed.get("apps", list(listed.values()))
        for item in listed or []:
            if isinstance(item, str):   # names only: ask for each
                item = call(t.url, "GET", app_path(name, item), token=t.token)
            found.append({"tenant": name, **item})
    print(json.dumps(found, indent=2) if a.json else render_apps(found))
    return 0


def scale(a, t: Target) -> int:
    call(t.url, "PATCH", f"{app_path(a.tenant, a.app)}/roles/{q(a.role)}", {"instances": a.instances},
         token=t.token)
    print(f"{a.tenant}/{a.app}/{a.role}: {a.instances} instance(s) asked", flush=True)
    if a.no_wait:
        return 0
    return 0 if wait_for_app(t, a.tenant, a.app, a.timeout) else 1


def restart(a, t: Target) -> int:
    before = instance_marks(call(t.url, "GET", app_path(a.tenant, a.app), token=t.token))
    call(t.url, "POST", f"{app_path(a.tenant, a.app)}/restart", token=t.token)
    print(f"{a.tenant}/{a.app}: rolling restart of {len(before)} instance(s) started", flush=True)
    if a.no_wait:
        return 0
    return 0 if wait_for_app(t, a.tenant, a.app, a.timeout, before=before) else 1


def events(a, t: Target, *, polls: int | None = None, sleep=time.sleep) -> int:
    tenant = tenant_of(a.tenant, t)
    tenants = [tenant] if tenant else [x["name"] for x in call(t.url, "GET", "/api/v1/tenants", token=t.token)]
    since = {name: a.since for name in tenants}
    n = 0
    while True:
        for name in tenants:
            r = call(t.url, "GET", f"/api/v1/tenants/{q(name)}/events", token=t.token, query={"since": since[name]})
            evs = r.get("events", []) if isinstance(r, dict) else (r or [])
            for e in evs:
                print(render_event(e, None if tenant else name), flush=True)
                if isinstance(e.get("seq"), int):
                    since[name] = max(since[name], e["seq"])
            if isinstance(r, dict) and isinstance(r.get("next"), int):
                since[name] = max(since[name], r["next"])
        n += 1
        if not a.follow or (polls is not None and n >= polls):
            return 0
        sleep(FOLLOW_POLL)


def logs(a, t: Target, *, polls: int | None = None, sleep=time.sleep) -> int:
    seen = Seen()
    since = a.since_t
    n = 0
    while True:
        r = call(t.url, "GET", "/api/v1/logs", token=t.token,
                 query={"component": a.component, "since": since, "q": a.grep, "limit": a.limit})
        for x in seen.new(r.get("lines", []) if isinstance(r, dict) else []):
            print(render_log(x), flush=True)
        n += 1
        if not a.follow or (polls is not None and n >= polls):
            return 0
        if seen.since is not None:
            since = seen.since
        sleep(FOLLOW_POLL)


RUN = {"deploy": deploy, "apps": apps, "scale": scale, "restart": restart, "events": events, "logs": logs}


def main(cmd: str, args: list[str]) -> int:
    a = parse(cmd, args)
    t = target(a.url, a.token)
    try:
        return RUN[cmd](a, t)
    except Usage as exc:
        print(f"stratus {cmd}: {exc}", file=sys.stderr)
        return 2
    except ApiError as exc:
        where = f" ({exc.status})" if exc.status else ""
        print(f"stratus {cmd}{where}: {exc.json()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
