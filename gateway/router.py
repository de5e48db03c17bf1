"""Which component answers a path, who may call it, and which tenant's rate it
counts against (shared spec platform.md, "Routes through the gateway";
paas.md, Accounts and Data isolation).

Access (Route.access), checked by `refusal`:
    PUBLIC   anyone, with or without a token
    ADMIN    a token with the role admin
    DB       the admin, or a tenant's owner (the orchestrator keeps it inside
             its tenant, from the identity headers the gateway sets)
    TENANT   /api/v1/tenants/{t}/...: the admin, or the owner of t (role
             tenant, claim tenant == t). /api/v1/tenants and
             /api/v1/tenants/{t} themselves are the admin's alone.
No valid token on a protected route: 401; a valid one without the right: 403.

Route.owner is the tenant whose app serves the route: the built-in services'
prefixes belong to the tenants rideshare and toystore."""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

PUBLIC, ADMIN, DB, TENANT = "public", "admin", "db", "tenant"


@dataclass(frozen=True)
class Route:
    name: str                 # the metrics/log label
    service: str | None       # upstream service in the registry; None: served by the gateway
    access: str = PUBLIC
    owner: str | None = None  # the tenant whose app this is


HEALTH = Route("health", None)
METRICS = Route("metrics", None)
TOKEN = Route("auth", None)
NOT_FOUND = Route("unknown", None)
_ADMIN = Route("admin", "orchestrator", ADMIN)

# (prefix, route): the path equals the prefix or continues with "/".
_PREFIXES = (
    ("/api/v1/users", Route("users", "users", owner="rideshare")),
    ("/api/v1/rides", Route("rides", "rides", owner="rideshare")),
    ("/products", Route("catalog", "catalog", owner="toystore")),
    ("/orders", Route("order", "order", owner="toystore")),
    ("/api/v1/db", Route("admin", "orchestrator", DB)),
    ("/api/v1/crash", _ADMIN),
    ("/api/v1/tenants", Route("tenants", "orchestrator", TENANT)),
    ("/api/v1/developers", Route("developers", "orchestrator", ADMIN)),
)
_EXACT = {
    "/health": HEALTH,
    "/metrics": METRICS,
    "/api/v1/auth/token": TOKEN,
    "/api/v1/worker/list": _ADMIN,
    "/api/v1/cluster": _ADMIN,
    "/api/v1/switchover": _ADMIN,
}


def path_tenant(path: str) -> str | None:
    """t in /api/v1/tenants/{t}/<more>, or None (the path names no route
    inside one tenant: /api/v1/tenants, /api/v1/tenants/{t}, empty segments)."""
    parts = path.split("/")   # ['', 'api', 'v1', 'tenants', t, more...]
    if len(parts) < 6 or parts[:4] != ["", "api", "v1", "tenants"] or not parts[4] or not parts[5]:
        return None
    return unquote(parts[4])


def refusal(route: Route, path: str, claims: dict | None) -> int | None:
    """None when `claims` (a valid token's, or None) may use `route` at
    `path`; else 401 or 403."""
    if route.access == PUBLIC:
        return None
    if claims is None:
        return 401
    role = claims["role"]
    if role == "admin":
        return None
    if role == "tenant":
        if route.access == DB:
            return None
        if route.access == TENANT and path_tenant(path) == claims["tenant"]:
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


def route(path: str) -> Route:
    r = _EXACT.get(path)
    if r is None and path.endswith("/") and len(path) > 1:
        r = _EXACT.get(path.rstrip("/"))
        if r is not None and r.service is None:
            r = None  # the gateway's own routes are exact
    if r is not None:
        return r
    for prefix, r in _PREFIXES:
        if path == prefix or path.startswith(prefix + "/"):
            return r
    return NOT_FOUND
