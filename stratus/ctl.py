"""`stratus status`, `stratus crash master|slave`, `stratus switchover`,
`stratus tenant create NAME | list | delete NAME`: the orchestrator's admin
API from the command line (like patronictl).
Talks to settings.orchestrator_base_url() (STRATUS_ORCHESTRATOR_URL, or
http://127.0.0.1:$STRATUS_ORCHESTRATOR_PORT) with the standard library."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import urllib.error
import urllib.parse
import urllib.request

from bus.settings import load


class ApiError(Exception):
    def __init__(self, message: str, status: int | None = None, body=None):
        super().__init__(message)
        self.status = status   # the HTTP status, None when the orchestrator was not reached
        self.body = body       # the answer's JSON error ({"error": ...}), when there was one

    def json(self) -> str:
        """The error as JSON, for printing: the answer's own body when it had one."""
        body = self.body if isinstance(self.body, dict) else {"error": str(self)}
        return json.dumps(body)


def call(base: str, method: str, path: str, body: dict | None = None, timeout: float = 60.0, *,
         token: str | None = None, data: bytes | None = None, content_type: str | None = None,
         query: dict | None = None):
    """One request to the API at `base`: `body` is sent as JSON, or `data` as
    raw bytes of `content_type`; `query` (None values left out) becomes the
    query string; `token` is sent as a bearer token (through the gateway).
    Returns the answer's JSON (None when empty); raises ApiError."""
    if data is None and body is not None:
        data = json.dumps(body).encode()
    headers = {"Content-Type": content_type or "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    url = base.rstrip("/") + path
    q = {k: v for k, v in (query or {}).items() if v is not None}
    if q:
        url += "?" + urllib.parse.urlencode(q)
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            parsed = json.loads(e.read())
            msg = parsed.get("error", e.reason) if isinstance(parsed, dict) else e.reason
        except ValueError:
            parsed, msg = None, e.reason
        raise ApiError(f"{e.code}: {msg}", e.code, parsed) from None
    except (urllib.error.URLError, OSError) as e:
        raise ApiError(f"cannot reach the orchestrator at {base}: {getattr(e, 'reason', e)}") from None


def table(headers: list[str], rows: list[list], title: str = "") -> str:
    cells = [[str(c) for c in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    sep = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    top = sep
    if title:
        t = f" {title} "
        top = "+" + t + "-" * max(0, len(sep) - len(t) - 2) + "+"
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([top, line(cells[0]), sep, *[line(r) for r in cells[1:]], sep])


def _when(ts) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(float(ts), dt.timezone.utc).strftime("%H:%M:%S")


def render_status(v: dict) -> str:
    rows = [[w["id"], w["host"], w["pid"], ("Leader" if w["role"] == "master" else "Replica"), w["state"],
             w["term"], w["applied_lsn"], w["lag"], "yes" if w["ready"] else "no", w.get("reads", 0)]
            for w in v["workers"]]
    out = [table(["Member", "Host", "Pid", "Role", "State", "TL", "LSN", "Lag", "Ready", "Reads"], rows,
                 f"Cluster: {v['cluster']} (term {v['term']})")]
    d = v.get("last_decision")
    out.append(f"slave target {v['slave_target']} (max {v['max_slaves']}); "
               f"{v['reads_in_window']} reads in the window started {_when(v['window_start'])} "
               f"({v['window_seconds']:g}s, {v['reads_per_slave']} reads per slave)")
    if d:
        out.append(f"last scaling decision at {_when(d['at'])}: {d['reads']} reads -> {d['target']} slave(s) ({d['action']})")
    if v.get("elections"):
        out.append("elections:")
        for e in v["elections"][-5:]:
            out.append(f"  term {e['term']} at {_when(e['at'])}: {e['old'] or '-'} -> {e['new']} ({e['reason']})")
    o = v.get("orchestrator") or {}
    out.append(f"orchestrator {o.get('id')} ({'leader' if o.get('leading') else 'standby'}, "
               f"{o.get('candidates', '?')} candidate(s))")
    return "\n".join(out)


def render_tenants(tenants: list[dict]) -> str:
    if not tenants:
        return "no tenants"
    rows = [[t["name"], t["apps"], t["instances"], _size(t["storage_bytes"])] for t in tenants]
    return table(["Tenant", "Apps", "Instances", "Storage"], rows)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def tenant(a, url: str) -> None:
    if a.action == "create":
        r = call(url, "POST", "/api/v1/tenants", {"name": a.name})
        print(f"tenant {r['name']} created; its owner's password: {r['password']}\n"
              "(shown only this once: keep it now)")
    elif a.action == "delete":
        call(url, "DELETE", f"/api/v1/tenants/{urllib.parse.quote(a.name, safe='')}")
        print(f"tenant {a.name} deleted: its broker account, tables and account are gone")
    else:
        print(render_tenants(call(url, "GET", "/api/v1/tenants")))


def main(cmd: str, args: list[str]) -> int:
    settings = load()
    p = argparse.ArgumentParser(prog=f"stratus {cmd}")
    p.add_argument("--url", default=settings.orchestrator_base_url(), help="the orchestrator's base URL")
    if cmd == "status":
        p.add_argument("--json", action="store_true", help="print the raw /api/v1/cluster answer")
    elif cmd == "crash":
        p.add_argument("what", choices=["master", "slave"])
    elif cmd == "switchover":
        p.add_argument("--candidate", help="the worker id to hand the master role to (default: by the rule)")
    elif cmd == "tenant":
        url = argparse.ArgumentParser(add_help=False)   # --url after the action too
        url.add_argument("--url", default=argparse.SUPPRESS, help="the orchestrator's base URL")
        sub = p.add_subparsers(dest="action", required=True, metavar="create|list|delete")
        sub.add_parser("create", parents=[url], help="create a tenant; prints its owner's password once"
                       ).add_argument("name")
        sub.add_parser("list", parents=[url], help="every tenant with its apps, instances and storage")
        sub.add_parser("delete", parents=[url], help="delete a tenant: its apps, tables and accounts"
                       ).add_argument("name")
    else:
        print(f"stratus: unknown command {cmd!r}", file=sys.stderr)
        return 2
    a = p.parse_args(args)
    try:
        if cmd == "status":
            v = call(a.url, "GET", "/api/v1/cluster")
            print(json.dumps(v, indent=2) if a.json else render_status(v))
        elif cmd == "tenant":
            tenant(a, a.url)
        elif cmd == "crash":
            pids = call(a.url, "POST", f"/api/v1/crash/{a.what}")
            print(f"killed the {a.what}: pid {', '.join(pids)}")
        else:
            r = call(a.url, "POST", "/api/v1/switchover", {"candidate": a.candidate} if a.candidate else {})
            print(f"switchover done: {r['old']} -> {r['new']} (term {r['term']})")
    except ApiError as exc:
        print(f"stratus {cmd}: {exc}", file=sys.stderr)
        return 1
    return 0
