"""`GET /api/v1/logs?component=C&since=T&q=TEXT&limit=N` (paas.md, Apps, the
logs row; issue 15, Logs): the platform's log files, read where they lie.

Files and their component names (state = settings.state_path,
cluster = settings.cluster_state_path()):

    <state>/logs/<name>.log                              <name>  (gateway, orchestrator, ... by `stratus up`)
    <cluster>/logs/<worker-id>.log                       <worker-id>  (a DB worker, e.g. w-1a2b3c4d)
    <cluster>/logs/instances/<tenant>/<app>/<id>.log     <tenant>/<app>/<id>  (an app instance)

`component` selects one of those names; `<tenant>/<app>` and `<tenant>` select
every instance below them (a bare name selects the platform file or worker
of that name and the tenant's instances, whichever exist). No component:
every file the caller may read. A component that names nothing: 404.

Parameters (all optional; anything else is ignored):
    since   unix seconds (a float >= 0): lines whose time is at or after it
    q       a substring (case-sensitive), matched against the line as served;
            q=<request id> follows one request through the gateway, the
            service and the DB worker, which all log it
    limit   how many lines at most: 1..10000, default 1000
A bad since or limit (or a q over 1000 characters): 400.

A line's time is parsed from its start, either logging's %(asctime)s
("2026-11-25 15:43:52,123", local time) or an ISO 8601 time (a zone, or
local when it has none). A line without one has the time of the nearest
line before it in its file that has one; when there is none (the lines a
program prints before it sets up logging, or none within LOOKBACK_LINES
lines back), the time of the nearest timed line after it, so the order
stays the file's; in a file with no time at all, the file's modification
time. With `since`, a file is read back only until a line older than
since - SKEW seconds (lines may be a little out of order).

Answer: 200 {"lines": [{"component": C, "time": <unix seconds>, "line": "..."}]},
the newest `limit` matching lines of all selected files, oldest first
(newest last). Errors are {"error": "..."}.

Files are read backwards from their end in blocks, never whole: memory is
bounded by `limit` lines (each cut at MAX_LINE bytes) whatever the file's
size, and one request reads at most SCAN_BUDGET bytes in all, shared
fairly between the files (so a search for a rare q in huge files answers
with what the newest part of each holds). A file is read up to the size it had when opened.

Access, by the identity the gateway forwards (X-Stratus-Role/-Subject/-Tenant;
none = the orchestrator's own port = admin), given as a function:
    admin, developer    any component
    tenant (owner)      its own instances only: a component outside
                        <tenant>[/...] is 403; no component = its instances
    any other role      403

Credentials never leave: in every line served, `scheme://user:password@`
becomes `scheme://user:***@`, and `password=...`-like values become ***."""
from __future__ import annotations

import datetime as dt
import functools
import math
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000
MAX_Q = 1000
MAX_COMPONENT = 300
MAX_LINE = 16 * 1024              # bytes of one line served; longer lines are cut
BLOCK = 64 * 1024
SCAN_BUDGET = 64 * 1024 * 1024    # bytes read from disk per request, all files together
SKEW = 5.0                        # lines may be this much out of order in a file

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TIME = re.compile(r"(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2}):(\d{2})(?:[.,](\d{1,9}))?"
                   r"(Z|[+-]\d{2}(?::?\d{2})?)?")
_URL_CREDS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*:)[^\s@/]*@")
_KEY_VALUE = re.compile(r"(?i)(password|passwd|pwd|secret)(['\"]?\s*[=:]\s*['\"]?)(?!\*\*\*)[^\s'\",;&)]+")
_CUT = b" [...cut]"
LOOKBACK_LINES = 10_000        # untimed lines read back to date the last ones kept


class LogsError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Source:
    component: str
    path: Path


@dataclass(frozen=True)
class Params:
    component: str | None
    since: float | None
    q: str | None
    limit: int


# --- lines ----------------------------------------------------------------------------------
def scrub(line: str) -> str:
    """The line with credentials replaced by ***."""
    if "://" in line:
        line = _URL_CREDS.sub(r"\1***@", line)
    if any(k in line.lower() for k in ("pass", "pwd", "secret")):
        line = _KEY_VALUE.sub(r"\1\2***", line)
    return line


