"""The rides service of the RideShare tenant (shared/spec/rideshare.md).

Every check-then-act is one atomic write with preconditions; the tags of the
preconditions tell the failures apart. Each write's bus request id comes
from the HTTP request's X-Request-Id (web.write), so a retried request gets
the first attempt's result and answers as it did: a retried POST creates one
ride (its URL is in the Location header of the 201). Lists (rides between
two areas, a ride's members) are read whole, in pages (web.read_list). Timestamps are stored as seconds since
the epoch (UTC) and shown as DD-MM-YYYY:SS-MM-HH."""
from __future__ import annotations

import calendar
import re
import time
from datetime import datetime, timezone

from flask import Flask, Response, jsonify, request

from bus import client as bus_client
from bus import ops
from bus.errors import PreconditionFailed
from bus.service import json_error
from rideshare import schema as rs

from bus import web
from bus.web import InputError

DIGITS = re.compile(r"^[0-9]{1,9}$")
TIMESTAMP = re.compile(r"^[0-9]{2}-[0-9]{2}-[0-9]{4}:[0-9]{2}-[0-9]{2}-[0-9]{2}$")  # strptime alone takes "1-8-2031:0-0-0"
MAX_ID = 2**63 - 1


def db():
    return bus_client.shared("rides", rs.TENANT)


# --- input ---------------------------------------------------------------------
def parse_area(value, name: str) -> int:
    """An area 1..198, as a JSON integer or a string of digits."""
    if isinstance(value, bool):
        raise InputError(f"{name} must be an area number from 1 to 198")
    if isinstance(value, int):
        area = value
    elif isinstance(value, str) and DIGITS.fullmatch(value):
        area = int(value)
    else:
        raise InputError(f"{name} must be an area number from 1 to 198")
    if area not in rs.AREAS:
        raise InputError(f"{name} {area} is outside the areas 1 to 198")
    return area


def parse_timestamp(value) -> int:
    """DD-MM-YYYY:SS-MM-HH, read as UTC -> seconds since the epoch."""
    if not isinstance(value, str) or not TIMESTAMP.fullmatch(value):
        raise InputError("timestamp must be a string DD-MM-YYYY:SS-MM-HH")
    try:
        dt = datetime.strptime(value, rs.TIMESTAMP_FORMAT)
    except ValueError:
        raise InputError("timestamp must be DD-MM-YYYY:SS-MM-HH") from None
    return calendar.timegm(dt.timetuple())


def format_timestamp(ts: int) -> str:
    d = datetime.fromtimestamp(ts, timezone.utc)
    return f"{d.day:02d}-{d.month:02d}-{d.year:04d}:{d.second:02d}-{d.minute:02d}-{d.hour:02d}"


def valid_ride_id(ride_id: int) -> bool:
    return 0 < ride_id <= MAX_ID


