"""Signing in and out.

    GET  /dashboard/login     the form (username, password), with its CSRF token
    POST /dashboard/login     asks the platform's token service for a token
                              (POST {gateway}/api/v1/auth/token); 200 -> the
                              session holds it and the browser goes to the
                              home page (or ?next=, a dashboard path); 401 ->
                              the form again, 401, "wrong username or password"
    POST /dashboard/logout    forgets the session; back to the login page
Only the roles admin, developer and tenant have a dashboard: a RideShare
user's token is not kept (403 page)."""
from __future__ import annotations

import jwt
from flask import Blueprint, abort, current_app, g, redirect, render_template, request, url_for

from .. import sessions
from ..platform import ApiError

bp = Blueprint("auth", __name__, url_prefix="/dashboard")
ROLES = ("admin", "developer", "tenant")


@bp.get("/login")
def login():
    if sessions.user() is not None and not request.args.get("expired"):
        return redirect(url_for("home.index"))
    note = "Your session has expired: sign in again." if request.args.get("expired") else None
    return render_template("login.html", next=sessions.safe_next(request.args.get("next")), note=note)


@bp.post("/login")
def login_post():
    username = request.form.get("username", "").strip()
    password = request.form.get("password", "")
    nxt = sessions.safe_next(request.form.get("next"))
    if not username or not password:
        return render_template("login.html", next=nxt, error="Enter your username and password.",
                               username=username), 400
    if len(username) > 256 or len(password) > 1024:
        return render_template("login.html", next=nxt, error="The username or password is too long.",
                               username=username[:256]), 400
    plat = current_app.extensions["stratus_platform"]
    try:
        grant = plat.call("POST", "/api/v1/auth/token", json_body={"username": username, "password": password},
                          request_id=f"{g.get('request_id', 'dash')}.login")
    except ApiError as exc:
        if exc.status == 401:
            return render_template("login.html", next=nxt, error="Wrong username or password.",
                                   username=username), 401
        if exc.status == 429:
            return render_template("login.html", next=nxt, error="Too many attempts: wait a moment.",
                                   username=username), 429
        raise
    if not isinstance(grant, dict) or not isinstance(grant.get("token"), str):
        abort(502, description="the token service answered without a token")
    try:
        # The platform signed it; the dashboard only reads its claims (role, tenant,
        # exp) to choose the menu. Every call still goes with the token itself.
        claims = jwt.decode(grant["token"], options={"verify_signature": False})
    except jwt.PyJWTError:
        abort(502, description="the token service answered with a token that is not a JWT")
    role = grant.get("role") or claims.get("role")
    if role not in ROLES:
        abort(403, description=f"the role {role!r} has no dashboard: it is for the platform's admin, "
                               f"developers and tenants")
    sessions.sign_in(grant, claims, username)
    return redirect(nxt or url_for("home.index"), 303)


@bp.post("/logout")
def logout():
    sessions.sign_out()
    return redirect(url_for("auth.login"), 303)
