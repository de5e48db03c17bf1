"""Table definitions as the wire protocol states them, checked and turned
into SQLAlchemy tables. Names are checked against the schema so a request can
only ever touch tables and columns that create_table made."""
from __future__ import annotations

import re

import sqlalchemy as sa

from bus.errors import BadRequest

IDENT = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")
TYPES = {"integer": sa.BigInteger, "real": sa.Float, "text": sa.Text, "boolean": sa.Boolean}
RESERVED_PREFIX = "_stratus"


def check_ident(kind: str, name) -> str:
    if not isinstance(name, str) or not IDENT.match(name):
        raise BadRequest(f"{kind} name {name!r} is not valid (letters, digits, _; at most 63)", code="bad_request")
    if name.lower().startswith(RESERVED_PREFIX):
        raise BadRequest(f"{kind} name {name!r} is reserved", code="bad_request")
    return name


def normalize(op: dict) -> dict:
    """Check a create_table operation and return its canonical definition."""
    table = check_ident("table", op.get("table"))
    cols = op.get("columns")
    if not isinstance(cols, list) or not cols:
        raise BadRequest("create_table needs a non-empty list of columns")
    columns, seen = [], set()
    for c in cols:
        if not isinstance(c, dict):
            raise BadRequest("each column is an object {name, type, nullable?}")
        name = check_ident("column", c.get("name"))
        if name in seen:
            raise BadRequest(f"column {name!r} appears twice")
        seen.add(name)
        type_ = c.get("type")
        if type_ not in TYPES:
            raise BadRequest(f"column {name!r}: type must be one of {sorted(TYPES)}", code="bad_type")
        nullable = c.get("nullable", True)
        if not isinstance(nullable, bool):
            raise BadRequest(f"column {name!r}: nullable must be true or false")
        col = {"name": name, "type": type_, "nullable": nullable}
        if c.get("default") is not None:
            check_value(table, col, c["default"])
            col["default"] = c["default"]
        columns.append(col)

    def col_list(v, what) -> list[str]:
        if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
            raise BadRequest(f"{what} must be a non-empty list of column names")
        for x in v:
            if x not in seen:
                raise BadRequest(f"{what}: no column {x!r}", code="unknown_column")
        return list(v)

    pk = col_list(op.get("primary_key"), "primary_key")
    unique = [col_list(u, "unique") for u in op.get("unique") or []]
    indexes = [col_list(i, "indexes") for i in op.get("indexes") or []]
    return {"table": table, "columns": columns, "primary_key": pk, "unique": unique, "indexes": indexes}


def build(meta: sa.MetaData, d: dict) -> sa.Table:
    cols = [sa.Column(c["name"], TYPES[c["type"]](), nullable=c["nullable"] and c["name"] not in d["primary_key"],
                      primary_key=c["name"] in d["primary_key"], autoincrement=False)
            for c in d["columns"]]
    args: list = list(cols)
    for i, u in enumerate(d["unique"]):
        args.append(sa.UniqueConstraint(*u, name=f"uq_{d['table']}_{i}"))
    table = sa.Table(d["table"], meta, *args)
    for i, ix in enumerate(d["indexes"]):
        sa.Index(f"ix_{d['table']}_{i}", *[table.c[c] for c in ix])
    return table


def check_value(table: str, col: dict, value):
    """Values must have the column's type; JSON gives us int, float, str, bool, None."""
    if value is None:
        if not col["nullable"]:
            raise BadRequest(f"{table}.{col['name']} may not be null", code="bad_type")
        return value
    t = col["type"]
    ok = (
        (t == "integer" and isinstance(value, int) and not isinstance(value, bool))
        or (t == "real" and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (t == "text" and isinstance(value, str))
        or (t == "boolean" and isinstance(value, bool))
    )
    if not ok:
        raise BadRequest(f"{table}.{col['name']} is {t}, got {type(value).__name__} {value!r:.40}", code="bad_type")
    if t == "integer" and not (-(2**63) <= value < 2**63):
        raise BadRequest(f"{table}.{col['name']}: integer out of range", code="bad_type")
    return value
