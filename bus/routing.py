"""The apps' routes, in ZooKeeper, for the gateway (paas.md, Apps; platform.md,
Routes through the gateway).

Layout: one persistent znode per deployed app that has web roles,

    /stratus/<cluster>/routes/<tenant>.<app>        (bus.names.Paths.app_route)

holding JSON

    {"tenant": t, "app": a, "by": "orchestrator" | "test",
     "routes": {"/prefix": {"role": r, "service": s}, ...}}

`s` is the registry service name of the web role's instances
(bus.names.app_service(t, a, r) = "app.<t>.<a>.<r>"; the built-in services
started directly by tests keep their own names, such as "users"); the
instances are the registry znodes under Paths.service(s) (bus/registry.py).
The orchestrator's app controller writes an app's znode when the app is
deployed or changed (`publish`) and deletes it when the app goes (`remove`);
"by" says who wrote it, so the controller only ever removes its own.

A prefix is "/" or a clean absolute path without a trailing "/": it covers
the path equal to it and every path that continues it with "/" ("/shop"
covers "/shop" and "/shop/x", not "/shopping"; "/" covers every path). A
path goes to the longest prefix that covers it (`match_prefix`). Route
ownership is decided by the orchestrator (one app per prefix); should two
entries still name one prefix, the entry whose key sorts first keeps it.

Reserved paths (paas.md, Apps): everything under /api, /dashboard, /health
and /metrics belongs to the platform, compared by path segment and without
regard to case, after percent-decoding and resolving "." and ".." segments,
with empty segments ("//") ignored: "/API/x", "/Api/", "//health",
"/%61pi" and "/x/../metrics" are reserved; "/apix", "/healthz" and
"/dashboardx" are not (`reserved`). Of it, only the built-in apps'
documented paths may be claimed, by their own tenant alone, exactly as
written (BUILTIN_CLAIMS: "/api/v1/users" and "/api/v1/rides" of rideshare,
and paths below them; `builtin_claim`). A claim is refused (`claim_refusal`,
the orchestrator's 409) when it is reserved and not such a built-in claim,
or when it covers the reserved paths ("/" does). `build` leaves out a
reserved prefix that is not a built-in claim of the entry's tenant, and the
gateway sends a reserved request path to an app only through such a claim,
so no tenant route can ever take a request meant for the platform.

`RouteTable` follows the znodes with a children watch on Paths.routes and a
data watch on each child, so a deploy, change or delete reaches a gateway
within a ZooKeeper round trip; it keeps an immutable {prefix: Entry} that it
swaps whole on every change, and calls `on_change(table)` after each swap.
`Children` is the children watch it uses: unlike kazoo's ChildrenWatch it
keeps following a node that is deleted and created again, and re-reads after
a new session, until `close()`."""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Mapping
from urllib.parse import unquote

from kazoo.client import KazooState
from kazoo.exceptions import KazooException, NoNodeError, NodeExistsError
from kazoo.recipe.watchers import DataWatch

from .names import Paths

log = logging.getLogger("stratus.routing")

BY = ("orchestrator", "test")
RESERVED_ROOTS = frozenset({"api", "dashboard", "health", "metrics"})   # compared casefolded
BUILTIN_CLAIMS = {"/api/v1/users": "rideshare", "/api/v1/rides": "rideshare"}   # prefix -> its tenant


@dataclass(frozen=True)
class Entry:
    tenant: str
    app: str
    role: str
    service: str


class BadRoute(ValueError):
    pass


def check_prefix(prefix) -> str:
    """`prefix` itself when it is a route prefix (see the module doc), else BadRoute."""
    if not isinstance(prefix, str) or not prefix.startswith("/") or len(prefix) > 1024:
        raise BadRoute(f"a route prefix is an absolute path, not {prefix!r}")
    if prefix == "/":
        return prefix
    for seg in prefix[1:].split("/"):
        if seg in ("", ".", "..") or any(c in seg for c in "?#\\ \x00"):
            raise BadRoute(f"route prefix {prefix!r}: empty, '.' or '..' segment, a trailing '/', or '?', '#', "
                           "'\\', space or NUL")
    return prefix


# --- reserved paths (paas.md, Apps) ---------------------------------------------------
def _segments(path: str) -> list[str]:
    """The segments of `path` as a server would resolve them: percent-decoded
    (an encoded "/" splits too), "." dropped, ".." taking one back, empty
    segments ignored. Case is kept."""
    if "%" in path:
        path = unquote(path, errors="replace")
    out: list[str] = []
    for seg in path.replace("\\", "/").split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    return out


def reserved(path) -> bool:
    """`path` is under /api, /dashboard, /health or /metrics, by segment and
    whatever its case or encoding (see the module doc). "/" is not."""
    if not isinstance(path, str):
        return False
    segs = _segments(path)
    return bool(segs) and segs[0].casefold() in RESERVED_ROOTS


