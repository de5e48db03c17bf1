"""Platform accounts: tenant owners and developers (paas.md, Accounts).

They live in the platform's own table, reached through the bus as the tenant
PLATFORM, which only the platform's broker account can name: no tenant can
read or write it.

    accounts(name PK, kind "tenant"|"developer", password  (scrypt, bus.tenancy),
             broker_password (the tenant's broker account; tenants only), created)

The owner's password is generated, returned once by `create`, and kept only
as a hash. The broker password is what a tenant's instances connect with
(`tenant_amqp_url`): it never leaves the platform's components.

A directory of tenant names (no secrets) is kept in ZooKeeper as well, under
Paths.tenants, so that any component can tell a tenant's name from a free one
(the orchestrator's db routes; app instances never read it)."""
from __future__ import annotations

import time

from . import ops
from . import tenancy
from .errors import BadRequest, PreconditionFailed

TABLE = "accounts"
KINDS = ("tenant", "developer")
SCHEMA = ops.create_table(TABLE, [
    ops.column("name", "text", nullable=False),
    ops.column("kind", "text", nullable=False),
    ops.column("password", "text", nullable=False),
    ops.column("broker_password", "text"),
    ops.column("created", "real", nullable=False),
], ["name"])


class Exists(Exception):
    pass


def ensure_schema(db) -> None:
    db.write([SCHEMA], tenant=tenancy.PLATFORM)


def create(db, name: str, kind: str) -> tuple[str, str | None]:
    """A new account: (owner password, broker password or None). Raises
    tenancy.InvalidName (400) or Exists (409)."""
    tenancy.check_tenant_name(name)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    password = tenancy.new_password()
    broker_password = tenancy.new_password() if kind == "tenant" else None
    try:
        db.write([SCHEMA,
                  ops.require(TABLE, [ops.eq("name", name)], exists=False, tag="exists"),
                  ops.insert(TABLE, {"name": name, "kind": kind, "password": tenancy.hash_password(password),
                                     "broker_password": broker_password, "created": time.time()})],
                 tenant=tenancy.PLATFORM)
    except PreconditionFailed as exc:
        if exc.tag == "exists":
            raise Exists(name) from None
        raise
    return password, broker_password


def _read(db, query: dict) -> list:
    """Rows of the accounts table; none before the first account made it.
    Read on the master: an account made (or deleted) a moment ago by another
    component is seen at once, whatever a slave has applied."""
    try:
        return db.read(query, primary=True, tenant=tenancy.PLATFORM).result
    except BadRequest as exc:
        if exc.code == "unknown_table":
            return []
        raise


def get(db, name: str) -> dict | None:
    rows = _read(db, ops.select(TABLE, [ops.eq("name", name)]))
    return rows[0] if rows else None


def list_(db, kind: str | None = None) -> list[dict]:
    """Every account of `kind` (all when None), without their secrets."""
    where = [ops.eq("kind", kind)] if kind else []
    return _read(db, ops.select(TABLE, where, columns=["name", "kind", "created"], order_by=[["name", "asc"]]))


def delete(db, name: str) -> bool:
    try:
        reply = db.write([ops.delete(TABLE, [ops.eq("name", name)])], tenant=tenancy.PLATFORM)
    except BadRequest as exc:
        if exc.code == "unknown_table":
            return False
        raise
    return bool(reply.result and reply.result[0].get("rowcount"))


def verify(db, name: str, password: str) -> dict | None:
    """The account if the password is its owner's, else None (constant time)."""
    acct = get(db, name)
    if acct is None:
        tenancy.check_password(password, _DUMMY)   # the same work for a name that does not exist
        return None
    return acct if tenancy.check_password(password, acct["password"]) else None


_DUMMY = tenancy.hash_password("no such account")


def tenant_amqp_url(platform_url: str, cluster: str, tenant: str, broker_password: str) -> str:
    """STRATUS_AMQP_URL for a tenant's instances: the platform's broker
    address (every node's, with several) with the tenant's own account."""
    from . import brokers
    # Every node of the list gets the tenant's account (never the platform's).
    return brokers.with_account(platform_url, tenancy.broker_user(cluster, tenant), broker_password)
