"""The logs view: the platform's log lines (GET /api/v1/logs), searchable,
with a filter by request id that follows one request from the gateway to
the service and the DB worker.

    GET /dashboard/logs?component=C&q=TEXT&request_id=ID&minutes=M&limit=N   the page
    GET /dashboard/api/logs?... (the same)       {"lines": [...], "html"}

component   gateway, orchestrator, a worker id, TENANT[/APP[/INSTANCE]] (empty: all
            the user may read: the admin and developers every component, a
            tenant's owner its own instances; the platform decides)
q           text the line must contain (case-sensitive)
request_id  a request id (X-Request-Id): the lines that carry it
minutes     how far back (5, 15, 60, 360, 1440; empty: no limit)
limit       lines at most, newest last (default 200, at most 2000)
The API takes one search text: with both, request_id is searched there and
q is matched here on the lines it returns. Bad values: a 400 page."""
from __future__ import annotations

import time

from flask import Blueprint, abort, jsonify, render_template, request

from ..app import api
from ..sessions import login_required

bp = Blueprint("logs", __name__, url_prefix="/dashboard")
MINUTES = (5, 15, 60, 360, 1440)
DEFAULT_LIMIT, MAX_LIMIT = 200, 2000


def params() -> dict:
    a = request.args
    p = {"component": a.get("component", "").strip(), "q": a.get("q", ""),
         "request_id": a.get("request_id", "").strip(), "minutes": a.get("minutes", "").strip(),
         "limit": a.get("limit", "").strip()}
    if p["minutes"]:
        try:
            if int(p["minutes"]) not in MINUTES:
                raise ValueError
        except ValueError:
            abort(400, description=f"minutes must be one of {', '.join(map(str, MINUTES))}")
    if p["limit"]:
        try:
            if not 1 <= int(p["limit"]) <= MAX_LIMIT:
                raise ValueError
        except ValueError:
            abort(400, description=f"limit must be a whole number from 1 to {MAX_LIMIT}")
    for k in ("component", "q", "request_id"):
        if len(p[k]) > 300:
            abort(400, description=f"{k} is at most 300 characters")
    return p


def lines_for(p: dict) -> list[dict]:
    search = p["request_id"] or p["q"] or None
    query = {"component": p["component"] or None, "q": search, "limit": int(p["limit"] or DEFAULT_LIMIT),
             "since": f"{time.time() - int(p['minutes']) * 60:.0f}" if p["minutes"] else None}
    body = api("GET", "/api/v1/logs", query=query) or {}
    lines = body.get("lines", []) if isinstance(body, dict) else []
    if p["request_id"] and p["q"]:
        lines = [x for x in lines if p["q"] in x.get("line", "")]
    return lines


@bp.get("/logs")
@login_required
def index():
    p = params()
    searched = any(p[k] for k in ("component", "q", "request_id", "minutes"))
    lines = lines_for(p)
    return render_template("logs.html", p=p, lines=lines, searched=searched, minutes=MINUTES)


@bp.get("/api/logs")
@login_required
def lines_json():
    p = params()
    lines = lines_for(p)
    return jsonify({"lines": lines, "html": render_template("_log_lines.html", lines=lines, p=p)})
