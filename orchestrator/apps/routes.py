"""The apps routes of paas.md (Apps), on the orchestrator's API:

    PUT    /api/v1/tenants/{t}/apps/{a}/package    .tar.gz body -> 201 {"digest"}
    PUT    /api/v1/tenants/{t}/apps/{a}            manifest -> 201 new / 200 changed, the app view
    GET    /api/v1/tenants/{t}/apps                [app view]
    GET    /api/v1/tenants/{t}/apps/{a}            app view
    PATCH  /api/v1/tenants/{t}/apps/{a}/roles/{r}  {"instances": n} -> 200 app view
    POST   /api/v1/tenants/{t}/apps/{a}/restart    202 {"restart": n}
    DELETE /api/v1/tenants/{t}/apps/{a}            200 {}: routes gone, instances stopped
    GET    /api/v1/tenants/{t}/events?since=N      {"events": [...], "next": n}

Who: the admin; the tenant's owner (X-Stratus-Tenant == t); a developer may
read (GET) but changes nothing; anyone else 403. An unknown tenant is 404.

The manifest PUT deploys the package uploaded last for that app (or the one
named by `?digest=sha256:...`); a manifest whose roles all name an `image`
needs none. The app view:

    {"tenant", "name", "generation", "digest", "restart",
     "roles": {role: {"kind", "desired", "running", "routes",
                      "instances": [{"id", "host", "port", "pid", "state",
                                     "restarts", "started"}]}},
     "limits": {"memory_mb", "cpus", "pids", "disk_mb", "log_mb"}}

`limits` is what each instance may use (orchestrator/runtimes/limits.py).

`running` counts instances in state `running`; the instances are what the
leading orchestrator's controller last published (controller.py)."""
from __future__ import annotations

import logging
import time
from typing import Callable

from flask import Flask, jsonify, request

from bus import routing
from bus.service import allow_large_bodies

from orchestrator.runtimes.limits import Limits

from . import AppError
from .desired import App, Desired, NotFound
from .events import Events
from .manifest import DEFAULT_QUOTA, load as load_manifest, parse
from .packages import LIMIT, PackageError, Packages

log = logging.getLogger("stratus.orchestrator.apps")

INSTANCE_LIMITS = Limits.from_env()   # what every instance may use (settings; read at start)

DELETE_WAIT = 10.0   # seconds DELETE waits for the instances to stop


def view(app: App, observed: dict[str, list[dict]]) -> dict:
    roles = {}
    for name, role in app.manifest.roles.items():
        insts = [{k: i.get(k) for k in ("id", "host", "port", "pid", "state", "restarts", "started")}
                 for i in observed.get(name, [])]
        roles[name] = {"kind": role.kind, "desired": role.instances,
                       "running": sum(1 for i in insts if i["state"] == "running"),
                       "routes": list(role.routes), "instances": insts}
    return {"tenant": app.tenant, "name": app.name, "generation": app.generation, "digest": app.digest,
            "restart": app.restart, "roles": roles, "limits": INSTANCE_LIMITS.to_dict()}


class AppsApi:
    """What the routes act on; `apps_controller()` gives the AppController
    (to wake it and read what it published), `known(t)` whether a tenant exists."""

    def __init__(self, desired: Desired, events: Events, packages: Packages, apps_controller: Callable,
                 known: Callable[[str], bool], zk, paths, quota: int = DEFAULT_QUOTA):
        self.desired = desired
        self.events = events
        self.packages = packages
        self.apps_controller = apps_controller
        self.known = known
        self.zk = zk
        self.paths = paths
        self.quota = quota

    def latest_file(self, tenant: str, app: str):
        return self.packages.dir(tenant, app) / "latest"

    def observed(self, tenant: str, app: str) -> dict:
        from bus import zk as bzk
        rec = bzk.get_json(self.zk, self.paths.app_instances(tenant, app)) or {}
        return rec.get("roles") or {}

    def wake(self) -> None:
        c = self.apps_controller()
        if c is not None:
            c.wake()