@functools.lru_cache(maxsize=4096)
def _hour_start(y: int, mo: int, d: int, h: int, zone: str | None) -> float:
    """Unix time of the start of an hour, in local time or in `zone`."""
    if zone is None:
        return dt.datetime(y, mo, d, h).timestamp()
    if zone == "Z":
        tz = dt.timezone.utc
    else:
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        tz = dt.timezone(sign * dt.timedelta(hours=int(digits[:2]), minutes=int(digits[2:4] or 0)))
    return dt.datetime(y, mo, d, h, tzinfo=tz).timestamp()


def parse_time(line: str) -> float | None:
    """The unix time a line starts with (asctime or ISO 8601), else None."""
    if len(line) < 19 or not line[:4].isdigit() or line[4] != "-":
        return None
    m = _TIME.match(line)
    if m is None:
        return None
    y, mo, d, h, mi, s, frac, zone = m.groups()
    try:
        base = _hour_start(int(y), int(mo), int(d), int(h), zone)
    except (ValueError, OverflowError):
        return None
    mi, s = int(mi), int(s)
    if mi > 59 or s > 60:
        return None
    return base + mi * 60 + s + (int(frac) / 10 ** len(frac) if frac else 0.0)


def _reverse_blocks(f, size: int, budget: list[int]) -> Iterator[tuple[bytes, list[bytes]]]:
    """The non-empty lines of f[0:size], last first, without their newline,
    each cut to MAX_LINE bytes (its beginning kept, _CUT appended), a block
    at a time: (the bytes read with the block, its complete lines newest
    first). Reads backwards in BLOCKs, taking what it reads off budget[0],
    and stops when the budget is spent (the line it was in is not given)."""
    pos = size
    partial = b""   # the line being assembled: its end is known, its start not yet
    cut = False     # partial lost bytes at its end (it was longer than MAX_LINE)
    while pos > 0 and budget[0] > 0:
        n = min(BLOCK, pos, budget[0])
        pos -= n
        f.seek(pos)
        chunk = f.read(n)
        budget[0] -= n
        if len(chunk) < n:     # the file was truncated under us: what is left is gone
            return
        buf = chunk + partial
        parts = buf.split(b"\n")
        partial = parts[0]
        lines = []
        for i in range(len(parts) - 1, 0, -1):
            p = parts[i]
            if (i == len(parts) - 1 and cut) or len(p) > MAX_LINE:
                lines.append(p[:MAX_LINE] + _CUT)
            elif p:
                lines.append(p)
        if len(parts) > 1:
            cut = False
        if len(partial) > MAX_LINE:
            partial, cut = partial[:MAX_LINE], True   # keep the line's beginning: it has the time
        if lines:
            yield buf, lines
    if pos == 0 and (partial or cut):
        yield partial, [partial[:MAX_LINE] + _CUT if cut or len(partial) > MAX_LINE else partial]


def _head(raw: bytes) -> str:
    return raw[:48].decode("latin-1")