# --- the app -------------------------------------------------------------------
def create_app(*, ensure_schema: bool = True) -> Flask:
    """The app; with ensure_schema (the default) a background thread creates
    the tables as soon as the bus answers."""
    app, schema = web.tenant_app("rides", "/api/v1/rides", lambda: rs.create_tables(db()), ensure_schema=ensure_schema)

    def read(query):
        reply = db().read(query, min_lsn=web.min_lsn())
        web.note_lsn(reply.lsn)
        return reply.result

    def find_ride(ride_id: int) -> dict | None:
        rows = read(ops.select(rs.RIDES, [ops.eq("ride_id", ride_id)]))
        return rows[0] if rows else None

    @app.post("/api/v1/rides")
    def create_ride():
        body = web.json_object(("created_by", "timestamp", "source", "destination"))
        created_by = web.text_field(body, "created_by")
        ts = parse_timestamp(body["timestamp"])
        source = parse_area(body["source"], "source")
        destination = parse_area(body["destination"], "destination")
        if source == destination:
            raise InputError("source and destination must differ")
        schema.ensure()
        try:
            reply = web.write(db(), [
                ops.require(rs.USERS, [ops.eq("username", created_by)], tag="no_user"),
                ops.insert(rs.RIDES, {"ride_id": ops.seq(rs.RIDE_SEQ), "created_by": created_by,
                                      "timestamp": ts, "source": source, "destination": destination}),
            ])
        except PreconditionFailed:
            return json_error(400, f"no user {created_by!r}")
        resp = jsonify({})
        resp.headers["Location"] = f"/api/v1/rides/{reply.result[1]['values']['ride_id']}"
        return resp, 201

    @app.get("/api/v1/rides")
    def list_rides():
        args = request.args
        for name in ("source", "destination"):
            if name not in args or args[name] == "":
                raise InputError(f"query parameter {name} is required")
        source = parse_area(args["source"], "source")
        destination = parse_area(args["destination"], "destination")
        schema.ensure()
        rows = web.read_list(db(), ops.select(rs.RIDES, [ops.eq("source", source), ops.eq("destination", destination),
                                                         ["timestamp", ">", int(time.time())]],
                                              columns=["ride_id", "created_by", "timestamp"]),
                             ["timestamp", "ride_id"])
        if not rows:
            return Response(status=204)
        return jsonify([{"rideId": r["ride_id"], "username": r["created_by"],
                         "timestamp": format_timestamp(r["timestamp"])} for r in rows])

    @app.get("/api/v1/rides/<int:ride_id>")
    def ride_details(ride_id: int):
        if not valid_ride_id(ride_id):
            return Response(status=204)
        schema.ensure()
        ride = find_ride(ride_id)
        if ride is None:
            return Response(status=204)
        members = web.read_list(db(), ops.select(rs.MEMBERS, [ops.eq("ride_id", ride_id)], columns=["username"]),
                                ["username"])
        return jsonify({"rideId": ride["ride_id"], "created_by": ride["created_by"],
                        "users": [m["username"] for m in members],
                        "timestamp": format_timestamp(ride["timestamp"]),
                        "source": str(ride["source"]), "destination": str(ride["destination"])})

    @app.post("/api/v1/rides/<int:ride_id>")
    def join_ride(ride_id: int):
        body = web.json_object(("username",))
        username = web.text_field(body, "username")
        if not valid_ride_id(ride_id):
            return json_error(400, f"no ride {ride_id}")
        schema.ensure()
        ride = find_ride(ride_id)
        if ride is None:
            # A slave may lag behind: ask the master, inside a write, before saying no.
            try:
                web.write(db(), [ops.require(rs.RIDES, [ops.eq("ride_id", ride_id)], tag="no_ride")])
            except PreconditionFailed:
                return json_error(400, f"no ride {ride_id}")
            ride = find_ride(ride_id)
            if ride is None:
                return json_error(400, f"no ride {ride_id}")
        creator = ride["created_by"]
        if username == creator:
            return json_error(400, f"{username!r} created ride {ride_id}")
        try:
            web.write(db(), [
                ops.require(rs.RIDES, [ops.eq("ride_id", ride_id), ops.eq("created_by", creator)], tag="no_ride"),
                ops.require(rs.USERS, [ops.eq("username", username)], tag="no_user"),
                ops.require(rs.MEMBERS, [ops.eq("ride_id", ride_id), ops.eq("username", username)],
                            exists=False, tag="member"),
                ops.insert(rs.MEMBERS, {"ride_id": ride_id, "username": username, "created_by": creator}),
            ])
        except PreconditionFailed as exc:
            msg = {"no_ride": f"no ride {ride_id}", "no_user": f"no user {username!r}",
                   "member": f"{username!r} already joined ride {ride_id}"}.get(exc.tag, exc.message)
            return json_error(400, msg)
        return jsonify({})

    @app.delete("/api/v1/rides/<int:ride_id>")
    def delete_ride(ride_id: int):
        if not valid_ride_id(ride_id):
            return json_error(400, f"no ride {ride_id}")
        schema.ensure()
        try:
            web.write(db(), [
                ops.delete(rs.RIDES, [ops.eq("ride_id", ride_id)], expect=1, tag="no_ride"),
                ops.delete(rs.MEMBERS, [ops.eq("ride_id", ride_id)]),
            ])
        except PreconditionFailed:
            return json_error(400, f"no ride {ride_id}")
        return jsonify({})

    @app.get("/api/v1/rides/count")
    def count_rides():
        schema.ensure()
        return jsonify([read(ops.count(rs.RIDES))])

    @app.post("/api/v1/db/clear")
    def clear():
        schema.ensure()
        web.write(db(), rs.clear_ops())
        return jsonify({})

    return app
