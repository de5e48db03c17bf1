"""GET /dashboard/: each role's home page. A tenant's is its apps, a
developer's the components' status, the admin's the tenants."""
from __future__ import annotations

from flask import Blueprint, g, redirect, url_for

from ..sessions import login_required

bp = Blueprint("home", __name__, url_prefix="/dashboard")


@bp.get("/")
@login_required
def index():
    role = g.user["role"]
    if role == "tenant" and g.user.get("tenant"):
        return redirect(url_for("tenant.overview", tenant=g.user["tenant"]))
    if role == "admin":
        return redirect(url_for("tenants.index"))
    return redirect(url_for("components.index"))