def tail(path: Path, *, since: float | None = None, q: str | None = None, limit: int = DEFAULT_LIMIT,
         budget: list[int] | None = None) -> list[tuple[float, str]]:
    """The newest `limit` lines of one file that match (time >= since, q in
    the scrubbed line), as (time, scrubbed line), oldest first. `budget` is
    a one-element list of bytes the caller lets it read (shared between
    files); a missing file has no lines."""
    budget = budget if budget is not None else [SCAN_BUDGET]
    try:
        f = open(path, "rb")
    except OSError:
        return []
    qb = q.encode("utf-8", "surrogatepass") if q is not None else None
    # Scrubbing only ever puts "***" where text was: a q without "*" that
    # is not in the raw bytes is not in the scrubbed line either, and a
    # block without it has no line to give.
    prefilter = qb is not None and b"*" not in qb
    with f:
        st = os.fstat(f.fileno())
        size, mtime = st.st_size, st.st_mtime
        out: list[tuple[float, str]] = []   # newest first
        pending: list[str] = []              # matching lines, newer than here, whose time is not known yet
        after: float | None = None           # the time of the oldest timed line read (the one after pending)
        looked = 0                           # untimed lines read while waiting to date a full pending list
        done = False
        for buf, lines in _reverse_blocks(f, size, budget):
            if prefilter and not pending and qb not in buf:
                # Nothing to give here; only the block's oldest time matters
                # (is it before `since`? it dates untimed lines before it).
                t = next((x for x in map(parse_time, map(_head, reversed(lines))) if x is not None), None)
                if t is not None:
                    after = t
                    if since is not None and t < since - SKEW:
                        break
                continue
            for raw in lines:
                t = parse_time(_head(raw))
                line = None
                if not prefilter or qb in raw:
                    line = scrub(raw.decode("utf-8", "replace").rstrip("\r"))
                    if q is not None and q not in line:
                        line = None
                if t is None:
                    if line is not None and len(out) + len(pending) < limit:
                        pending.append(line)
                    if len(out) + len(pending) >= limit:
                        looked += 1
                        if not pending or looked > LOOKBACK_LINES:
                            done = True    # full; or no time in sight: the pending lines take the file's
                            break
                    continue
                # A timed line: it dates the untimed lines after it.
                if since is None or t >= since:
                    out.extend((t, p) for p in pending)
                    if line is not None:
                        out.append((t, line))
                pending = []
                after = t
                if len(out) >= limit or (since is not None and t < since - SKEW):
                    done = True
                    break
            if done:
                break
        when = mtime if after is None else after   # no timed line before them: the one after, or the file's
        for p in pending:
            if since is None or when >= since:
                out.append((when, p))
    out = out[:limit]
    out.reverse()
    return out


# --- files -------------------------------------------------------------------------------------
def _files(d: Path) -> dict[str, Path]:
    """name -> path of the regular *.log files directly in d (no links)."""
    found = {}
    try:
        entries = list(os.scandir(d))
    except OSError:
        return found
    for e in entries:
        if e.name.endswith(".log") and len(e.name) > 4:
            try:
                if stat.S_ISREG(e.stat(follow_symlinks=False).st_mode):
                    found[e.name[:-4]] = Path(e.path)
            except OSError:
                continue
    return found


def _dirs(d: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(d) if e.is_dir(follow_symlinks=False) and _SEGMENT.match(e.name))
    except OSError:
        return []


class Layout:
    """Where the logs are, for one settings object (bus.settings.Settings)."""

    def __init__(self, settings):
        self.platform = settings.state_path / "logs"
        self.cluster = settings.cluster_state_path() / "logs"
        self.instances = self.cluster / "instances"

    def instance_sources(self, tenant: str | None = None, app: str | None = None,
                         instance: str | None = None) -> list[Source]:
        """Every instance log below instances/[tenant[/app[/instance]]]."""
        out = []
        for t in ([tenant] if tenant else _dirs(self.instances)):
            for a in ([app] if app else _dirs(self.instances / t)):
                files = _files(self.instances / t / a)
                for i in sorted(files):
                    if instance is None or i == instance:
                        out.append(Source(f"{t}/{a}/{i}", files[i]))
        return out

    def all_sources(self) -> list[Source]:
        out = [Source(n, p) for n, p in sorted(_files(self.platform).items())]
        out += [Source(n, p) for n, p in sorted(_files(self.cluster).items())]
        return out + self.instance_sources()

    def select(self, component: str | None, *, tenant: str | None = None) -> list[Source]:
        """The files a component names. With `tenant` (a tenant owner's
        request) only that tenant's instances: another component is 403.
        A component that names no file is 404 (a tenant's own name with no
        instance logs yet is no error: it has none)."""
        if tenant is not None:
            if component is None:
                component = tenant
            if component != tenant and not component.startswith(tenant + "/"):
                raise LogsError(403, "a tenant reads the logs of its own instances only")
        if component is None:
            return self.all_sources()
        parts = component.split("/")
        if len(component) > MAX_COMPONENT or len(parts) > 3 or not all(_SEGMENT.match(p) for p in parts):
            raise LogsError(404, f"no such component: {component[:80]!r}")
        found: list[Source] = []
        if len(parts) == 1 and tenant is None:
            for d in (self.platform, self.cluster):
                p = _files(d).get(component)
                if p is not None:
                    found.append(Source(component, p))
        if len(parts) == 3:
            found += self.instance_sources(*parts)
        elif (self.instances / Path(*parts)).is_dir():
            found += self.instance_sources(*parts)
        if not found and not (tenant is not None and component == tenant):
            raise LogsError(404, f"no such component: {component[:80]!r}")
        return found


