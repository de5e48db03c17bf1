"""App manifests (paas.md, Apps): parse and validate, pure.

A manifest is a JSON object (or its text; YAML text too when PyYAML is
installed, which it is not in the platform's venv today):

    {"roles": {"<role>": {"kind": "web"|"worker",
                          "command": ["argv", ...],     # and/or
                          "image": "name:tag",
                          "instances": 1,               # 0..quota, default 1
                          "routes": ["/prefix", ...],   # web roles only
                          "health": "/health",          # default /health
                          "env": {"KEY": "value"}}}}

Rules, each refused with ManifestError(400, why): unknown keys; a role name
that is not an identifier (a-z first, then a-z 0-9 -, at most 32: it is
part of queue and instance names, see Names.task_queue); an
unknown kind; instances not an integer in 0..quota; neither command nor
image; routes on a worker role; a route or health path that is not a clean
absolute path ("/" then segments without "", "." or ".."; no trailing "/"
except "/" itself); the same route twice in one app; env keys that are not
shell identifiers or values that are not strings; env keys the platform
sets itself (STRATUS_*, PORT).

Ownership (409): a route prefix owns itself and every path below it
("/shop" covers "/shop" and "/shop/x", not "/shopping"; "/" covers all). A
route is refused when the platform reserves it: everything under /api,
/dashboard, /health and /metrics, by path segment and whatever the case or
encoding, except the built-in apps' documented paths claimed by their own
tenant ("/api/v1/users", "/api/v1/rides" of rideshare), and any route that
covers those paths ("/"); the rule is bus.routing.claim_refusal, which the
gateway applies too. A route also conflicts with a prefix of another app
when either covers the other: `check_routes`. The instance quota counts
every role of every app of a tenant: `check_quota`."""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Mapping

from bus import routing

from . import AppError

try:  # the CLI reads YAML; the platform's venv may not have PyYAML
    import yaml  # type: ignore
except ImportError:  # pragma: no cover - depends on the venv
    yaml = None

KINDS = ("web", "worker")
DEFAULT_HEALTH = "/health"
DEFAULT_QUOTA = 16          # instances per tenant across its apps (paas.md, Quotas)
MAX_ROLES = 32
MAX_TEXT = 64 * 1024        # bytes of manifest text
PLATFORM_ENV = ("PORT",)    # besides every STRATUS_* key

_ROLE_KEYS = {"kind", "command", "image", "instances", "routes", "health", "env"}
_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_APP_RE = re.compile(r"^[a-z][a-z0-9-]{1,31}$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:@%-]+$")


class ManifestError(AppError):
    pass


def _bad(msg: str) -> ManifestError:
    return ManifestError(400, msg)


@dataclasses.dataclass(frozen=True)
class Role:
    name: str
    kind: str
    command: tuple[str, ...] | None
    image: str | None
    instances: int
    routes: tuple[str, ...]
    health: str
    env: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "instances": self.instances}
        if self.command is not None:
            d["command"] = list(self.command)
        if self.image is not None:
            d["image"] = self.image
        if self.kind == "web":
            d["routes"] = list(self.routes)
        d["health"] = self.health
        d["env"] = dict(self.env)
        return d


@dataclasses.dataclass(frozen=True)
class Manifest:
    roles: dict[str, Role]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; parse(m.to_dict()) == m."""
        return {"roles": {name: r.to_dict() for name, r in self.roles.items()}}

    @property
    def instances(self) -> int:
        return sum(r.instances for r in self.roles.values())

    @property
    def routes(self) -> tuple[str, ...]:
        return tuple(p for r in self.roles.values() for p in r.routes)

    def scaled(self, role: str, n: int, *, quota: int = DEFAULT_QUOTA) -> "Manifest":
        """The same manifest with one role's instance count changed (400 on a
        bad count; KeyError for an unknown role)."""
        old = self.roles[role]
        return Manifest({**self.roles, role: dataclasses.replace(old, instances=_instances(role, n, quota))})


def check_app_name(name) -> str:
    """An app name: like a tenant name, 2-32 of a-z 0-9 - starting with a letter."""
    if not isinstance(name, str) or not _APP_RE.fullmatch(name):
        raise _bad("an app name is 2-32 characters of a-z, 0-9 and '-', starting with a letter")
    return name


def check_path(path, what: str) -> str:
    """A clean absolute URL path, as a route prefix or health path."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise _bad(f"{what} must be a string starting with '/', not {path!r}")
    if len(path) > 256:
        raise _bad(f"{what} is longer than 256 characters")
    if path == "/":
        return path
    for seg in path[1:].split("/"):
        if seg in ("", ".", "..") or not _SEGMENT_RE.fullmatch(seg):
            raise _bad(f"{what} {path!r}: each segment after '/' must be non-empty, not '.' or '..', "
                       "without spaces, '?' or '#', and there is no trailing '/'")
    return path


