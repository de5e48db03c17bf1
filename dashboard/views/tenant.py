"""A tenant's view: its apps, roles and instances with their health, its
events, and the forms that scale a role, restart an app and deploy one.
The admin sees every tenant's, a developer reads them (the platform refuses
a developer's changes); a tenant's owner sees only its own: every call goes
with the user's token, so another tenant's page is the platform's 403 and
no data.

Pages (HTML, the live parts refreshed from the JSON below):
    GET  /dashboard/tenants/<t>/                    apps, events, charts
    GET  /dashboard/tenants/<t>/apps/<a>            roles, instances, scale/restart forms, charts, events
    POST /dashboard/tenants/<t>/apps/<a>/roles/<r>/scale   instances=N  -> PATCH .../roles/<r>
    POST /dashboard/tenants/<t>/apps/<a>/restart              -> POST .../restart
    GET  /dashboard/tenants/<t>/deploy              the deploy form
    POST /dashboard/tenants/<t>/deploy              app, package (.tar.gz), manifest (file or text)
                                                    -> PUT .../package, then PUT .../apps/<a>?digest=
                                                    (no package: the manifest alone, on the
                                                    package uploaded last; the platform says
                                                    400 when there is none)
JSON (each with "html", the rendered fragment the page shows):
    GET /dashboard/api/tenants/<t>/apps             {"apps": [app view...], "html"}
    GET /dashboard/api/tenants/<t>/apps/<a>         {"app": app view, "html"}
    GET /dashboard/api/tenants/<t>/events[?app=A]   {"events": [newest first, at most EVENTS], "html"}
A form's outcome is shown on the page it leads back to; a refused action
(400, 409: the quota, ...) says the platform's reason and changes nothing."""
from __future__ import annotations

import json
import os
from urllib.parse import quote

import yaml
from flask import Blueprint, abort, flash, g, jsonify, redirect, render_template, request, url_for

from ..app import api
from ..platform import UPLOAD_TIMEOUT, ApiError
from ..sessions import login_required

bp = Blueprint("tenant", __name__, url_prefix="/dashboard")
EVENTS = 50
MAX_INSTANCES = 1000
MAX_MANIFEST = 256 * 1024


def _p(*parts: str) -> str:
    return "/".join(quote(p, safe="") for p in parts)


def apps_of(tenant: str) -> list[dict]:
    return api("GET", f"/api/v1/tenants/{_p(tenant)}/apps") or []


def app_of(tenant: str, app: str) -> dict:
    return api("GET", f"/api/v1/tenants/{_p(tenant, 'apps', app)}")


def events_of(tenant: str, app: str | None = None) -> list[dict]:
    body = api("GET", f"/api/v1/tenants/{_p(tenant)}/events", query={"since": 0}) or {}
    events = body.get("events", []) if isinstance(body, dict) else []
    if app:
        events = [e for e in events if e.get("app") == app]
    return list(reversed(events[-EVENTS:]))


def health(view: dict) -> str:
    """ok: every role runs its desired count; degraded otherwise."""
    for r in view.get("roles", {}).values():
        if r.get("running", 0) < r.get("desired", 0) or any(i.get("state") != "running" for i in r.get("instances", [])):
            return "degraded"
    return "ok"


# --- pages ---------------------------------------------------------------------------------
@bp.get("/tenants/<tenant>/")
@login_required
def overview(tenant: str):
    apps = apps_of(tenant)
    events = events_of(tenant)
    return render_template("tenant.html", tenant=tenant, apps=apps, events=events, health=health)


@bp.get("/tenants/<tenant>/apps/<app>")
@login_required
def app_page(tenant: str, app: str):
    view = app_of(tenant, app)
    events = events_of(tenant, app)
    return render_template("app.html", tenant=tenant, app=view, events=events, health=health)


@bp.post("/tenants/<tenant>/apps/<app>/roles/<role>/scale")
@login_required
def scale(tenant: str, app: str, role: str):
    raw = request.form.get("instances", "").strip()
    try:
        n = int(raw)
    except ValueError:
        n = None
    back = url_for("tenant.app_page", tenant=tenant, app=app)
    if n is None or not 0 <= n <= MAX_INSTANCES:
        flash(f"Instances must be a whole number from 0 (got {raw[:20]!r}).", "error")
        return redirect(back, 303)
    try:
        api("PATCH", f"/api/v1/tenants/{_p(tenant, 'apps', app, 'roles', role)}", json_body={"instances": n})
    except ApiError as exc:
        if exc.status in (400, 409):
            flash(f"Not scaled: {exc.message}", "error")
            return redirect(back, 303)
        raise
    flash(f"Scaling {role} to {n} instance{'s' if n != 1 else ''}.", "ok")
    return redirect(back, 303)


