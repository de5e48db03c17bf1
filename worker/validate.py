"""A client's request, checked completely before any of it is applied
(docs/protocol.md, "Validation").

`write(ops, defs)` checks a write against the protocol's grammar and against
the schema as it will stand when each operation runs (a write may create a
table and then fill it); `read(query, defs)` checks a read. Every field must be
present where the grammar needs it, known, of the right JSON type and within
range; every table and column must exist; every value must fit its column.
What comes back is the request in canonical form, which is all the store
applies:
  - names spelt the way the store keeps them (SQLite compares names without
    regard to case, so "Users" and "users" are one table);
  - every inserted row holding every column, missing ones taking their default
    or null, so rows with different keys lose nothing;
  - `$seq` specs as {"$seq": name, "start": n}, resolved by the store.

Only operations a client may send pass. Log-only operations (`setseq`, which
sets a sequence) reach the store through `Store.replay` alone.

Pure: it reads table definitions, never the database. What only the data can
tell (an `add` that would leave the 64-bit range, an exhausted sequence, a
unique key) the store checks inside the write's transaction.
"""
from __future__ import annotations

import math

from bus.errors import BadRequest, DBError

from . import schema
from .schema import INT64_MAX, INT64_MIN, check_text, check_value, fold

MAX_OPS = 1000         # operations in one write
MAX_ROWS = 1000        # rows in one insert
MAX_IN = 1000          # values of an `in`
MAX_WHERE = 64         # conditions in one where
MAX_ORDER = 16         # order_by entries
MAX_LIMIT = 10_000     # rows in one select
MAX_SEQ_NAME = 128
MAX_TAG = 128
WHERE_OPS = ("=", "!=", "<", "<=", ">", ">=", "in")
LOG_ONLY_OPS = ("setseq",)

WRITE_FIELDS = {
    "create_table": schema.TABLE_FIELDS,
    "insert": {"op", "table", "values", "rows", "expect", "tag"},
    "upsert": {"op", "table", "values", "expect", "tag"},
    "update": {"op", "table", "where", "set", "add", "expect", "tag"},
    "delete": {"op", "table", "where", "expect", "tag"},
    "require": {"op", "table", "where", "exists", "tag"},
    "clear": {"op", "tag"},
    "drop_tenant": {"op", "tenant"},   # the platform's only (the store refuses it from a tenant)
}
READ_FIELDS = {
    "select": {"op", "table", "columns", "where", "order_by", "limit"},
    "count": {"op", "table", "where"},
    "tables": {"op"},
    "storage": {"op"},   # bytes per tenant: the platform's only
}


class Catalog:
    """Table definitions looked up the way SQLite compares names."""

    def __init__(self, defs: dict[str, dict]):
        self.defs = {fold(d["table"]): d for d in defs.values()}
        self.objects: set[str] = set()
        for d in defs.values():
            self.objects |= schema.object_names(d)

    def get(self, name: str) -> dict | None:
        return self.defs.get(fold(name))

    def table(self, name) -> dict:
        d = self.get(name) if isinstance(name, str) else None
        if d is None:
            raise BadRequest(f"unknown table {name!r:.80}", code="unknown_table")
        return d

    def add(self, d: dict) -> None:
        self.defs[fold(d["table"])] = d
        self.objects |= schema.object_names(d)


class Table:
    """One table's definition with its columns by folded name."""

    def __init__(self, d: dict):
        self.d = d
        self.name = d["table"]
        self.cols = {fold(c["name"]): c for c in d["columns"]}

    def col(self, name) -> dict:
        c = self.cols.get(fold(name)) if isinstance(name, str) else None
        if c is None:
            raise BadRequest(f"unknown column {self.name}.{name!r:.80}", code="unknown_column")
        return c

    def value(self, col: dict, v, *, nullable: bool | None = None):
        return check_value(self.name, col, v, nullable=schema.nullable(self.d, col) if nullable is None else nullable)


# --- writes -------------------------------------------------------------------
def write(ops, defs: dict[str, dict]) -> list[dict]:
    """The write in canonical form, or BadRequest naming the failing op."""
    if not isinstance(ops, list) or not ops:
        raise BadRequest("a write is a non-empty list of operations")
    if len(ops) > MAX_OPS:
        raise BadRequest(f"a write holds at most {MAX_OPS} operations", code="too_large")
    cat = Catalog(defs)
    out = []
    for i, op in enumerate(ops):
        try:
            out.append(write_op(op, cat))
        except DBError as e:
            if e.op is None:
                e.op = i
            raise
    return out


