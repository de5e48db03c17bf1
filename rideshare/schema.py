"""The RideShare tenant's tables, shared by the users and rides services (which
never import each other). Both services create all three tables at start, in
one write: a create_table with the same definition is a no-op, so any start
order, restarts and several instances are all fine.

  users(username text PK, password text)                       owned by users
      password is the SHA-1 hex digest, stored lowercased; the gateway's token
      service checks credentials against exactly these two columns.
  rides(ride_id integer PK, created_by text, timestamp integer,
        source integer, destination integer)                    owned by rides
      ride_id comes from the $seq RIDE_SEQ (unique, never reused);
      timestamp is seconds since the epoch (UTC), so "upcoming" is a range.
  ride_members(ride_id integer, username text, created_by text,
               PK(ride_id, username))                           owned by rides
      created_by repeats the ride's creator (it never changes). It lets the
      users service delete a user's rides *and* everyone's memberships in
      them in one atomic write without a subquery:
        delete ride_members where created_by = u; where username = u.

Invariants kept by the services' writes (each one atomic, with preconditions):
  - every ride's creator exists;
  - every ride_members row names an existing ride, with that ride's creator,
    and an existing user who is not the creator.
"""
from __future__ import annotations

from bus import ops

TENANT = "rideshare"   # the tenant whose namespace holds these tables (paas.md, Built-in apps)

USERS = "users"
RIDES = "rides"
MEMBERS = "ride_members"
RIDE_SEQ = "rides"        # the $seq that numbers rides from 1
AREAS = range(1, 199)     # valid source / destination areas: 1..198
TIMESTAMP_FORMAT = "%d-%m-%Y:%S-%M-%H"
MAX_FIELD = 255           # longest accepted string field


def users_table() -> dict:
    return ops.create_table(USERS, [
        ops.column("username", "text", nullable=False),
        ops.column("password", "text", nullable=False),
    ], ["username"])


def rides_table() -> dict:
    return ops.create_table(RIDES, [
        ops.column("ride_id", "integer", nullable=False),
        ops.column("created_by", "text", nullable=False),
        ops.column("timestamp", "integer", nullable=False),
        ops.column("source", "integer", nullable=False),
        ops.column("destination", "integer", nullable=False),
    ], ["ride_id"], indexes=[["source", "destination", "timestamp"], ["created_by"]])


def members_table() -> dict:
    return ops.create_table(MEMBERS, [
        ops.column("ride_id", "integer", nullable=False),
        ops.column("username", "text", nullable=False),
        ops.column("created_by", "text", nullable=False),
    ], ["ride_id", "username"], indexes=[["username"], ["created_by"]])


def tables() -> list[dict]:
    return [users_table(), rides_table(), members_table()]


def create_tables(db, *, timeout: float | None = None):
    """Create the three tables in one write (idempotent). Returns the Reply."""
    return db.write(tables(), timeout=timeout)


def clear_ops() -> list[dict]:
    """Empty the RideShare tables, and only them (other tenants' data stays)."""
    return [ops.delete(MEMBERS, []), ops.delete(RIDES, []), ops.delete(USERS, [])]
