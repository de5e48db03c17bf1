"""Table definitions as the wire protocol states them, checked and turned
into SQLAlchemy tables. Names are checked against the schema so a request can
only ever touch tables and columns that create_table made.

Names are compared the way SQLite compares them: without regard to ASCII
case. `fold()` gives the key two names share when SQLite would take them for
one; the store keeps one canonical spelling per table (the one it was created
with) and resolves every other spelling to it.

A definition (stored in _stratus_tables, carried by the log):
    {"table", "columns": [{"name", "type", "nullable", "default"?}],
     "primary_key": [...], "unique": [[...]], "indexes": [[...]]}
"""
from __future__ import annotations

import math
import re

import sqlalchemy as sa

from bus.errors import BadRequest

IDENT = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")
TYPES = {"integer": sa.BigInteger, "real": sa.Float, "text": sa.Text, "boolean": sa.Boolean}
RESERVED_PREFIXES = ("_stratus", "sqlite_")   # ours, and SQLite's own objects
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
MAX_TEXT = 1 << 20         # characters in one text value
MAX_COLUMNS = 100          # columns of one table
MAX_KEYS = 16              # unique constraints, and indexes, of one table
TABLE_FIELDS = {"op", "table", "columns", "primary_key", "unique", "indexes", "tag"}
COLUMN_FIELDS = {"name", "type", "nullable", "default"}


def fold(name: str) -> str:
    """The key under which SQLite compares an (ASCII) identifier."""
    return name.lower()


def check_ident(kind: str, name) -> str:
    if not isinstance(name, str) or not IDENT.match(name):
        raise BadRequest(f"{kind} name {name!r:.80} is not valid (a letter, then letters, digits, _; at most 63)")
    if fold(name).startswith(RESERVED_PREFIXES):
        raise BadRequest(f"{kind} name {name!r} is reserved")
    return name


def normalize(op: dict) -> dict:
    """Check a create_table operation completely and return its canonical definition."""
    extra = set(op) - TABLE_FIELDS
    if extra:
        raise BadRequest(f"create_table: unknown field(s) {sorted(extra)!r:.120}")
    table = check_ident("table", op.get("table"))
    cols = op.get("columns")
    if not isinstance(cols, list) or not cols:
        raise BadRequest("create_table needs a non-empty list of columns")
    if len(cols) > MAX_COLUMNS:
        raise BadRequest(f"a table has at most {MAX_COLUMNS} columns", code="too_large")
    columns, seen = [], {}
    for c in cols:
        if not isinstance(c, dict):
            raise BadRequest("each column is an object {name, type, nullable?, default?}")
        extra = set(c) - COLUMN_FIELDS
        if extra:
            raise BadRequest(f"column: unknown field(s) {sorted(extra)!r:.120}")
        name = check_ident("column", c.get("name"))
        if fold(name) in seen:
            raise BadRequest(f"column {name!r} appears twice (names are compared without regard to case)")
        seen[fold(name)] = name
        type_ = c.get("type")
        if not isinstance(type_, str) or type_ not in TYPES:
            raise BadRequest(f"column {name!r}: type must be one of {sorted(TYPES)}, got {type_!r:.40}", code="bad_type")
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
        out = []
        for x in v:
            if fold(x) not in seen:
                raise BadRequest(f"{what}: no column {x!r:.80}", code="unknown_column")
            if seen[fold(x)] in out:
                raise BadRequest(f"{what}: column {x!r} appears twice")
            out.append(seen[fold(x)])
        return out

    def col_lists(v, what) -> list[list[str]]:
        if v is None:
            return []
        if not isinstance(v, list) or len(v) > MAX_KEYS:
            raise BadRequest(f"{what} must be a list of at most {MAX_KEYS} column lists")
        return [col_list(x, what) for x in v]

    pk = col_list(op.get("primary_key"), "primary_key")
    unique = col_lists(op.get("unique"), "unique")
    indexes = col_lists(op.get("indexes"), "indexes")
    return {"table": table, "columns": columns, "primary_key": pk, "unique": unique, "indexes": indexes}


def definition(op: dict) -> dict:
    """The definition carried by a create_table op that was already checked (or read from the log)."""
    return {"table": op["table"], "columns": op["columns"], "primary_key": op["primary_key"],
            "unique": op.get("unique") or [], "indexes": op.get("indexes") or []}


def same(a: dict, b: dict) -> bool:
    """Whether two definitions describe one table, as SQLite compares names."""
    return _folded(a) == _folded(b)


def _folded(d: dict):
    cols = [(fold(c["name"]), c["type"], c["nullable"], c.get("default")) for c in d["columns"]]
    keys = lambda ls: [[fold(x) for x in lst] for lst in ls]  # noqa: E731
    return (fold(d["table"]), cols, [fold(x) for x in d["primary_key"]], keys(d["unique"]), keys(d["indexes"]))


def index_names(d: dict) -> list[str]:
    """Names of the schema objects (other than the table) that build() creates."""
    return [f"ix_{d['table']}_{i}" for i in range(len(d["indexes"]))]


def object_names(d: dict) -> set[str]:
    """Every schema-object name a table takes in SQLite's one namespace, folded."""
    return {fold(d["table"]), *(fold(n) for n in index_names(d))}


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


def nullable(d: dict, col: dict) -> bool:
    """A column may hold null unless it says not, or it is part of the primary key."""
    return col["nullable"] and col["name"] not in d["primary_key"]


def check_value(table: str, col: dict, value, *, nullable: bool | None = None):
    """Values must have the column's type and fit it: JSON gives int, float,
    str, bool, None. Integers are 64-bit, reals finite, text valid Unicode of
    at most MAX_TEXT characters."""
    if value is None:
        if not (col["nullable"] if nullable is None else nullable):
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
    if t in ("integer", "real") and isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        raise BadRequest(f"{table}.{col['name']}: {value!r:.30} is outside the 64-bit integer range", code="out_of_range")
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRequest(f"{table}.{col['name']}: {value!r} is not a finite number", code="out_of_range")
    if t == "text":
        if len(value) > MAX_TEXT:
            raise BadRequest(f"{table}.{col['name']}: text of {len(value)} characters; at most {MAX_TEXT}",
                             code="too_large")
        check_text(value, f"{table}.{col['name']}")
    return value


def check_text(s: str, what: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{what}: not valid Unicode text (a lone surrogate)", code="bad_type") from None
    return s