def builtin_claim(prefix: str, tenant) -> bool:
    """`prefix` is one of the built-in apps' documented paths, or a path
    below one, written exactly (case, no encoding, no dot or empty
    segment), and `tenant` is the app's own tenant."""
    if not isinstance(prefix, str) or "%" in prefix or "\\" in prefix:
        return False
    if prefix != "/" + "/".join(_segments(prefix)):
        return False
    return any(tenant == owner and (prefix == p or prefix.startswith(p + "/")) for p, owner in BUILTIN_CLAIMS.items())


def claim_refusal(prefix: str, tenant) -> str | None:
    """Why `tenant` may not claim the route prefix `prefix` for the
    platform's sake (a 409 message), or None when it may."""
    if not isinstance(prefix, str):
        return f"route {prefix!r} is not a path"
    segs = _segments(prefix)
    if not segs:
        return (f"route {prefix!r} would cover the platform's reserved paths "
                f"({', '.join('/' + r for r in sorted(RESERVED_ROOTS))})")
    if segs[0].casefold() in RESERVED_ROOTS and not builtin_claim(prefix, tenant):
        allowed = ", ".join(f"{p} (tenant {t})" for p, t in BUILTIN_CLAIMS.items())
        return (f"route {prefix!r} is under /{segs[0].casefold()}, reserved for the platform "
                f"(by segment, whatever the case); of it only {allowed} may be claimed")
    return None


def may_route(prefix: str, tenant) -> bool:
    """An entry's prefix the gateway may route for `tenant`: not reserved,
    or a built-in claim of that tenant."""
    return not reserved(prefix) or builtin_claim(prefix, tenant)


def _key(tenant: str, app: str) -> str:
    return f"{tenant}.{app}"


def publish(zk, paths: Paths, tenant: str, app: str, routes: Mapping[str, tuple[str, str]],
            by: str = "orchestrator") -> dict:
    """Write (create or replace) the routes of `tenant`'s `app`:
    {prefix: (role, service)}. Returns the entry written."""
    if by not in BY:
        raise BadRoute(f"by must be one of {BY}, not {by!r}")
    for what, v in (("tenant", tenant), ("app", app)):
        if not isinstance(v, str) or not v or "." in v or "/" in v:
            raise BadRoute(f"{what} {v!r}: a non-empty name without '.' or '/'")
    out = {}
    for prefix, target in routes.items():
        if isinstance(target, Mapping):
            role, service = target.get("role"), target.get("service")
        else:
            role, service = target
        if not (isinstance(role, str) and role and isinstance(service, str) and service and "/" not in service):
            raise BadRoute(f"route {prefix!r}: a role and a registry service name, not {target!r}")
        out[check_prefix(prefix)] = {"role": role, "service": service}
    entry = {"tenant": tenant, "app": app, "by": by, "routes": out}
    data = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
    path = paths.app_route(tenant, app)
    try:
        zk.set(path, data)
    except NoNodeError:
        try:
            zk.create(path, data, makepath=True)
        except NodeExistsError:
            zk.set(path, data)
    return entry


def remove(zk, paths: Paths, tenant: str, app: str) -> bool:
    """Delete the app's routes. False when there were none."""
    try:
        zk.delete(paths.app_route(tenant, app))
        return True
    except NoNodeError:
        return False


def parse(raw: bytes | None) -> dict | None:
    """An entry's JSON, checked; None when it is missing or not an entry."""
    if not raw:
        return None
    try:
        entry = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not (isinstance(entry, dict) and isinstance(entry.get("tenant"), str) and isinstance(entry.get("app"), str)
            and isinstance(entry.get("routes"), dict)):
        return None
    return entry


def read_all(zk, paths: Paths) -> dict[str, dict]:
    """{"<tenant>.<app>": entry} for every readable entry now."""
    out = {}
    try:
        names = zk.get_children(paths.routes)
    except NoNodeError:
        return out
    for name in names:
        try:
            raw, _ = zk.get(f"{paths.routes}/{name}")
        except NoNodeError:
            continue
        entry = parse(raw)
        if entry is not None:
            out[name] = entry
    return out


def entries(key: str, entry: dict) -> dict[str, Entry]:
    """{prefix: Entry} of one parsed entry; prefixes or targets that are not
    valid are left out (and logged)."""
    out = {}
    for prefix, target in entry.get("routes", {}).items():
        try:
            check_prefix(prefix)
            role, service = target["role"], target["service"]
            if not (isinstance(role, str) and role and isinstance(service, str) and service):
                raise BadRoute("role and service must be non-empty strings")
        except (BadRoute, KeyError, TypeError) as exc:
            log.warning("routes %s: %r ignored: %s", key, prefix, exc)
            continue
        out[prefix] = Entry(entry["tenant"], entry["app"], role, service)
    return out