def write_op(op, cat: Catalog) -> dict:
    if not isinstance(op, dict):
        raise BadRequest("each operation is an object with an 'op' field")
    kind = op.get("op")
    if kind in LOG_ONLY_OPS:
        raise BadRequest(f"{kind!r} is an operation of the replication log; clients cannot send it")
    fields = WRITE_FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise BadRequest(f"unknown operation {kind!r:.40}; a write takes {', '.join(WRITE_FIELDS)}")
    _known_fields(op, fields, kind)
    extra = _common(op)
    if kind == "create_table":
        return _create_table(op, cat)
    if kind == "clear":
        return {"op": "clear"}
    if kind == "drop_tenant":
        from bus.tenancy import InvalidName, check_tenant_name
        try:
            return {"op": "drop_tenant", "tenant": check_tenant_name(op.get("tenant"))}
        except InvalidName as exc:
            raise BadRequest(f"drop_tenant: {exc}") from None
    t = Table(cat.table(op.get("table")))
    if kind == "insert":
        return {"op": "insert", "table": t.name, "rows": _insert_rows(t, op), **extra}
    if kind == "upsert":
        values = _row(t, op.get("values"), "upsert values")
        missing = [k for k in t.d["primary_key"] if k not in values]
        if missing:
            raise BadRequest(f"upsert needs the whole primary key {t.d['primary_key']}; missing {missing}")
        return {"op": "upsert", "table": t.name, "values": values, **extra}
    if kind == "update":
        return {"op": "update", "table": t.name, "where": _where(t, op.get("where"), required=True),
                **_changes(t, op), **extra}
    if kind == "delete":
        return {"op": "delete", "table": t.name, "where": _where(t, op.get("where"), required=True), **extra}
    # require
    exists = op.get("exists", True)
    if not isinstance(exists, bool):
        raise BadRequest("require.exists must be true or false")
    return {"op": "require", "table": t.name, "where": _where(t, op.get("where")), "exists": exists, **extra}


def _known_fields(obj: dict, fields: set, what: str) -> None:
    extra = [k for k in obj if k not in fields]
    if extra:
        raise BadRequest(f"{what}: unknown field(s) {extra!r:.120}; it takes {sorted(fields)}")


def _common(op: dict) -> dict:
    """`tag` (the caller's label, returned with a failure) and `expect` (a rowcount)."""
    out = {}
    tag = op.get("tag")
    if tag is not None:
        if not isinstance(tag, str) or len(tag) > MAX_TAG:
            raise BadRequest(f"tag must be a string of at most {MAX_TAG} characters")
        out["tag"] = check_text(tag, "tag")
    exp = op.get("expect")
    if exp is not None:
        if not isinstance(exp, int) or isinstance(exp, bool) or not 0 <= exp <= INT64_MAX:
            raise BadRequest("expect must be a non-negative integer rowcount")
        out["expect"] = exp
    return out


def _create_table(op: dict, cat: Catalog) -> dict:
    d = schema.normalize({k: v for k, v in op.items() if k not in ("tag", "expect")})
    existing = cat.get(d["table"])
    if existing is not None:
        if not schema.same(existing, d):
            raise BadRequest(f"table {existing['table']!r} exists with another definition"
                             + ("" if existing["table"] == d["table"] else " (names are compared without regard to case)"),
                             code="schema_conflict")
        return {"op": "create_table", **existing}
    taken = schema.object_names(d) & cat.objects
    if taken:
        raise BadRequest(f"create_table {d['table']!r}: the name(s) {sorted(taken)} are taken by another table "
                         "or its indexes", code="schema_conflict")
    cat.add(d)
    return {"op": "create_table", **d}


def _row(t: Table, values, what: str) -> dict:
    """A row's given values, by canonical column name; `$seq` specs allowed."""
    if not isinstance(values, dict) or not values:
        raise BadRequest(f"{what} for {t.name} must be a non-empty object {{column: value}}")
    out = {}
    for k, v in values.items():
        col = t.col(k)
        if col["name"] in out:
            raise BadRequest(f"{what}: column {t.name}.{col['name']} is given twice")
        out[col["name"]] = _seq(t, col, v) if isinstance(v, dict) else t.value(col, v)
    return out


def _seq(t: Table, col: dict, spec: dict) -> dict:
    if "$seq" not in spec or set(spec) - {"$seq", "start"}:
        raise BadRequest(f"{t.name}.{col['name']}: an object value must be a sequence {{\"$seq\": name, \"start\": n}}",
                         code="bad_type")
    if col["type"] not in ("integer", "real"):
        raise BadRequest(f"{t.name}.{col['name']} is {col['type']}; a $seq gives integers", code="bad_type")
    name, start = spec["$seq"], spec.get("start", 1)
    if not isinstance(name, str) or not 0 < len(name) <= MAX_SEQ_NAME:
        raise BadRequest(f"$seq needs a sequence name of 1 to {MAX_SEQ_NAME} characters")
    check_text(name, "$seq")
    if not isinstance(start, int) or isinstance(start, bool):
        raise BadRequest("$seq start must be an integer")
    if not INT64_MIN <= start <= INT64_MAX:
        raise BadRequest("$seq start is outside the 64-bit integer range", code="out_of_range")
    return {"$seq": name, "start": start}


def _insert_rows(t: Table, op: dict) -> list[dict]:
    if ("values" in op) == ("rows" in op):
        raise BadRequest("insert takes either values (one row) or rows (a list of rows)")
    rows = [op["values"]] if "values" in op else op["rows"]
    if not isinstance(rows, list) or not 1 <= len(rows) <= MAX_ROWS:
        raise BadRequest(f"insert rows must be a list of 1 to {MAX_ROWS} objects")
    return [_full_row(t, _row(t, r, "insert values")) for r in rows]