def read(sources: Iterable[Source], *, since: float | None = None, q: str | None = None,
         limit: int = DEFAULT_LIMIT, budget: int = SCAN_BUDGET) -> list[dict]:
    """The newest `limit` matching lines of all `sources`, newest last. The
    scan budget is shared fairly: each file may read an equal part of what
    the files before it left (so one huge file cannot starve the others)."""
    sources = list(sources)
    left = budget
    lines: list[tuple[float, int, str, str]] = []
    for n, src in enumerate(sources):
        if left <= 0:
            break
        share = [min(left, max(left // (len(sources) - n), BLOCK))]
        given = share[0]
        for t, line in tail(src.path, since=since, q=q, limit=limit, budget=share):
            lines.append((t, n, src.component, line))
        left -= given - share[0]
    lines.sort(key=lambda x: x[0])   # stable: a file's own order is kept among equal times
    return [{"component": c, "time": round(t, 3), "line": line} for t, _, c, line in lines[-limit:]]


# --- the route -----------------------------------------------------------------------------------
def parse_params(args) -> Params:
    """The query parameters (a mapping), checked; LogsError(400) otherwise."""
    component = args.get("component") or None
    since = args.get("since")
    if since is not None and since != "":
        try:
            since = float(since)
        except ValueError:
            raise LogsError(400, "since must be unix seconds (a number)") from None
        if not math.isfinite(since) or since < 0:
            raise LogsError(400, "since must be unix seconds (a finite number >= 0)")
    else:
        since = None
    limit = args.get("limit")
    if limit is None or limit == "":
        limit = DEFAULT_LIMIT
    else:
        try:
            limit = int(limit)
        except ValueError:
            raise LogsError(400, f"limit must be an integer from 1 to {MAX_LIMIT}") from None
        if not 1 <= limit <= MAX_LIMIT:
            raise LogsError(400, f"limit must be an integer from 1 to {MAX_LIMIT}")
    q = args.get("q")
    if q == "":
        q = None
    if q is not None and len(q) > MAX_Q:
        raise LogsError(400, f"q is at most {MAX_Q} characters")
    return Params(component, since, q, limit)


def serve(settings, ident, args) -> list[dict]:
    """The answer's lines for one request: `ident` has .role and .tenant,
    `args` is the query string as a mapping. Raises LogsError."""
    role = getattr(ident, "role", None)
    p = parse_params(args)
    if role in ("admin", "developer"):
        tenant = None
    elif role == "tenant":
        tenant = getattr(ident, "tenant", None)
        if not tenant:
            raise LogsError(403, "a tenant identity without its tenant")
    else:
        raise LogsError(403, "the logs are for the admin, developers and tenant owners")
    sources = Layout(settings).select(p.component, tenant=tenant)
    return read(sources, since=p.since, q=p.q, limit=p.limit)


def blueprint(settings, identity: Callable[[], object]):
    """A Flask blueprint serving GET /api/v1/logs; `identity()` gives the
    request's identity (an object with .role and .tenant)."""
    from flask import Blueprint, jsonify, request

    bp = Blueprint("stratus_logs", __name__)

    @bp.get("/api/v1/logs")
    def logs():
        started = time.monotonic()
        try:
            lines = serve(settings, identity(), request.args)
        except LogsError as exc:
            return jsonify({"error": exc.message}), exc.status
        resp = jsonify({"lines": lines})
        resp.headers["X-Stratus-Scan-Ms"] = f"{(time.monotonic() - started) * 1000:.1f}"
        return resp

    return bp


def register(app, settings, identity: Callable[[], object]) -> None:
    """Add GET /api/v1/logs to a Flask app."""
    app.register_blueprint(blueprint(settings, identity))
