"""The DB cluster view: members with their role, state, term, applied LSN
and lag, the election history, the scaling state, charts of reads, writes,
replication lag and elections; and, for the admin, the switchover form.

    GET  /dashboard/cluster                 the page (admin; a developer reads it)
    POST /dashboard/cluster/switchover      candidate=<worker id> or empty (the
                                            platform picks) -> POST /api/v1/switchover
    GET  /dashboard/api/cluster             {"cluster": GET /api/v1/cluster, "html"}
A switchover refused (409: one in progress, no candidate; 503: no master,
the candidate too far behind) says why on the page and changes nothing."""
from __future__ import annotations

from flask import Blueprint, flash, jsonify, redirect, render_template, request, url_for

from ..app import api
from ..platform import ApiError
from ..sessions import login_required

bp = Blueprint("cluster", __name__, url_prefix="/dashboard")
STAFF = ("admin", "developer")
ELECTIONS = 20


def view() -> dict:
    c = api("GET", "/api/v1/cluster") or {}
    c["recent_elections"] = list(reversed((c.get("elections") or [])[-ELECTIONS:]))
    return c


@bp.get("/cluster")
@login_required(roles=STAFF)
def index():
    return render_template("cluster.html", c=view())


@bp.post("/cluster/switchover")
@login_required(roles=("admin",))
def switchover():
    candidate = request.form.get("candidate", "").strip()
    try:
        res = api("POST", "/api/v1/switchover", json_body={"candidate": candidate} if candidate else {}, timeout=60)
    except ApiError as exc:
        if exc.status in (400, 409, 503):
            flash(f"No switchover: {exc.message}", "error")
            return redirect(url_for("cluster.index"), 303)
        raise
    res = res if isinstance(res, dict) else {}
    flash(f"Switchover done: the master is now {res.get('new')} (was {res.get('old')}), term {res.get('term')}.",
          "ok")
    return redirect(url_for("cluster.index"), 303)


@bp.get("/api/cluster")
@login_required(roles=STAFF)
def cluster_json():
    c = view()
    return jsonify({"cluster": c, "html": render_template("_cluster.html", c=c)})
