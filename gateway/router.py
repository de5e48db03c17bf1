"""Which component answers a path (shared spec platform.md, "Routes through
the gateway")."""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote


@dataclass(frozen=True)
class Route:
    name: str                 # the metrics/log label
    service: str | None       # upstream service in the registry; None: served by the gateway
    admin: bool = False       # needs a token with the admin role


HEALTH = Route("health", None)
METRICS = Route("metrics", None)
TOKEN = Route("auth", None)
NOT_FOUND = Route("unknown", None)

# (prefix, route): the path equals the prefix or continues with "/".
_PREFIXES = (
    ("/api/v1/users", Route("users", "users")),
    ("/api/v1/rides", Route("rides", "rides")),
    ("/products", Route("catalog", "catalog")),
    ("/orders", Route("order", "order")),
    ("/api/v1/db", Route("admin", "orchestrator", admin=True)),
    ("/api/v1/crash", Route("admin", "orchestrator", admin=True)),
)
_EXACT = {
    "/health": HEALTH,
    "/metrics": METRICS,
    "/api/v1/auth/token": TOKEN,
    "/api/v1/worker/list": Route("admin", "orchestrator", admin=True),
    "/api/v1/cluster": Route("admin", "orchestrator", admin=True),
    "/api/v1/switchover": Route("admin", "orchestrator", admin=True),
}


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
