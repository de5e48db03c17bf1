"""Builders for the structured operations of the wire protocol. Clients never
send SQL; they send these dicts (docs/protocol.md lists every field).

    db.write([ops.require("users", [eq("username", "bob")], tag="no_user"),
              ops.insert("members", {"ride_id": 7, "username": "bob"})])
"""
from __future__ import annotations

from typing import Any, Iterable

Where = list  # [[column, operator, value], ...], ANDed


def eq(col: str, value: Any) -> list:
    return [col, "=", value]


def where(*conds: list) -> Where:
    return [list(c) for c in conds]


def column(name: str, type_: str, *, nullable: bool = True, default: Any = None) -> dict:
    d: dict = {"name": name, "type": type_, "nullable": nullable}
    if default is not None:
        d["default"] = default
    return d


def create_table(table: str, columns: list[dict], primary_key: Iterable[str],
                 unique: Iterable[Iterable[str]] = (), indexes: Iterable[Iterable[str]] = ()) -> dict:
    return {"op": "create_table", "table": table, "columns": columns, "primary_key": list(primary_key),
            "unique": [list(u) for u in unique], "indexes": [list(i) for i in indexes]}


def seq(name: str, start: int = 1) -> dict:
    """A value taken from a named sequence inside the write (gap-free, never reused)."""
    return {"$seq": name, "start": start}


def _with(op: dict, expect: int | None, tag: str | None) -> dict:
    if expect is not None:
        op["expect"] = expect
    if tag is not None:
        op["tag"] = tag
    return op


def insert(table: str, values: dict, *, expect: int | None = None, tag: str | None = None) -> dict:
    return _with({"op": "insert", "table": table, "values": values}, expect, tag)


def insert_many(table: str, rows: list[dict], *, tag: str | None = None) -> dict:
    return _with({"op": "insert", "table": table, "rows": rows}, None, tag)


def upsert(table: str, values: dict, *, tag: str | None = None) -> dict:
    return _with({"op": "upsert", "table": table, "values": values}, None, tag)


def update(table: str, where: Where, *, set: dict | None = None, add: dict | None = None,
           expect: int | None = None, tag: str | None = None) -> dict:
    op: dict = {"op": "update", "table": table, "where": where}
    if set:
        op["set"] = set
    if add:
        op["add"] = add
    return _with(op, expect, tag)


def delete(table: str, where: Where, *, expect: int | None = None, tag: str | None = None) -> dict:
    return _with({"op": "delete", "table": table, "where": where}, expect, tag)


def require(table: str, where: Where, *, exists: bool = True, tag: str | None = None) -> dict:
    """A precondition: rows matching `where` exist (or, with exists=False, do not)."""
    return _with({"op": "require", "table": table, "where": where, "exists": exists}, None, tag)


def clear() -> dict:
    """Empty every tenant table (sequences keep counting, so ids are never reused)."""
    return {"op": "clear"}


def select(table: str, where: Where = (), *, columns: list[str] | None = None,
           order_by: list | None = None, limit: int | None = None) -> dict:
    q: dict = {"op": "select", "table": table, "where": list(where)}
    if columns:
        q["columns"] = columns
    if order_by:
        q["order_by"] = order_by
    if limit is not None:
        q["limit"] = limit
    return q


def count(table: str, where: Where = ()) -> dict:
    return {"op": "count", "table": table, "where": list(where)}
