"""A worker's store: SQLAlchemy Core over an embedded SQLite file in WAL mode
by default (any SQLAlchemy URL works). It applies structured operations; it
never takes SQL from a client.

Bookkeeping tables, next to the tenant tables:
  _stratus_meta      applied LSN, term, stream offset: committed with the data
  _stratus_tables    each table's definition, so the schema survives restarts
  _stratus_seq       named sequences ($seq): gap-free, never reused
  _stratus_requests  request id -> (LSN, result): a write redelivered after a
                     crash is answered from here instead of applied twice
"""
from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError, OperationalError, StatementError

from bus.errors import BadRequest, ConstraintViolation, DBError, PreconditionFailed

from . import schema

log = logging.getLogger("stratus.store")

WHERE_OPS = {"=", "!=", "<", "<=", ">", ">=", "in"}
MAX_LIMIT = 10_000
DEDUP_KEEP = 200_000  # request ids remembered, counted in LSNs


class Store:
    def __init__(self, url: str):
        self.url = url
        is_sqlite = url.startswith("sqlite")
        self.engine = sa.create_engine(url, connect_args={"check_same_thread": False} if is_sqlite else {},
                                       poolclass=sa.pool.StaticPool if is_sqlite else None)
        if is_sqlite:
            @event.listens_for(self.engine, "connect")
            def _connect(dbapi_conn, _rec):
                # WAL: readers never block the applier; NORMAL: no fsync per commit
                # (the durable copy of every write is the replication log).
                dbapi_conn.isolation_level = None  # let SQLAlchemy emit BEGIN, so SAVEPOINT works
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()

            @event.listens_for(self.engine, "begin")
            def _begin(conn):
                conn.exec_driver_sql("BEGIN")

        self.meta = sa.MetaData()
        self.t_meta = sa.Table("_stratus_meta", self.meta, sa.Column("key", sa.String(64), primary_key=True),
                               sa.Column("value", sa.Text))
        self.t_tables = sa.Table("_stratus_tables", self.meta, sa.Column("name", sa.String(64), primary_key=True),
                                 sa.Column("definition", sa.Text, nullable=False))
        self.t_seq = sa.Table("_stratus_seq", self.meta, sa.Column("name", sa.String(128), primary_key=True),
                              sa.Column("value", sa.BigInteger, nullable=False))
        self.t_req = sa.Table("_stratus_requests", self.meta, sa.Column("id", sa.String(128), primary_key=True),
                              sa.Column("lsn", sa.BigInteger, nullable=False, index=True),
                              sa.Column("result", sa.Text))
        self.meta.create_all(self.engine)
        self.tables: dict[str, sa.Table] = {}
        self.defs: dict[str, dict] = {}
        self.conn = self.engine.connect()
        with self.conn.begin():
            for name, definition in self.conn.execute(sa.select(self.t_tables.c.name, self.t_tables.c.definition)):
                d = json.loads(definition)
                self.defs[name] = d
                self.tables[name] = schema.build(self.meta, d)
            m = dict(self.conn.execute(sa.select(self.t_meta.c.key, self.t_meta.c.value)).all())
        self.applied_lsn = int(m.get("applied_lsn", 0))
        self.term = int(m.get("term", 0))
        self.stream_offset = int(m["stream_offset"]) if m.get("stream_offset") not in (None, "") else None

    def close(self) -> None:
        self.conn.close()
        self.engine.dispose()

    # --- transactions -----------------------------------------------------
    @contextmanager
    def transaction(self):
        """One transaction; bookkeeping (LSN, term, offset) is saved in it."""
        tx = self.conn.begin()
        saved = (self.applied_lsn, self.term, self.stream_offset, dict(self.defs))
        try:
            yield
            self._save_meta()
            tx.commit()
        except BaseException:
            tx.rollback()
            self.applied_lsn, self.term, self.stream_offset, defs = saved
            self._forget_tables_not_in(defs)
            raise

    def _forget_tables_not_in(self, defs: dict) -> None:
        for name in list(self.defs):
            if name not in defs:
                self.defs.pop(name)
                t = self.tables.pop(name)
                self.meta.remove(t)

    def _save_meta(self) -> None:
        rows = {"applied_lsn": str(self.applied_lsn), "term": str(self.term),
                "stream_offset": "" if self.stream_offset is None else str(self.stream_offset)}
        for k, v in rows.items():
            if self.conn.execute(sa.update(self.t_meta).where(self.t_meta.c.key == k).values(value=v)).rowcount == 0:
                self.conn.execute(sa.insert(self.t_meta).values(key=k, value=v))

    # --- writes -----------------------------------------------------------
    def seen(self, request_id: str) -> tuple[int, Any] | None:
        """(LSN, result) of a write already applied under this request id."""
        stmt = sa.select(self.t_req.c.lsn, self.t_req.c.result).where(self.t_req.c.id == request_id)
        if self.conn.in_transaction():
            row = self.conn.execute(stmt).first()
        else:
            with self.conn.begin():
                row = self.conn.execute(stmt).first()
        return (row[0], json.loads(row[1]) if row[1] else None) if row else None

    def apply_request(self, ops: list, lsn: int, request_id: str) -> tuple[list, list]:
        """Apply a client's write (inside a transaction), checking every
        precondition. Returns (results, resolved ops for the log). On any error
        the savepoint is rolled back and nothing of this write remains."""
        if not isinstance(ops, list) or not ops:
            raise BadRequest("a write is a non-empty list of operations")
        if len(ops) > 1000:
            raise BadRequest("a write holds at most 1000 operations")
        sp = self.conn.begin_nested()
        defs_before = dict(self.defs)
        try:
            results, resolved = [], []
            for i, op in enumerate(ops):
                try:
                    res, logged = self._apply(op, replay=False)
                except DBError as e:
                    if e.op is None:
                        e.op = i
                    raise
                results.append(res)
                resolved.extend(logged)
            self._remember(request_id, lsn, results)
            sp.commit()
            return results, resolved
        except IntegrityError as exc:
            sp.rollback()
            self._forget_tables_not_in(defs_before)
            raise ConstraintViolation(f"constraint violated: {_short(exc)}") from None
        except (OperationalError, StatementError) as exc:
            sp.rollback()
            self._forget_tables_not_in(defs_before)
            raise BadRequest(f"the database refused the write: {_short(exc)}") from None
        except BaseException:
            sp.rollback()
            self._forget_tables_not_in(defs_before)
            raise

    def replay(self, ops: list, request_id: str | None, lsn: int, result) -> None:
        """Apply resolved ops from the log (inside a transaction). No
        precondition is checked again: the master already did."""
        for op in ops:
            self._apply(op, replay=True)
        if request_id:
            self._remember(request_id, lsn, result)

    def _remember(self, request_id: str, lsn: int, result) -> None:
        self.conn.execute(sa.insert(self.t_req).values(id=request_id, lsn=lsn, result=json.dumps(result)))
        if lsn % 1000 == 0:
            self.conn.execute(sa.delete(self.t_req).where(self.t_req.c.lsn < lsn - DEDUP_KEEP))

    def _table(self, name) -> sa.Table:
        if not isinstance(name, str) or name not in self.tables:
            raise BadRequest(f"unknown table {name!r}", code="unknown_table")
        return self.tables[name]

    def _col(self, tname: str, cname) -> dict:
        for c in self.defs[tname]["columns"]:
            if c["name"] == cname:
                return c
        raise BadRequest(f"unknown column {tname}.{cname}", code="unknown_column")

    def _values(self, tname: str, values, *, resolve: bool) -> tuple[dict, list]:
        if not isinstance(values, dict) or not values:
            raise BadRequest(f"values for {tname} must be a non-empty object")
        out, seq_ops = {}, []
        for k, v in values.items():
            col = self._col(tname, k)
            if isinstance(v, dict) and "$seq" in v and resolve:
                v, seq_op = self._next_seq(v)
                seq_ops.append(seq_op)
            out[k] = schema.check_value(tname, col, v)
        return out, seq_ops

    def _next_seq(self, spec: dict) -> tuple[int, dict]:
        name, start = spec.get("$seq"), spec.get("start", 1)
        if not isinstance(name, str) or not name or len(name) > 128:
            raise BadRequest("$seq needs a sequence name")
        if not isinstance(start, int) or isinstance(start, bool):
            raise BadRequest("$seq start must be an integer")
        cur = self.conn.execute(sa.select(self.t_seq.c.value).where(self.t_seq.c.name == name)).scalar()
        value = start if cur is None else cur + 1
        self._set_seq(name, value)
        return value, {"op": "setseq", "name": name, "value": value}

    def _set_seq(self, name: str, value: int) -> None:
        if self.conn.execute(sa.update(self.t_seq).where(self.t_seq.c.name == name).values(value=value)).rowcount == 0:
            self.conn.execute(sa.insert(self.t_seq).values(name=name, value=value))

    def _where(self, tname: str, table: sa.Table, where) -> list:
        if where is None:
            return []
        if not isinstance(where, list):
            raise BadRequest("where must be a list of [column, operator, value]")
        clauses = []
        for cond in where:
            if not isinstance(cond, list) or len(cond) != 3:
                raise BadRequest("each where clause is [column, operator, value]")
            cname, oper, value = cond
            col = self._col(tname, cname)
            if oper not in WHERE_OPS:
                raise BadRequest(f"operator {oper!r} is not one of {sorted(WHERE_OPS)}")
            c = table.c[cname]
            if oper == "in":
                if not isinstance(value, list) or len(value) > 1000:
                    raise BadRequest("'in' takes a list of at most 1000 values")
                for v in value:
                    schema.check_value(tname, {**col, "nullable": False}, v)
                clauses.append(c.in_(value))
                continue
            if value is None and oper in ("=", "!="):
                clauses.append(c.is_(None) if oper == "=" else c.is_not(None))
                continue
            schema.check_value(tname, {**col, "nullable": False}, value)
            clauses.append({"=": c == value, "!=": c != value, "<": c < value, "<=": c <= value,
                            ">": c > value, ">=": c >= value}[oper])
        return clauses

    def _expect(self, op: dict, rowcount: int, replay: bool) -> None:
        exp = op.get("expect")
        if exp is None or replay:
            return
        if not isinstance(exp, int) or isinstance(exp, bool):
            raise BadRequest("expect must be an integer rowcount")
        if rowcount != exp:
            raise PreconditionFailed(f"{op.get('op')} on {op.get('table')} touched {rowcount} rows, expected {exp}",
                                     tag=op.get("tag"))

    def _apply(self, op, *, replay: bool) -> tuple[dict, list]:
        """Apply one operation; returns (result, ops to log)."""
        if not isinstance(op, dict):
            raise BadRequest("each operation is an object with an 'op' field")
        kind = op.get("op")
        if kind == "create_table":
            return self._create_table(op)
        if kind == "setseq":
            self._set_seq(op["name"], op["value"])
            return {}, [op]
        if kind == "clear":
            for t in self.tables.values():
                self.conn.execute(sa.delete(t))
            return {}, [{"op": "clear"}]
        tname = op.get("table")
        table = self._table(tname)
        if kind == "insert":
            rows = op.get("rows") if "rows" in op else [op.get("values")]
            if not isinstance(rows, list) or not rows or len(rows) > 1000:
                raise BadRequest("insert takes values, or rows: a list of 1 to 1000 objects")
            resolved_rows, seq_ops = [], []
            for r in rows:
                vals, s = self._values(tname, r, resolve=not replay)
                resolved_rows.append(vals)
                seq_ops.extend(s)
            self.conn.execute(sa.insert(table), resolved_rows)
            self._expect(op, len(resolved_rows), replay)
            result = {"rowcount": len(resolved_rows), "values": resolved_rows[0] if len(resolved_rows) == 1 else resolved_rows}
            return result, seq_ops + [{"op": "insert", "table": tname, "rows": resolved_rows}]
        if kind == "update":
            clauses = self._where(tname, table, op.get("where"))
            sets, _ = self._values(tname, op["set"], resolve=False) if op.get("set") else ({}, [])
            adds = op.get("add") or {}
            if not isinstance(adds, dict):
                raise BadRequest("add must be an object {column: number}")
            values: dict = dict(sets)
            for k, v in adds.items():
                col = self._col(tname, k)
                if col["type"] not in ("integer", "real"):
                    raise BadRequest(f"add needs a numeric column; {tname}.{k} is {col['type']}", code="bad_type")
                schema.check_value(tname, {**col, "nullable": False}, v)
                values[k] = table.c[k] + v
            if not values:
                raise BadRequest("update needs set or add")
            rc = self.conn.execute(sa.update(table).where(*clauses).values(**values)).rowcount
            self._expect(op, rc, replay)
            logged = {"op": "update", "table": tname, "where": op.get("where") or []}
            if sets:
                logged["set"] = sets
            if adds:
                logged["add"] = adds
            return {"rowcount": rc}, [logged]
        if kind == "delete":
            clauses = self._where(tname, table, op.get("where"))
            rc = self.conn.execute(sa.delete(table).where(*clauses)).rowcount
            self._expect(op, rc, replay)
            return {"rowcount": rc}, [{"op": "delete", "table": tname, "where": op.get("where") or []}]
        if kind == "upsert":
            vals, seq_ops = self._values(tname, op.get("values"), resolve=not replay)
            pk = self.defs[tname]["primary_key"]
            if any(k not in vals for k in pk):
                raise BadRequest(f"upsert needs the whole primary key {pk}")
            key = [table.c[k] == vals[k] for k in pk]
            rest = {k: v for k, v in vals.items() if k not in pk}
            rc = self.conn.execute(sa.update(table).where(*key).values(**rest)).rowcount if rest else \
                len(self.conn.execute(sa.select(*[table.c[k] for k in pk]).where(*key)).all())
            if rc == 0:
                self.conn.execute(sa.insert(table).values(**vals))
            return {"rowcount": 1, "values": vals}, seq_ops + [{"op": "upsert", "table": tname, "values": vals}]
        if kind == "require":
            clauses = self._where(tname, table, op.get("where"))
            exists = op.get("exists", True)
            if not isinstance(exists, bool):
                raise BadRequest("require.exists must be true or false")
            found = self.conn.execute(sa.select(sa.literal(1)).select_from(table).where(*clauses).limit(1)).first() is not None
            if found != exists and not replay:
                what = "no row" if exists else "a row"
                raise PreconditionFailed(f"require failed: {what} in {tname} matches {op.get('where')}", tag=op.get("tag"))
            return {"found": found}, []
        raise BadRequest(f"unknown operation {kind!r}")

    def _create_table(self, op: dict) -> tuple[dict, list]:
        d = schema.normalize(op)
        name = d["table"]
        if name in self.defs:
            if self.defs[name] != d:
                raise BadRequest(f"table {name!r} exists with another definition")
            return {"created": False}, []
        table = schema.build(self.meta, d)
        table.create(self.conn, checkfirst=True)
        self.conn.execute(sa.insert(self.t_tables).values(name=name, definition=json.dumps(d)))
        self.defs[name] = d
        self.tables[name] = table
        return {"created": True}, [{"op": "create_table", **d}]

    # --- reads ------------------------------------------------------------
    def read(self, q) -> Any:
        """Run one query in its own short read transaction."""
        with self.conn.begin():
            return self._read(q)

    def _read(self, q) -> Any:
        if not isinstance(q, dict):
            raise BadRequest("a read is an object with an 'op' field")
        kind = q.get("op")
        if kind == "tables":
            return sorted(self.defs)
        if kind not in ("select", "count"):
            raise BadRequest(f"unknown read operation {kind!r} (select, count, tables)")
        tname = q.get("table")
        table = self._table(tname)
        clauses = self._where(tname, table, q.get("where"))
        if kind == "count":
            return self.conn.execute(sa.select(sa.func.count()).select_from(table).where(*clauses)).scalar()
        cols = q.get("columns")
        if cols is None:
            sel_cols = list(table.c)
        else:
            if not isinstance(cols, list) or not cols:
                raise BadRequest("columns must be a non-empty list")
            for c in cols:
                self._col(tname, c)
            sel_cols = [table.c[c] for c in cols]
        stmt = sa.select(*sel_cols).where(*clauses)
        for ob in q.get("order_by") or []:
            if isinstance(ob, str):
                ob = [ob, "asc"]
            if not isinstance(ob, list) or len(ob) != 2 or ob[1] not in ("asc", "desc"):
                raise BadRequest("order_by entries are [column, 'asc'|'desc']")
            self._col(tname, ob[0])
            stmt = stmt.order_by(table.c[ob[0]].asc() if ob[1] == "asc" else table.c[ob[0]].desc())
        limit = q.get("limit")
        if limit is not None:
            if not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit <= MAX_LIMIT:
                raise BadRequest(f"limit must be an integer from 0 to {MAX_LIMIT}")
            stmt = stmt.limit(limit)
        else:
            stmt = stmt.limit(MAX_LIMIT)
        return [dict(r._mapping) for r in self.conn.execute(stmt)]

    def checksum(self) -> dict[str, str]:
        """sha256 of every tenant table's rows in primary-key order (tests compare workers)."""
        out = {}
        with self.conn.begin():
            for name, t in sorted(self.tables.items()):
                h = hashlib.sha256()
                pk = [t.c[c] for c in self.defs[name]["primary_key"]]
                for r in self.conn.execute(sa.select(t).order_by(*pk)):
                    h.update(json.dumps(list(r), default=str).encode())
                out[name] = h.hexdigest()
        return out


def _short(exc: Exception) -> str:
    msg = str(getattr(exc, "orig", exc)).splitlines()[0]
    return msg[:200]