@bp.post("/tenants/<tenant>/apps/<app>/restart")
@login_required
def restart(tenant: str, app: str):
    body = api("POST", f"/api/v1/tenants/{_p(tenant, 'apps', app)}/restart")
    flash(f"Rolling restart {body.get('restart', '') if isinstance(body, dict) else ''} of {app} started.", "ok")
    return redirect(url_for("tenant.app_page", tenant=tenant, app=app), 303)


@bp.get("/tenants/<tenant>/deploy")
@login_required
def deploy_form(tenant: str):
    return render_template("deploy.html", tenant=tenant, app_name=request.args.get("app", ""))


def _manifest_text() -> str | None:
    f = request.files.get("manifest")
    if f is not None and f.filename:
        data = f.stream.read(MAX_MANIFEST + 1)
        if len(data) > MAX_MANIFEST:
            abort(413)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return None
    text = request.form.get("manifest_text", "")
    return text if text.strip() else None


@bp.post("/tenants/<tenant>/deploy")
@login_required
def deploy(tenant: str):
    name = request.form.get("app", "").strip()
    package = request.files.get("package")
    manifest = _manifest_text()
    problems = []
    if not name:
        problems.append("Name the app.")
    if manifest is None:
        problems.append("Give the manifest (a JSON or YAML file, or its text).")
    if package is None or not package.filename:
        package = None     # the manifest alone: the platform deploys the package uploaded last
    if problems:
        return render_template("deploy.html", tenant=tenant, app_name=name, errors=problems,
                               manifest_text=manifest or ""), 400
    try:
        parsed = yaml.safe_load(manifest)
    except yaml.YAMLError as exc:
        return render_template("deploy.html", tenant=tenant, app_name=name, manifest_text=manifest,
                               errors=[f"The manifest is neither JSON nor YAML: {str(exc)[:300]}"]), 400
    if not isinstance(parsed, dict):
        return render_template("deploy.html", tenant=tenant, app_name=name, manifest_text=manifest,
                               errors=["The manifest must be a mapping with \"roles\"."]), 400
    try:
        query = None
        if package is not None:
            stream = package.stream
            stream.seek(0, os.SEEK_END)
            length = stream.tell()
            stream.seek(0)
            stored = api("PUT", f"/api/v1/tenants/{_p(tenant, 'apps', name)}/package", body=stream, length=length,
                         content_type="application/gzip", timeout=UPLOAD_TIMEOUT)
            query = {"digest": stored.get("digest")} if isinstance(stored, dict) else None
        view = api("PUT", f"/api/v1/tenants/{_p(tenant, 'apps', name)}", json_body=parsed, query=query)
    except ApiError as exc:
        if exc.status in (400, 409, 413):
            return render_template("deploy.html", tenant=tenant, app_name=name, manifest_text=manifest,
                                   errors=[f"Not deployed: {exc.message}"]), exc.status
        raise
    flash(f"Deployed {name}: generation {view.get('generation')}.", "ok")
    return redirect(url_for("tenant.app_page", tenant=tenant, app=name), 303)


# --- JSON for the live parts -----------------------------------------------------------------
@bp.get("/api/tenants/<tenant>/apps")
@login_required
def apps_json(tenant: str):
    apps = apps_of(tenant)
    html = render_template("_apps.html", tenant=tenant, apps=apps, health=health)
    return jsonify({"apps": apps, "html": html})


@bp.get("/api/tenants/<tenant>/apps/<app>")
@login_required
def app_json(tenant: str, app: str):
    view = app_of(tenant, app)
    html = render_template("_roles.html", tenant=tenant, app=view, health=health)
    return jsonify({"app": view, "html": html})


@bp.get("/api/tenants/<tenant>/events")
@login_required
def events_json(tenant: str):
    app = request.args.get("app") or None
    events = events_of(tenant, app)
    return jsonify({"events": events, "html": render_template("_events.html", events=events, show_app=app is None)})


def event_details(e: dict) -> str:
    skip = {"seq", "time", "type", "app"}
    return ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in e.items() if k not in skip)


@bp.app_template_filter("event_details")
def _event_details(e: dict) -> str:
    return event_details(e)
