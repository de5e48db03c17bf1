"""Sessions and CSRF protection of the dashboard.

The session is Flask's signed cookie `stratus_dashboard` (Path=/dashboard,
HttpOnly, SameSite=Strict, Secure when the page came over https: the
request's scheme, or X-Forwarded-Proto from a TLS proxy in front). Signed
with the dashboard's secret (STRATUS_DASHBOARD_SECRET, else one generated
once in $STRATUS_STATE_DIR/dashboard-secret, readable by its owner alone),
so every instance of the dashboard reads every session and none can be
forged. It holds:

    csrf      a random per-session token (made on the first page, renewed at
              login and logout)
    token     the platform token the login got from the gateway's token
              service (POST /api/v1/auth/token); absent when logged out
    user, role, tenant, exp    from the grant and the token's claims: only
              to choose the menu and the home page; what the user may see
              and do is decided by the platform for every call, with the token

CSRF: every POST must carry the session's csrf token, in the form field
`csrf_token` (every form has it as a hidden field) or in an X-CSRF-Token
header; otherwise 400 and nothing is done. Together with SameSite=Strict no
other site can make a signed-in browser act."""
from __future__ import annotations

import functools
import hmac
import secrets
import time

from flask import abort, current_app, g, redirect, request, session, url_for
from flask.sessions import SecureCookieSessionInterface

COOKIE = "stratus_dashboard"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"


class SessionInterface(SecureCookieSessionInterface):
    """Flask's signed cookie session, Secure only when the page came over https."""

    def get_cookie_secure(self, app) -> bool:
        if request.is_secure:
            return True
        proto = request.headers.get("X-Forwarded-Proto", "").split(",")[-1].strip().lower()
        return proto == "https"


def configure(app, secret: str) -> None:
    app.secret_key = secret
    app.session_interface = SessionInterface()
    app.config.update(SESSION_COOKIE_NAME=COOKIE, SESSION_COOKIE_PATH="/dashboard",
                      SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Strict",
                      SESSION_REFRESH_EACH_REQUEST=False, PERMANENT_SESSION_LIFETIME=12 * 3600)


def csrf_token() -> str:
    """The session's CSRF token (made on first use)."""
    tok = session.get("csrf")
    if not tok:
        tok = session["csrf"] = secrets.token_urlsafe(32)
    return tok


def check_csrf() -> None:
    """Abort 400 unless the POST carries the session's CSRF token."""
    expected = session.get("csrf")
    sent = request.headers.get(CSRF_HEADER) or request.form.get(CSRF_FIELD, "")
    if not expected or not sent or not hmac.compare_digest(str(sent), str(expected)):
        abort(400, description="the form has expired or did not come from this dashboard (CSRF token missing "
                               "or wrong): reload the page and try again")


def sign_in(grant: dict, claims: dict, username: str) -> None:
    session.clear()
    session.permanent = True
    session["csrf"] = secrets.token_urlsafe(32)     # a new session: never the one from before the login
    session["token"] = grant["token"]
    session["user"] = username
    session["role"] = grant.get("role") or claims.get("role")
    session["tenant"] = claims.get("tenant")
    session["exp"] = claims.get("exp") or int(time.time() + float(grant.get("expires_in") or 3600))


def sign_out() -> None:
    session.clear()


def user() -> dict | None:
    """The signed-in user ({"user", "role", "tenant", "token"}), or None
    (never signed in, signed out, or the token has expired)."""
    tok = session.get("token")
    if not tok:
        return None
    if float(session.get("exp") or 0) <= time.time():
        session.pop("token", None)
        return None
    return {"user": session.get("user"), "role": session.get("role"), "tenant": session.get("tenant"),
            "token": tok}


def wants_json() -> bool:
    return request.path.startswith("/dashboard/api/")


def login_required(view=None, *, roles: tuple[str, ...] | None = None):
    """The view needs a signed-in user (else the login page, or a JSON 401
    for /dashboard/api/...). `roles` narrows who the dashboard shows the
    view to (403 otherwise); the platform still checks every call itself."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            u = user()
            if u is None:
                if wants_json():
                    abort(401, description="sign in first")
                return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
            if roles is not None and u["role"] not in roles:
                abort(403, description=f"this page is not for the role {u['role']}")
            g.user = u
            return fn(*args, **kwargs)
        return inner
    return wrap(view) if view is not None else wrap


def safe_next(target: str | None) -> str | None:
    """A redirect target after login: a path of the dashboard, nothing else."""
    if not target or not target.startswith("/dashboard") or target.startswith("//") or "\\" in target:
        return None
    return target


def secret_from(settings) -> str:
    import os
    from bus.settings import env_str
    from gateway.secrets import load_or_create
    value = env_str("STRATUS_DASHBOARD_SECRET", "")
    if value:
        return value
    path = settings.state_path / "dashboard-secret"
    os.makedirs(path.parent, exist_ok=True)
    return load_or_create(path, nbytes=32)


def current_app_platform():
    return current_app.extensions["stratus_platform"]
