"""The dashboard's Flask app factory (see dashboard/__init__.py for the
whole contract). Every page is under /dashboard, since the gateway forwards
the path unchanged; /health (for the registry's health checks) is at the root.

    create_app(settings=None, *, platform=None, prometheus=None) -> Flask

`platform` (a dashboard.platform.Platform) defaults to the gateway at
settings.gateway_base_url(), `prometheus` (metrics_queries.Prometheus) to
settings.prometheus_url. One blueprint per view (dashboard/views/).

Answers: pages are HTML; /dashboard/api/... are JSON, errors included
({"error": "..."} with the status). Every answer says Cache-Control:
no-store (pages hold the user's data), except the static files; and a
Content-Security-Policy allowing nothing but the dashboard's own scripts,
styles, images and fetches: no page loads anything from outside the
platform."""
from __future__ import annotations

import datetime as dt
import itertools
import logging

from flask import Blueprint, Flask, g, jsonify, make_response, redirect, render_template, request, url_for
from werkzeug.exceptions import HTTPException

from bus.service import allow_large_bodies, base_app
from bus.settings import Settings, load

from . import sessions
from .metrics_queries import CHARTS, CLUSTER_CHARTS, ROUTE_CHARTS, Prometheus
from .platform import ApiError, Platform

log = logging.getLogger("stratus.dashboard")

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
UPLOAD_LIMIT = 51 * 1024 * 1024 + 256 * 1024   # a 50 MiB package, its manifest and the form around them
REFRESH_MS = 3000                              # live parts poll their JSON every 3 s


def api(method: str, path: str, **kw):
    """A platform API call as the signed-in user (g.user), with a request
    id derived from this page's."""
    from flask import current_app
    n = next(g.setdefault("api_calls", itertools.count(1)))
    rid = f"{g.get('request_id', 'dash')}.{n}"[:128]
    return current_app.extensions["stratus_platform"].call(method, path, token=g.user["token"], request_id=rid, **kw)


def _fmt_time(value, with_date: bool = True) -> str:
    try:
        t = dt.datetime.fromtimestamp(float(value), dt.timezone.utc)
    except (TypeError, ValueError, OverflowError, OSError):
        return "" if value is None else str(value)
    return t.strftime("%Y-%m-%d %H:%M:%S" if with_date else "%H:%M:%S")


def create_app(settings: Settings | None = None, *, platform: Platform | None = None,
               prometheus: Prometheus | None = None) -> Flask:
    settings = settings or load()
    app = base_app("dashboard")
    app.config["STRATUS_SETTINGS"] = settings
    app.extensions["stratus_platform"] = platform or Platform(settings.gateway_base_url())
    app.extensions["stratus_prometheus"] = prometheus or Prometheus(settings.prometheus_url)
    sessions.configure(app, sessions.secret_from(settings))
    app.jinja_env.filters["ts"] = _fmt_time
    app.jinja_env.filters["hms"] = lambda v: _fmt_time(v, with_date=False)

    assets = Blueprint("assets", __name__, static_folder="static", static_url_path="/static", url_prefix="/dashboard")
    app.register_blueprint(assets)

    from .views import auth, charts, cluster, components, home, logs, tenant, tenants
    for bp in (auth.bp, home.bp, tenant.bp, logs.bp, components.bp, cluster.bp, tenants.bp, charts.bp):
        app.register_blueprint(bp)
    allow_large_bodies(app, "tenant.deploy", UPLOAD_LIMIT)

    @app.before_request
    def _csrf():
        if request.method == "POST" and request.path.startswith("/dashboard"):
            sessions.check_csrf()

    @app.context_processor
    def _context():
        return {"me": sessions.user(), "csrf_token": sessions.csrf_token, "refresh_ms": REFRESH_MS,
                "cluster_name": settings.cluster, "route_charts": ROUTE_CHARTS, "cluster_charts": CLUSTER_CHARTS,
                "chart_titles": {k: f"{c.title} ({c.unit})" for k, c in CHARTS.items()}}

    @app.after_request
    def _headers(resp):
        if request.endpoint == "assets.static":
            resp.headers["Cache-Control"] = "public, max-age=3600"
        else:
            resp.headers["Cache-Control"] = "no-store"
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["Referrer-Policy"] = "same-origin"
        return resp

    def error_page(status: int, message: str):
        if sessions.wants_json() or not request.path.startswith("/dashboard"):
            resp = jsonify({"error": message})
        else:
            resp = make_response(render_template("error.html", status=status, message=message))
        resp.status_code = status
        return resp

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        messages = {404: "not found", 405: "method not allowed",
                    413: "the upload is larger than the dashboard takes (a package is at most 50 MiB)"}
        msg = exc.description if exc.code in (400, 401, 403) and exc.description else \
            messages.get(exc.code, exc.description or exc.name)
        resp = error_page(exc.code or 500, msg)
        if exc.code == 405 and getattr(exc, "valid_methods", None):
            resp.headers["Allow"] = ", ".join(exc.valid_methods)
        return resp

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        if exc.status == 401:
            # The token expired or is no longer valid: the user signs in again.
            sessions.sign_out()
            if sessions.wants_json():
                return jsonify({"error": "the session has expired: sign in again"}), 401
            return redirect(url_for("auth.login", next=request.full_path.rstrip("?"), expired=1))
        if exc.status is None:
            return error_page(502, f"the platform could not be reached: {exc.message}")
        if exc.status in (403, 404, 409, 400, 413, 429, 503):
            return error_page(exc.status, exc.message)
        return error_page(502, f"the platform answered {exc.status}: {exc.message}")

    return app
