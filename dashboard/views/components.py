"""The developer's status view: every component of the platform and
whether it is up, from two calls:

    GET {gateway}/health        the gateway itself, and every service it routes
                                to (the registry's instances, healthy or not):
                                the dashboard, the apps' web roles (app.T.A.R)
    GET /api/v1/cluster         the orchestrator (leading or not) and each DB
                                worker (role, state, term, LSN, lag)

    GET /dashboard/components                    the page (admin, developer)
    GET /dashboard/api/components                {"gateway", "cluster", "html"}
A part the platform refuses or cannot answer is shown as such; the page
still answers."""
from __future__ import annotations

from flask import Blueprint, jsonify, render_template

from ..app import api
from ..platform import ApiError
from ..sessions import login_required

bp = Blueprint("components", __name__, url_prefix="/dashboard")
STAFF = ("admin", "developer")


def status() -> dict:
    out: dict = {}
    try:
        out["gateway"] = api("GET", "/health")
    except ApiError as exc:
        out["gateway"] = {"status": "unreachable", "error": exc.message}
    try:
        out["cluster"] = api("GET", "/api/v1/cluster")
    except ApiError as exc:
        if exc.status == 401:
            raise
        out["cluster"] = {"error": exc.message}
    services = []
    for name, s in sorted((out["gateway"].get("upstreams") or {}).items()):
        parts = name.split(".")
        app = {"tenant": parts[1], "app": parts[2], "role": parts[3]} if len(parts) == 4 and parts[0] == "app" else None
        services.append({"name": name, "instances": s.get("instances", 0), "healthy": s.get("healthy", 0),
                         "app": app})
    out["services"] = services
    return out


@bp.get("/components")
@login_required(roles=STAFF)
def index():
    return render_template("components.html", s=status())


@bp.get("/api/components")
@login_required(roles=STAFF)
def status_json():
    s = status()
    return jsonify({"gateway": s["gateway"], "cluster": s["cluster"], "services": s["services"],
                    "html": render_template("_components.html", s=s)})
