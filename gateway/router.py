"""Which component answers a path, who may call it, and which tenant's rate it
counts against (shared spec platform.md, "Routes through the gateway";
paas.md, Words, Accounts, Apps and Data isolation).

Resolution, in this order (`route`):
  1. the platform's own routes, built in: exact paths (/health, /metrics,
     /api/v1/auth/token, /api/v1/openapi.json, /api/v1/worker/list,
     /api/v1/cluster, /api/v1/switchover) and prefixes (/api/v1/db,
     /api/v1/crash, /api/v1/tenants, /api/v1/developers, /api/v1/logs, and
     /dashboard: the registry's service "dashboard", public, since the
     dashboard signs its users in itself and calls the API with their tokens);
  2. any other path the platform reserves (paas.md, Apps: everything under
     /api, /dashboard, /health and /metrics, by segment, whatever its case
     or percent-encoding: bus.routing.reserved) is not found, unless it is
     under a built-in app's documented path claimed by its own tenant
     (bus.routing.builtin_claim: /api/v1/users, /api/v1/rides of rideshare):
     no other app route, not even "/", ever takes it;
  3. the apps' routes (bus.routing.RouteTable, from ZooKeeper): the longest
     prefix that covers the path; the Route is named after the web role,
     goes to the role's registry service, is public, and belongs to the
     app's tenant (Route.owner, for the rate limit);
  4. otherwise not found (the gateway answers 404 with a JSON error).
A prefix covers the path equal to it and the paths that continue it with "/".

Access (Route.access), checked by `refusal`:
    PUBLIC   anyone, with or without a token
    ADMIN    a token with the role admin
    DB       the admin, or a tenant's owner (the orchestrator keeps it inside
             its tenant, from the identity headers the gateway sets)
    TENANT   /api/v1/tenants/{t}/...: the admin, or the owner of t (role
             tenant, claim tenant == t). /api/v1/tenants and
             /api/v1/tenants/{t} themselves are the admin's alone.
    LOGS     /api/v1/logs: the admin, a developer, or a tenant's owner (the
             orchestrator keeps an owner to its own instances' logs, from the
             identity headers)
The developer "reads the status, events and logs of every component; changes
nothing": besides LOGS, a developer token may GET or HEAD
/api/v1/tenants/{t}/apps..., /api/v1/tenants/{t}/events, /api/v1/cluster and
/api/v1/worker/list (Route.dev_read); any other method there is 403.
No valid token on a protected route: 401; a valid one without the right: 403."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import unquote

from bus import routing

PUBLIC, ADMIN, DB, TENANT, LOGS = "public", "admin", "db", "tenant", "logs"
READ_METHODS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True)
class Route:
    name: str                 # the metrics/log label
    service: str | None       # upstream service in the registry; None: served by the gateway
    access: str = PUBLIC
    owner: str | None = None  # the tenant whose app this is
    app: str | None = None    # set for an app's web role: affinity applies
    dev_read: bool = False    # a developer may GET/HEAD it (ADMIN routes)


HEALTH = Route("health", None)
METRICS = Route("metrics", None)
TOKEN = Route("auth", None)
NOT_FOUND = Route("unknown", None)
_ADMIN = Route("admin", "orchestrator", ADMIN)
_STATUS = Route("admin", "orchestrator", ADMIN, dev_read=True)
DASHBOARD_SERVICE = "dashboard"   # the registry service of the dashboard (python -m dashboard)
DASHBOARD = Route("dashboard", DASHBOARD_SERVICE)

# (prefix, route): the path equals the prefix or continues with "/".
_PREFIXES = (
    ("/api/v1/db", Route("admin", "orchestrator", DB)),
    ("/api/v1/crash", _ADMIN),
    ("/api/v1/tenants", Route("tenants", "orchestrator", TENANT)),
    ("/api/v1/developers", Route("developers", "orchestrator", ADMIN)),
    ("/api/v1/logs", Route("logs", "orchestrator", LOGS)),
    ("/dashboard", DASHBOARD),
)
_EXACT = {
    "/health": HEALTH,
    "/metrics": METRICS,
    "/api/v1/auth/token": TOKEN,
    "/api/v1/openapi.json": Route("openapi", "orchestrator"),
    "/api/v1/worker/list": _STATUS,
    "/api/v1/cluster": _STATUS,
    "/api/v1/switchover": _ADMIN,
}


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def path_tenant(path: str) -> str | None:
    """t in /api/v1/tenants/{t}/<more>, or None (the path names no route
    inside one tenant: /api/v1/tenants, /api/v1/tenants/{t}, empty segments)."""
    parts = path.split("/")   # ['', 'api', 'v1', 'tenants', t, more...]
    if len(parts) < 6 or parts[:4] != ["", "api", "v1", "tenants"] or not parts[4] or not parts[5]:
        return None
    return unquote(parts[4])


def developer_reads(path: str) -> bool:
    """/api/v1/tenants/{t}/apps, /api/v1/tenants/{t}/apps/..., /api/v1/tenants/{t}/events:
    what a developer may read under /api/v1/tenants."""
    if path_tenant(path) is None:
        return False
    rest = path.split("/")[5:]          # after /api/v1/tenants/{t}
    if len(rest) > 1 and rest[-1] == "":
        rest = rest[:-1]                # a trailing "/"
    if rest[0] == "apps":
        return all(rest)                # no empty segment inside
    return rest == ["events"]


def refusal(route: Route, path: str, claims: dict | None, method: str = "GET") -> int | None:
    """None when `claims` (a valid token's, or None) may use `route` at
    `path` with `method`; else 401 or 403."""
    if route.access == PUBLIC:
        return None
    if claims is None:
        return 401
    role = claims["role"]
    if role == "admin":
        return None
    if role == "tenant":
        if route.access in (DB, LOGS):
            return None
        if route.access == TENANT and path_tenant(path) == claims["tenant"]:
            return None
    elif role == "developer":
        if route.access == LOGS:
            return None if method in READ_METHODS else 403
        if method in READ_METHODS and (route.dev_read or (route.access == TENANT and developer_reads(path))):
            return None
    return 403


class BadPath(ValueError):
    pass


def check_path(path: str) -> None:
    """Refuse dot segments (raw or percent-encoded) and encoded slashes, so a
    path cannot step from a public prefix into an admin one."""
    decoded = unquote(path)
    if "%2f" in path.lower() or "\\" in decoded or "\x00" in decoded:
        raise BadPath("encoded slashes are not accepted in paths")
    for seg in decoded.split("/"):
        if seg in (".", ".."):
            raise BadPath("dot segments are not accepted in paths")


@lru_cache(maxsize=4096)
def app_route(entry) -> Route:
    """The Route of an app's web role (a bus.routing.Entry)."""
    return Route(entry.role, entry.service, PUBLIC, owner=entry.tenant, app=entry.app)


def route(path: str, table=None) -> Route:
    """The Route for `path`; `table` (a bus.routing.RouteTable, or anything
    with its `match`) holds the apps' routes."""
    r = _EXACT.get(path)
    if r is None and path.endswith("/") and len(path) > 1:
        r = _EXACT.get(path.rstrip("/"))
        if r is not None and r.service is None:
            r = None  # the gateway's own routes are exact
    if r is not None:
        return r
    for prefix, r in _PREFIXES:
        if _under(path, prefix):
            return r
    if routing.reserved(path):   # the platform's: only a built-in app's own claim may take it
        found = table.match(path) if table is not None else None
        if found is not None and routing.builtin_claim(found[0], found[1].tenant):
            return app_route(found[1])
        return NOT_FOUND
    if table is not None:
        found = table.match(path)
        if found is not None:
            return app_route(found[1])
    return NOT_FOUND


def is_package_upload(path: str) -> bool:
    """PUT /api/v1/tenants/{t}/apps/{a}/package: the one route whose body may
    be larger than the gateway's usual limit."""
    parts = path.split("/")
    return (len(parts) == 8 and parts[:4] == ["", "api", "v1", "tenants"] and parts[5] == "apps"
            and parts[7] == "package" and all(parts[4:7]))


def is_dashboard_deploy(path: str) -> bool:
    """POST /dashboard/tenants/{t}/deploy: the dashboard's deploy form, which
    carries a package as large as the package route takes."""
    parts = path.split("/")
    return len(parts) == 5 and parts[:3] == ["", "dashboard", "tenants"] and parts[4] == "deploy" and bool(parts[3])
