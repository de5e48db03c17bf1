"""The users service of the RideShare tenant (shared/spec/rideshare.md).

Every check-then-act is one atomic write with preconditions; the tags of the
preconditions tell the failures apart. Each write's bus request id comes
from the HTTP request's X-Request-Id (web.write), so a retried PUT or DELETE
gets the first attempt's result and answers as it did (201, not "exists").
The user list is read whole, in pages (web.read_list)."""
from __future__ import annotations

import re

from flask import Flask, Response, jsonify

from bus import client as bus_client
from bus import ops
from bus.errors import PreconditionFailed
from bus.service import json_error
from rideshare import schema as rs

from bus import tenancy, web
from bus.web import InputError

SHA1_HEX = re.compile(r"^[0-9a-fA-F]{40}$")


def db():
    return bus_client.shared("users", rs.TENANT)


def reserved(username: str) -> bool:
    """The names the platform keeps (admin, platform, stratus): the token
    service answers `admin` itself, so a RideShare user of that name could
    never log in.

    A tenant's or developer's name is not refused here, and needs not be: the
    token service gives an account's role only for the account's own
    password (generated, 24 characters) and otherwise goes on to RideShare's
    users (whose password is a 40-hex SHA-1), so the two never shadow each
    other; and the platform refuses a new account under a RideShare user's
    name (409). This service therefore reads no platform state at all."""
    return username in tenancy.RESERVED


def create_app(*, ensure_schema: bool = True) -> Flask:
    """The app; with ensure_schema (the default) a background thread creates
    the tables as soon as the bus answers."""
    app, schema = web.tenant_app("users", "/api/v1/users", lambda: rs.create_tables(db()), ensure_schema=ensure_schema)

    @app.put("/api/v1/users")
    def add_user():
        body = web.json_object(("username", "password"))
        username = web.text_field(body, "username")
        password = web.text_field(body, "password")
        if not SHA1_HEX.fullmatch(password):
            raise InputError("password must be exactly 40 hexadecimal characters (a SHA-1 digest)")
        if reserved(username):
            raise InputError(f"the username {username!r} is reserved by the platform")
        schema.ensure()
        try:
            web.write(db(), [
                ops.require(rs.USERS, [ops.eq("username", username)], exists=False, tag="user_exists"),
                ops.insert(rs.USERS, {"username": username, "password": password.lower()}),
            ])
        except PreconditionFailed:
            return json_error(400, f"user {username!r} already exists")
        return jsonify({}), 201

    @app.delete("/api/v1/users/<path:username>")
    def remove_user(username: str):
        if len(username) > rs.MAX_FIELD:
            raise InputError(f"username is longer than {rs.MAX_FIELD} characters")
        schema.ensure()
        try:
            web.write(db(), [
                ops.delete(rs.USERS, [ops.eq("username", username)], expect=1, tag="no_user"),
                # the user's rides, everyone's memberships in them, and the user's memberships
                ops.delete(rs.MEMBERS, [ops.eq("created_by", username)]),
                ops.delete(rs.MEMBERS, [ops.eq("username", username)]),
                ops.delete(rs.RIDES, [ops.eq("created_by", username)]),
            ])
        except PreconditionFailed:
            return json_error(400, f"no user {username!r}")
        return jsonify({})

    @app.get("/api/v1/users")
    def list_users():
        schema.ensure()
        names = [r["username"] for r in web.read_list(db(), ops.select(rs.USERS, columns=["username"]), ["username"])]
        if not names:
            return Response(status=204)
        return jsonify(names)

    @app.post("/api/v1/db/clear")
    def clear():
        schema.ensure()
        web.write(db(), rs.clear_ops())
        return jsonify({})

    return app