def _full_row(t: Table, given: dict) -> dict:
    """Every column of the table: the given value, else the default, else null."""
    row = {}
    for c in t.d["columns"]:
        if c["name"] in given:
            row[c["name"]] = given[c["name"]]
            continue
        v = c.get("default")
        if v is None and not schema.nullable(t.d, c):
            raise BadRequest(f"{t.name}.{c['name']} may not be null, and the row gives no value", code="bad_type")
        row[c["name"]] = v
    return row


def _changes(t: Table, op: dict) -> dict:
    """An update's `set` and `add`."""
    out: dict = {}
    sets, adds = op.get("set"), op.get("add")
    if sets is not None:
        if not isinstance(sets, dict):
            raise BadRequest("set must be an object {column: value}")
        out["set"] = {}
        for k, v in sets.items():
            col = t.col(k)
            if col["name"] in out["set"]:
                raise BadRequest(f"set: column {t.name}.{col['name']} is given twice")
            out["set"][col["name"]] = t.value(col, v)
    if adds is not None:
        if not isinstance(adds, dict):
            raise BadRequest("add must be an object {column: number}")
        out["add"] = {}
        for k, v in adds.items():
            col = t.col(k)
            name = col["name"]
            if col["type"] not in ("integer", "real"):
                raise BadRequest(f"add needs a numeric column; {t.name}.{name} is {col['type']}", code="bad_type")
            if name in out["add"] or name in out.get("set", {}):
                raise BadRequest(f"update: column {t.name}.{name} is changed twice")
            out["add"][name] = t.value(col, v, nullable=False)
    if not out.get("set") and not out.get("add"):
        raise BadRequest("update needs set or add, with at least one column")
    return {k: v for k, v in out.items() if v}


def _where(t: Table, where, *, required: bool = False) -> list:
    if where is None and not required:
        return []
    if not isinstance(where, list):
        raise BadRequest("where must be a list of [column, operator, value] (an empty list matches every row)")
    if len(where) > MAX_WHERE:
        raise BadRequest(f"where holds at most {MAX_WHERE} conditions", code="too_large")
    out = []
    for cond in where:
        if not isinstance(cond, list) or len(cond) != 3:
            raise BadRequest("each where condition is [column, operator, value]")
        cname, oper, value = cond
        col = t.col(cname)
        if not isinstance(oper, str) or oper not in WHERE_OPS:
            raise BadRequest(f"operator {oper!r:.40} is not one of {list(WHERE_OPS)}")
        if oper == "in":
            if not isinstance(value, list) or len(value) > MAX_IN:
                raise BadRequest(f"'in' takes a list of at most {MAX_IN} values")
            value = [t.value(col, v, nullable=False) for v in value]
        elif value is None and oper not in ("=", "!="):
            raise BadRequest(f"null compares only with = and != (IS NULL, IS NOT NULL), not {oper}", code="bad_type")
        elif value is not None:
            t.value(col, value, nullable=False)
        out.append([col["name"], oper, value])
    return out


# --- reads ----------------------------------------------------------------------
def read(q, defs: dict[str, dict]) -> dict:
    """The read in canonical form, or BadRequest."""
    if not isinstance(q, dict):
        raise BadRequest("a read is an object with an 'op' field")
    kind = q.get("op")
    fields = READ_FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise BadRequest(f"unknown read operation {kind!r:.40} ({', '.join(READ_FIELDS)})")
    _known_fields(q, fields, kind)
    if kind in ("tables", "storage"):
        return {"op": kind}
    t = Table(Catalog(defs).table(q.get("table")))
    out = {"op": kind, "table": t.name, "where": _where(t, q.get("where"))}
    if kind == "count":
        return out
    cols = q.get("columns")
    if cols is not None:
        if not isinstance(cols, list) or not cols:
            raise BadRequest("columns must be a non-empty list of column names")
        names: list[str] = []
        for c in cols:
            n = t.col(c)["name"]
            if n not in names:
                names.append(n)
        out["columns"] = names
    order = q.get("order_by")
    if order is not None:
        if not isinstance(order, list) or len(order) > MAX_ORDER:
            raise BadRequest(f"order_by must be a list of at most {MAX_ORDER} [column, 'asc'|'desc']")
        out["order_by"] = []
        for ob in order:
            if isinstance(ob, str):
                ob = [ob, "asc"]
            if not isinstance(ob, list) or len(ob) != 2 or ob[1] not in ("asc", "desc"):
                raise BadRequest("order_by entries are [column, 'asc'|'desc']")
            out["order_by"].append([t.col(ob[0])["name"], ob[1]])
    limit = q.get("limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit <= MAX_LIMIT):
        raise BadRequest(f"limit must be an integer from 0 to {MAX_LIMIT}")
    out["limit"] = MAX_LIMIT if limit is None else limit
    return out


def finite_or_none(v):
    """A stored value as JSON can carry it: a non-finite real (stored before
    they were refused) reads as null."""
    return None if isinstance(v, float) and not math.isfinite(v) else v