def _instances(role: str, n, quota: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= quota:
        raise _bad(f"role {role!r}: instances must be an integer from 0 to {quota}, not {n!r}")
    return n


def load(data) -> Mapping:
    """The manifest object from a dict, or from JSON (or YAML) text or bytes."""
    if isinstance(data, (bytes, bytearray)):
        if len(data) > MAX_TEXT:
            raise _bad(f"a manifest is at most {MAX_TEXT} bytes")
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise _bad("a manifest is UTF-8 text") from None
    if isinstance(data, str):
        if len(data) > MAX_TEXT:
            raise _bad(f"a manifest is at most {MAX_TEXT} bytes")
        try:
            data = json.loads(data)
        except ValueError as exc:
            if yaml is None:
                raise _bad(f"a manifest is JSON: {exc}") from None
            try:
                data = yaml.safe_load(data)
            except yaml.YAMLError as yexc:
                raise _bad(f"a manifest is JSON or YAML: {yexc}") from None
    if not isinstance(data, Mapping):
        raise _bad("a manifest is an object with \"roles\"")
    return data


def parse(data, *, quota: int = DEFAULT_QUOTA) -> Manifest:
    """A valid Manifest, or ManifestError(400) naming the first broken rule."""
    data = load(data)
    extra = set(data) - {"roles"}
    if extra:
        raise _bad(f"unknown manifest keys: {sorted(map(str, extra))}")
    roles = data.get("roles")
    if not isinstance(roles, Mapping) or not roles:
        raise _bad("\"roles\" must be an object with at least one role")
    if len(roles) > MAX_ROLES:
        raise _bad(f"at most {MAX_ROLES} roles")
    parsed = {name: _role(name, spec, quota) for name, spec in roles.items()}
    seen: dict[str, str] = {}
    for r in parsed.values():
        for p in r.routes:
            if p in seen:
                raise _bad(f"route {p!r} is claimed by both {seen[p]!r} and {r.name!r}")
            seen[p] = r.name
    return Manifest(parsed)


def _role(name, spec, quota: int) -> Role:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise _bad(f"role name {name!r}: 1-32 characters of a-z, 0-9 and '-', starting with a letter")
    if not isinstance(spec, Mapping):
        raise _bad(f"role {name!r} must be an object")
    extra = set(spec) - _ROLE_KEYS
    if extra:
        raise _bad(f"role {name!r}: unknown keys {sorted(map(str, extra))}")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise _bad(f"role {name!r}: kind must be 'web' or 'worker', not {kind!r}")
    command = spec.get("command")
    if command is not None:
        if (not isinstance(command, list) or not command
                or not all(isinstance(a, str) and a and "\x00" not in a for a in command)):
            raise _bad(f"role {name!r}: command must be a non-empty list of non-empty strings")
        command = tuple(command)
    image = spec.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip() or len(image) > 256):
        raise _bad(f"role {name!r}: image must be a non-empty string")
    if command is None and image is None:
        raise _bad(f"role {name!r}: give a command or an image")
    instances = _instances(name, spec.get("instances", 1), quota)
    routes = spec.get("routes", [])
    if kind != "web" and routes:
        raise _bad(f"role {name!r}: only web roles have routes")
    if not isinstance(routes, list):
        raise _bad(f"role {name!r}: routes must be a list of path prefixes")
    routes = tuple(check_path(p, f"role {name!r}: route") for p in routes)
    if len(set(routes)) != len(routes):
        raise _bad(f"role {name!r}: a route is listed twice")
    health = check_path(spec.get("health", DEFAULT_HEALTH), f"role {name!r}: health")
    env = spec.get("env", {})
    if not isinstance(env, Mapping):
        raise _bad(f"role {name!r}: env must be an object of strings")
    for k, v in env.items():
        if not isinstance(k, str) or not _ENV_RE.fullmatch(k):
            raise _bad(f"role {name!r}: env key {k!r} is not a variable name")
        if k.upper().startswith("STRATUS_") or k.upper() in PLATFORM_ENV:
            raise _bad(f"role {name!r}: env key {k!r} is set by the platform")
        if not isinstance(v, str) or "\x00" in v:
            raise _bad(f"role {name!r}: env {k!r} must be a string")
    return Role(name=name, kind=kind, command=command, image=image, instances=instances,
                routes=routes, health=health, env=dict(env))


# --- ownership and quota (409) ---------------------------------------------------
def covers(prefix: str, path: str) -> bool:
    """`prefix` owns `path`: the same path, or a path below it."""
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


def overlaps(a: str, b: str) -> bool:
    return covers(a, b) or covers(b, a)


def check_routes(manifest: Manifest, owned: Mapping[str, tuple[str, str]], tenant: str, app: str) -> None:
    """ManifestError(409) when a route of (tenant, app) is reserved for the
    platform (bus.routing.claim_refusal) or overlaps a prefix that another
    app owns. `owned` maps prefix -> (tenant, app); the app's own earlier
    routes do not count against it."""
    for p in manifest.routes:
        why = routing.claim_refusal(p, tenant)
        if why is not None:
            raise ManifestError(409, why)
        for q, owner in owned.items():
            if tuple(owner) != (tenant, app) and overlaps(p, q):
                raise ManifestError(409, f"route {p!r} overlaps {q!r}, owned by another app")


def check_quota(instances: int, others: int, quota: int = DEFAULT_QUOTA) -> None:
    """ManifestError(409) when an app's `instances` plus the `others` the
    tenant's other apps run exceed the tenant's quota."""
    if instances + others > quota:
        raise ManifestError(409, f"{instances} instances with the tenant's other {others} "
                                 f"would exceed its quota of {quota}")