def build(found: Mapping[str, dict]) -> dict[str, Entry]:
    """The routing table {prefix: Entry} of {key: parsed entry}."""
    table: dict[str, Entry] = {}
    owner: dict[str, str] = {}
    for key in sorted(found):
        for prefix, e in entries(key, found[key]).items():
            if not may_route(prefix, e.tenant):
                log.warning("route %s of %s ignored: reserved for the platform", prefix, key)
                continue
            if prefix in table:
                log.warning("route %s is claimed by %s and %s; %s keeps it", prefix, owner[prefix], key, owner[prefix])
                continue
            table[prefix] = e
            owner[prefix] = key
    return table


def match_prefix(table: Mapping[str, Entry], path: str) -> tuple[str, Entry] | None:
    """(prefix, entry) of the longest prefix in `table` that covers `path`,
    or None. Cost: one dict lookup per segment of the path."""
    p = path or "/"
    while True:
        e = table.get(p)
        if e is not None:
            return p, e
        if p == "/":
            return None
        cut = p.rfind("/")
        p = p[:cut] if cut > 0 else "/"


class Children:
    """Calls `func(children)` with the children of `path` now and after every
    change, until close(). A missing node has no children; it is followed
    while it is missing (an exists watch) and again once it is created. After
    a reconnection the children are read again. Calls are serialized, and made
    only when the list changed."""

    def __init__(self, zk, path: str, func: Callable[[list[str]], None]):
        self._zk, self._path, self._func = zk, path, func
        self._lock = threading.Lock()
        self._stopped = False
        self._prior: list[str] | None = None
        zk.add_listener(self._on_state)
        self._fetch()

    def _on_state(self, state) -> None:
        if state == KazooState.CONNECTED and not self._stopped:
            self._zk.handler.spawn(self._fetch)

    def _fetch(self, event=None) -> None:
        with self._lock:
            if self._stopped:
                return
            try:
                try:
                    children = self._zk.get_children(self._path, watch=self._fetch)
                except NoNodeError:
                    if self._zk.exists(self._path, watch=self._fetch) is not None:
                        self._zk.handler.spawn(self._fetch)   # created meanwhile
                        return
                    children = []
            except KazooException as exc:   # no connection: read again once connected
                log.info("children of %s not read now: %r", self._path, exc)
                return
            children = sorted(children)
            if children == self._prior:
                return
            self._prior = children
            try:
                self._func(list(children))
            except Exception:
                log.exception("children watch callback for %s failed", self._path)

    def close(self) -> None:
        with self._lock:
            self._stopped = True
        try:
            self._zk.remove_listener(self._on_state)
        except Exception:
            pass


class RouteTable:
    """The routing table of one cluster, kept current by watches (module doc)."""

    def __init__(self, zk, paths: Paths, on_change: Callable[[dict[str, Entry]], None] | None = None):
        self.zk = zk
        self.paths = paths
        self.table: dict[str, Entry] = {}     # replaced whole, never changed in place
        self._found: dict[str, dict] = {}     # key -> parsed entry
        self._watches: dict[str, object] = {}  # key -> the token of its live data watch
        self._on_change = on_change
        self._lock = threading.RLock()
        self._closed = False
        zk.ensure_path(paths.routes)
        self._children = Children(zk, paths.routes, self._on_children)

    # -- watches ----------------------------------------------------------------------
    def _on_children(self, names: list[str]) -> None:
        with self._lock:
            if self._closed:
                return
            gone = [k for k in self._watches if k not in names]
            for k in gone:
                del self._watches[k]
            new = [(k, object()) for k in names if k not in self._watches]
            for k, token in new:
                self._watches[k] = token
            dropped = [k for k in gone if self._found.pop(k, None) is not None]
            if dropped:
                self._rebuild()
        for k, token in new:
            DataWatch(self.zk, f"{self.paths.routes}/{k}", self._data_func(k, token))

    def _data_func(self, key: str, token):
        def on_data(data, stat):
            with self._lock:
                if self._closed or self._watches.get(key) is not token:
                    return False   # stop this watch: the child went, or a newer watch follows it
                entry = parse(data) if stat is not None else None
                if entry is None and data and stat is not None:
                    log.warning("routes %s: unreadable entry ignored", key)
                before = self._found.get(key)
                if entry is None:
                    self._found.pop(key, None)
                else:
                    self._found[key] = entry
                if before != entry:
                    self._rebuild()
            return None
        return on_data

    def _rebuild(self) -> None:
        """With the lock held: so that callbacks see the tables in order."""
        table = build(self._found)
        if table == self.table:
            return
        self.table = table
        log.info("routes now: %s", ", ".join(f"{p} -> {e.tenant}/{e.app}/{e.role} ({e.service})"
                                              for p, e in sorted(table.items())) or "none")
        if self._on_change is not None:
            try:
                self._on_change(table)
            except Exception:
                log.exception("route table callback failed")

    # -- reading ----------------------------------------------------------------------
    def match(self, path: str) -> tuple[str, Entry] | None:
        return match_prefix(self.table, path)

    def services(self) -> set[str]:
        return {e.service for e in self.table.values()}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._watches.clear()
        self._children.close()
