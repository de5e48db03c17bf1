"""The charts' data: Prometheus's history, queried server side
(metrics_queries.py), so the browser talks to the dashboard alone.

    GET /dashboard/api/charts/<chart>?tenant=T&app=A
        chart: requests, errors, p50, p99 (a tenant's routes: tenant required
               for a tenant's owner, who may name only its own tenant; the
               admin and developers may name any, or none for every tenant);
               db_reads, db_writes, db_lag, db_elections (the admin and
               developers)
        200 metrics_queries.series(...) (empty "series": no data in the last hour)
        400 unknown chart or bad names; 403 another tenant's or the cluster's
        charts for a tenant; 503 {"error"} Prometheus unreachable or refusing.
Prometheus is read with no token: these scope rules are what keep one
tenant's traffic from another's eyes, the same as the platform's own
(a tenant reads only /api/v1/tenants/<itself>/...)."""
from __future__ import annotations

import re

from flask import Blueprint, abort, current_app, g, jsonify, request

from ..metrics_queries import CHARTS, MetricsUnavailable, series
from ..sessions import login_required

bp = Blueprint("charts", __name__, url_prefix="/dashboard")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@bp.get("/api/charts/<key>")
@login_required
def chart(key: str):
    c = CHARTS.get(key)
    if c is None:
        abort(400, description=f"no chart {key[:40]!r}: one of {', '.join(CHARTS)}")
    tenant = request.args.get("tenant") or None
    app = request.args.get("app") or None
    for v in (tenant, app):
        if v is not None and not _NAME.match(v):
            abort(400, description="tenant and app are names: letters, digits, '.', '_' and '-'")
    role = g.user["role"]
    if role == "tenant":
        if c.scope != "routes":
            abort(403, description="the DB cluster's charts are for the admin and developers")
        if tenant != g.user.get("tenant"):
            abort(403, description="a tenant sees its own charts only")
    elif role not in ("admin", "developer"):
        abort(403, description=f"no charts for the role {role}")
    settings = current_app.config["STRATUS_SETTINGS"]
    try:
        data = series(current_app.extensions["stratus_prometheus"], key, settings.cluster, tenant=tenant, app=app)
    except MetricsUnavailable as exc:
        return jsonify({"error": str(exc), "chart": key, "title": c.title, "unit": c.unit}), 503
    return jsonify(data)