def register(app: Flask, api_of: Callable[[], AppsApi], identity: Callable, refused: type) -> None:
    """Add the routes to the orchestrator's Flask app. `api_of()` gives the
    AppsApi (503 while the orchestrator starts); `identity()` who asks;
    `refused(status, message)` the exception the app turns into an error."""

    def allow(tenant: str, *, write: bool) -> AppsApi:
        ident = identity()
        if ident.role == "admin":
            pass
        elif ident.role == "tenant" and ident.tenant == tenant:
            pass
        elif ident.role == "developer" and not write:
            pass
        else:
            raise refused(403, f"this route is for the admin and the owner of tenant {tenant[:64]!r}")
        api = api_of()
        if not api.known(tenant):
            raise refused(404, f"no such tenant: {tenant[:64]!r}")
        return api

    @app.errorhandler(AppError)
    def _app_error(exc: AppError):
        return jsonify({"error": exc.message}), exc.status

    @app.put("/api/v1/tenants/<tenant>/apps/<name>/package")
    def app_package(tenant: str, name: str):
        api = allow(tenant, write=True)
        try:
            digest = api.packages.store(tenant, name, request.stream, length=request.content_length)
        except PackageError:
            raise
        latest = api.latest_file(tenant, name)
        tmp = latest.with_suffix(".tmp")
        tmp.write_text(digest)
        tmp.replace(latest)
        log.info("package %s stored for %s/%s", digest, tenant, name)
        return jsonify({"digest": digest}), 201

    allow_large_bodies(app, "app_package", LIMIT)

    @app.put("/api/v1/tenants/<tenant>/apps/<name>")
    def app_deploy(tenant: str, name: str):
        api = allow(tenant, write=True)
        raw = request.get_data(cache=False)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise AppError(400, "the manifest is not UTF-8 text") from None
        if not text.strip():
            raise AppError(400, "the body must be the app's manifest (JSON)")
        manifest = parse(load_manifest(text), quota=api.quota)
        digest = request.args.get("digest")
        if digest is None:
            try:
                digest = api.latest_file(tenant, name).read_text().strip() or None
            except FileNotFoundError:
                digest = None
        if digest is not None and not api.packages.exists(tenant, name, digest):
            raise AppError(400, f"no package {digest} uploaded for {tenant}/{name}")
        if digest is None and any(r.image is None for r in manifest.roles.values()):
            raise AppError(400, f"no package uploaded for {tenant}/{name}: PUT "
                                f"/api/v1/tenants/{tenant}/apps/{name}/package first")
        try:
            new, created = api.desired.put(tenant, name, manifest, digest)
        except AppError as exc:
            if exc.status == 409 and "quota" in exc.message:
                api.events.add(tenant, "quota_refused", app=name, why=exc.message[:200])
            raise
        api.events.add(tenant, "deployed" if created else "changed", app=name, generation=new.generation,
                       digest=digest, instances=manifest.instances)
        api.wake()
        return jsonify(view(new, api.observed(tenant, name))), 201 if created else 200

    @app.get("/api/v1/tenants/<tenant>/apps")
    def app_list(tenant: str):
        api = allow(tenant, write=False)
        return jsonify([view(a, api.observed(tenant, a.name)) for a in api.desired.list(tenant)])

    @app.get("/api/v1/tenants/<tenant>/apps/<name>")
    def app_get(tenant: str, name: str):
        api = allow(tenant, write=False)
        a = api.desired.get(tenant, name)
        if a is None:
            raise NotFound(f"no app {tenant}/{name}")
        return jsonify(view(a, api.observed(tenant, name)))

    @app.patch("/api/v1/tenants/<tenant>/apps/<name>/roles/<role>")
    def app_scale(tenant: str, name: str, role: str):
        api = allow(tenant, write=True)
        body = request.get_json(force=True, silent=True)
        if not isinstance(body, dict) or set(body) != {"instances"}:
            raise AppError(400, 'the body must be {"instances": <count>}')
        n = body["instances"]
        if isinstance(n, bool) or not isinstance(n, int):
            raise AppError(400, "instances must be an integer")
        try:
            new = api.desired.set_instances(tenant, name, role, n)
        except AppError as exc:
            if exc.status == 409:
                api.events.add(tenant, "quota_refused", app=name, role=role, instances=n, why=exc.message[:200])
            raise
        api.events.add(tenant, "scaled", app=name, role=role, instances=n)
        api.wake()
        return jsonify(view(new, api.observed(tenant, name)))

    @app.post("/api/v1/tenants/<tenant>/apps/<name>/restart")
    def app_restart(tenant: str, name: str):
        api = allow(tenant, write=True)
        new = api.desired.restart(tenant, name)
        api.events.add(tenant, "restart_requested", app=name, restart=new.restart)
        api.wake()
        return jsonify({"tenant": tenant, "name": name, "restart": new.restart}), 202

    @app.delete("/api/v1/tenants/<tenant>/apps/<name>")
    def app_delete(tenant: str, name: str):
        api = allow(tenant, write=True)
        delete_app(api, tenant, name)
        return jsonify({})

    @app.get("/api/v1/tenants/<tenant>/events")
    def tenant_events(tenant: str):
        api = allow(tenant, write=False)
        since = request.args.get("since", "0")
        try:
            after = int(since)
        except ValueError:
            raise AppError(400, "since must be an integer (an event's seq)") from None
        return jsonify(api.events.since(tenant, after))


def delete_app(api: AppsApi, tenant: str, name: str, *, wait: float = DELETE_WAIT) -> None:
    """Routes first (404 from now on), then the desired state; then wait
    (bounded) for the controller to stop the instances."""
    if api.desired.get(tenant, name) is None:
        raise NotFound(f"no app {tenant}/{name}")
    routing.remove(api.zk, api.paths, tenant, name)
    api.desired.delete(tenant, name)
    api.events.add(tenant, "deleted", app=name)
    api.wake()
    deadline = time.monotonic() + wait
    c = api.apps_controller()
    while time.monotonic() < deadline:
        local = c is not None and c.active and c.has_instances(tenant, name)
        if not local and not api.zk.exists(api.paths.app_instances(tenant, name)):
            break
        time.sleep(0.1)
    api.packages.delete(tenant, name)
