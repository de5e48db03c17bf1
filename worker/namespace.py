"""Tenant namespaces in one store (paas.md, Data isolation).

Every table belongs to one tenant. Its name in SQLite (the physical name) is
the tenant's name, two underscores, and the table's name as the tenant spells
it (the logical name):

    tenant acme, table users   ->  acme__users
    the platform's own tables  ->  their logical name, which may not hold "__"

A tenant name has no underscore (bus.tenancy), so the first "__" of a physical
name always ends the tenant. Named sequences are scoped the same way.

A request is resolved inside its tenant by construction: the store checks it
against `view(defs, tenant)`, the tenant's own tables under their logical
names, so any name it gives (another tenant's prefix, dots, quotes, another
case) is looked up among those alone, and `scope` then turns the checked
request's names into physical ones. Nothing a client sends is ever used as a
physical name."""
from __future__ import annotations

from bus.errors import BadRequest
from bus.tenancy import PLATFORM

SEP = "__"
_INDEX_PREFIXES = ("sqlite_autoindex_", "ix_", "uq_")
_BOOKKEEPING = ("_stratus", "sqlite_")


def phys(tenant: str, name: str) -> str:
    return name if tenant == PLATFORM else f"{tenant}{SEP}{name}"


def split(physical: str) -> tuple[str, str]:
    """(tenant, logical name) of a physical table name."""
    tenant, sep, rest = physical.partition(SEP)
    return (tenant, rest) if sep else (PLATFORM, physical)


def view(defs: dict[str, dict], tenant: str) -> dict[str, dict]:
    """The tenant's tables, keyed and named by their logical names."""
    out = {}
    for name, d in defs.items():
        t, logical = split(name)
        if t == tenant:
            out[logical] = {**d, "table": logical}
    return out


def tables_of(defs: dict[str, dict], tenant: str) -> list[str]:
    """Physical names of the tenant's tables."""
    return sorted(name for name in defs if split(name)[0] == tenant)


def scope(checked: list[dict], tenant: str) -> list[dict]:
    """A checked write with physical names: tables and sequences. `clear`
    becomes an explicit list of the tables to empty (decided by the caller,
    who knows the tables at this point of the write)."""
    out = []
    for op in checked:
        op = dict(op)
        if op["op"] == "create_table" and tenant == PLATFORM and SEP in op["table"]:
            raise BadRequest(f"a platform table's name may not contain {SEP!r}")
        if op["op"] == "clear":
            op["tenant"] = tenant
        if "table" in op:
            op["table"] = phys(tenant, op["table"])
        if "rows" in op:
            op["rows"] = [_scope_seqs(r, tenant) for r in op["rows"]]
        if "values" in op:
            op["values"] = _scope_seqs(op["values"], tenant)
        out.append(op)
    return out


def _scope_seqs(row: dict, tenant: str) -> dict:
    return {k: ({**v, "$seq": phys(tenant, v["$seq"])} if isinstance(v, dict) else v) for k, v in row.items()}


def owner_of_object(name: str) -> str | None:
    """The tenant a SQLite object (table or index) belongs to, None for the
    store's own bookkeeping."""
    if name.startswith(_BOOKKEEPING) and not name.startswith("sqlite_autoindex_"):
        return None
    for p in _INDEX_PREFIXES:
        if name.startswith(p):
            name = name[len(p):]
            if name.startswith(_BOOKKEEPING):
                return None
            break
    return split(name)[0]
