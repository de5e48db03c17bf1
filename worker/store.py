"""A worker's store: SQLAlchemy Core over an embedded SQLite file in WAL mode
by default (any SQLAlchemy URL works). It applies structured operations; it
never takes SQL from a client.

Bookkeeping tables, next to the tenant tables:
  _stratus_meta      applied LSN, term, stream offset: committed with the data
  _stratus_tables    each table's definition, so the schema survives restarts
  _stratus_seq       named sequences ($seq): gap-free, never reused
  _stratus_requests  request id -> (LSN, result, applied_at), written in the
                     write's own transaction and kept for `dedup_retention`
                     seconds: a write redelivered after a crash, or retried by
                     its client within that window, is answered from here
                     instead of applied twice. Replicas keep it too (they may
                     be promoted).

Tenants: every request is made for one tenant (the worker takes it from the
broker-validated user_id), and is checked and resolved inside that tenant's
namespace alone (worker/namespace.py): its tables, its sequences, its `clear`.
`drop_tenant` and the `storage` read are the platform's. A tenant past its
storage quota can read and delete, not write.

A client's write (`apply_request`) and read (`read`) are first checked whole
by worker/validate.py, then applied under a savepoint. Whatever the request
causes ends as a DBError (the savepoint rolled back, nothing of it left); only
a failure of the store's own machinery (its file: I/O error, full, corrupt,
read-only, locked) propagates as it is, so the worker can stop. The log's
resolved operations (`replay`) are applied without checks: the master made
them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import sqlite3
import time
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc

from bus.errors import BadRequest, ConstraintViolation, DBError, Forbidden, PreconditionFailed, QuotaExceeded
from bus.tenancy import PLATFORM

from . import namespace, schema, validate
from .schema import INT64_MAX, INT64_MIN, fold

log = logging.getLogger("stratus.store")

DEDUP_RETENTION = 86400.0   # seconds a request id is remembered (settings.dedup_retention)
PRUNE_EVERY = 5.0           # seconds between prunes of expired request ids
PRUNE_BATCH = 10_000        # request ids deleted by one prune at most
USAGE_EVERY = 5.0           # seconds a tenant's measured storage is trusted before measuring again
GROWING_OPS = frozenset({"create_table", "insert", "upsert", "update"})   # refused past the storage quota
MAX_MESSAGE = 200           # characters of a database message quoted in an error
# SQLite result codes that mean the store itself failed, not the request
# (https://www.sqlite.org/rescode.html); extended codes share the prefix.
MACHINERY_CODES = ("SQLITE_IOERR", "SQLITE_FULL", "SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_READONLY",
                   "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_CANTOPEN", "SQLITE_PROTOCOL", "SQLITE_NOMEM",
                   "SQLITE_PERM", "SQLITE_INTERNAL", "SQLITE_NOLFS", "SQLITE_AUTH", "SQLITE_MISUSE")


class Store:
    def __init__(self, url: str, *, dedup_retention: float = DEDUP_RETENTION, clock=time.time,
                 storage_quota: int | None = None):
        self.url = url
        self.storage_quota = storage_quota     # bytes per tenant (None: no quota); not the platform's
        self._usage: dict[str, tuple[int, float]] = {}   # tenant -> (bytes, measured at)
        self.dedup_retention = dedup_retention
        self.clock = clock
        self._pruned_at = 0.0
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
                              sa.Column("lsn", sa.BigInteger, nullable=False),
                              sa.Column("result", sa.Text),
                              sa.Column("applied_at", sa.Float))
        self.ix_req_age = sa.Index("ix__stratus_requests_applied_at", self.t_req.c.applied_at)
        self.meta.create_all(self.engine)
        self._migrate()
        self.tables: dict[str, sa.Table] = {}   # canonical name -> table
        self.defs: dict[str, dict] = {}          # canonical name -> definition
        self.names: dict[str, str] = {}          # folded name -> canonical name
        self.conn = self.engine.connect()
        with self.conn.begin():
            q = sa.select(self.t_tables.c.name, self.t_tables.c.definition)
            rows = self.conn.execute(q.order_by(sa.literal_column("rowid")) if is_sqlite else q).all()  # oldest first
            for name, definition in rows:
                if fold(name) in self.names:
                    # Made before names were compared as SQLite compares them:
                    # it is the same SQLite table as the first, read through it.
                    log.warning("table %r is %r under another spelling; using %r", name, self.names[fold(name)],
                                self.names[fold(name)])
                    continue
                self._register({**json.loads(definition), "table": name})
            m = dict(self.conn.execute(sa.select(self.t_meta.c.key, self.t_meta.c.value)).all())
        self.applied_lsn = int(m.get("applied_lsn", 0))
        self.term = int(m.get("term", 0))
        self.cluster_id = str(m.get("cluster_id") or "")   # the cluster identity its log's barriers carry
        self.term_master = str(m.get("term_master") or "")   # who wrote the barrier of `term` ("" unknown)
        self.stream_offset = int(m["stream_offset"]) if m.get("stream_offset") not in (None, "") else None

    def _migrate(self) -> None:
        """A store made by an earlier version: request ids had no applied_at."""
        cols = {c["name"] for c in sa.inspect(self.engine).get_columns("_stratus_requests")}
        with self.engine.begin() as c:
            if "applied_at" not in cols:
                log.info("migrating _stratus_requests: adding applied_at (request ids kept from now)")
                c.exec_driver_sql("ALTER TABLE _stratus_requests ADD COLUMN applied_at FLOAT")
                c.execute(sa.update(self.t_req).values(applied_at=self.clock()))
            self.ix_req_age.create(c, checkfirst=True)

    def _register(self, d: dict) -> None:
        name = d["table"]
        self.defs[name] = d
        self.tables[name] = schema.build(sa.MetaData(), d)   # one MetaData per table: nothing stale is left
        self.names[fold(name)] = name

    def close(self) -> None:
        self.conn.close()
        self.engine.dispose()

    # --- transactions -----------------------------------------------------
    @contextmanager
    def transaction(self):
        """One transaction; bookkeeping (LSN, term, offset) is saved in it."""
        tx = self.conn.begin()
        saved = (self.applied_lsn, self.term, self.stream_offset, dict(self.defs), self.cluster_id, self.term_master)
        try:
            yield
            self._save_meta()
            tx.commit()
        except BaseException:
            self.applied_lsn, self.term, self.stream_offset, defs, self.cluster_id, self.term_master = saved
            self._forget_tables_not_in(defs)
            tx.rollback()
            raise

    def _forget_tables_not_in(self, defs: dict) -> None:
        """Back to the tables of `defs` after a rollback: forget the ones made
        since, and know again the ones dropped since."""
        for name in list(self.defs):
            if name not in defs:
                self.defs.pop(name)
                self.tables.pop(name)
                self.names.pop(fold(name))
        for name, d in defs.items():
            if name not in self.defs:
                self._register(d)

    def _save_meta(self) -> None:
        rows = {"applied_lsn": str(self.applied_lsn), "term": str(self.term), "cluster_id": self.cluster_id,
                "term_master": self.term_master,
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

    def apply_request(self, ops: list, lsn: int, request_id: str, tenant: str = PLATFORM) -> tuple[list, list]:
        """Apply a client's write for `tenant` (inside a transaction),
        checking it whole first and every precondition as it goes. Returns
        (results, resolved ops for the log, with physical names). On any
        error the savepoint is rolled back, nothing of this write remains, and
        the error is a DBError, unless the store's machinery failed: that
        propagates as it is."""
        defs_before = dict(self.defs)
        sp, at = None, None
        try:
            checked = namespace.scope(validate.write(ops, namespace.view(self.defs, tenant)), tenant)
            self._check_tenant_write(checked, tenant)
            sp = self.conn.begin_nested()
            results, resolved = [], []
            for at, op in enumerate(checked):
                res, logged = self._apply(op, replay=False)
                results.append(res)
                resolved.extend(logged)
            at = None
            self._remember(request_id, lsn, results)
            sp.commit()
            return results, resolved
        except BaseException as exc:
            self._forget_tables_not_in(defs_before)
            if sp is not None and sp.is_active:
                sp.rollback()   # if this fails, the store is broken: that propagates instead
            err = request_error(exc, "write")
            if err is None:
                raise
            if err.op is None:
                err.op = at
            raise err from None

    def _check_tenant_write(self, checked: list[dict], tenant: str) -> None:
        if tenant != PLATFORM and any(op["op"] == "drop_tenant" for op in checked):
            raise Forbidden("drop_tenant is the platform's operation")
        if (self.storage_quota is not None and tenant != PLATFORM
                and any(op["op"] in GROWING_OPS for op in checked)):
            used = self.usage(tenant)
            if used >= self.storage_quota:
                raise QuotaExceeded(f"tenant {tenant} uses {used} bytes of its {self.storage_quota}-byte storage "
                                    "quota: nothing was written (reads and deletes still work)")

    def usage(self, tenant: str) -> int:
        """Bytes the tenant's tables and indexes take, measured at most every
        USAGE_EVERY seconds (a quota can be passed by what is written meanwhile)."""
        now = self.clock()
        cached = self._usage.get(tenant)
        if cached is not None and now - cached[1] < USAGE_EVERY:
            return cached[0]
        measured = self.storage()   # one scan measures every tenant: keep them all
        for t, used in measured.items():
            self._usage[t] = (used, now)
        self._usage[tenant] = (measured.get(tenant, 0), now)
        return self._usage[tenant][0]

    def storage(self) -> dict[str, int]:
        """Bytes per tenant: SQLite's pages of each tenant's tables and indexes (dbstat)."""
        out: dict[str, int] = {}
        rows = self.conn.exec_driver_sql("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name").all()
        for name, size in rows:
            owner = namespace.owner_of_object(name)
            if owner is not None:
                out[owner] = out.get(owner, 0) + int(size or 0)
        return out

    def replay(self, ops: list, request_id: str | None, lsn: int, result) -> None:
        """Apply resolved ops from the log (inside a transaction). No
        precondition is checked again: the master already did."""
        for op in ops:
            self._apply(op, replay=True)
        if request_id:
            self._remember(request_id, lsn, result)

    def _remember(self, request_id: str, lsn: int, result) -> None:
        now = self.clock()
        # An id seen again after its window lapsed is a new write: replace the old record.
        self.conn.execute(sa.delete(self.t_req).where(self.t_req.c.id == request_id))
        self.conn.execute(sa.insert(self.t_req).values(id=request_id, lsn=lsn, result=json.dumps(result),
                                                       applied_at=now))
        if now - self._pruned_at >= PRUNE_EVERY:
            self._pruned_at = now
            self.prune(now)

    def prune(self, now: float | None = None) -> int:
        """Forget request ids older than the retention window (a bounded batch)."""
        cutoff = (self.clock() if now is None else now) - self.dedup_retention
        old = sa.select(self.t_req.c.id).where(sa.or_(self.t_req.c.applied_at < cutoff,
                                                      self.t_req.c.applied_at.is_(None))).limit(PRUNE_BATCH)
        return self.conn.execute(sa.delete(self.t_req).where(self.t_req.c.id.in_(old.scalar_subquery()))).rowcount

    def _table(self, name: str) -> tuple[str, sa.Table]:
        canonical = self.names.get(fold(name)) if isinstance(name, str) else None
        if canonical is None:
            raise BadRequest(f"unknown table {name!r:.80}", code="unknown_table")
        return canonical, self.tables[canonical]

    def _column(self, tname: str, name: str) -> dict:
        for c in self.defs[tname]["columns"]:
            if fold(c["name"]) == fold(name):
                return c
        raise BadRequest(f"unknown column {tname}.{name!r:.80}", code="unknown_column")

    @staticmethod
    def _c(table: sa.Table, name: str) -> sa.Column:
        """A column by its canonical name (the log of an earlier version may spell it otherwise)."""
        if name in table.c:
            return table.c[name]
        return next(c for c in table.c if fold(c.name) == fold(name))

    def _resolve_seqs(self, row: dict) -> tuple[dict, list]:
        out, seq_ops = {}, []
        for k, v in row.items():
            if isinstance(v, dict):
                v, seq_op = self._next_seq(v)
                seq_ops.append(seq_op)
            out[k] = v
        return out, seq_ops

    def _next_seq(self, spec: dict) -> tuple[int, dict]:
        name, start = spec["$seq"], spec.get("start", 1)
        cur = self.conn.execute(sa.select(self.t_seq.c.value).where(self.t_seq.c.name == name)).scalar()
        value = start if cur is None else cur + 1
        if not INT64_MIN <= value <= INT64_MAX:
            raise BadRequest(f"sequence {name!r} is exhausted (past the 64-bit integer range)", code="out_of_range")
        self._set_seq(name, value)
        return value, {"op": "setseq", "name": name, "value": value}

    def _set_seq(self, name: str, value: int) -> None:
        if self.conn.execute(sa.update(self.t_seq).where(self.t_seq.c.name == name).values(value=value)).rowcount == 0:
            self.conn.execute(sa.insert(self.t_seq).values(name=name, value=value))

    def _full_row(self, tname: str, row: dict, *, check: bool) -> dict:
        """Every column: given, else its default, else null."""
        out = {}
        d = self.defs[tname]
        given = {fold(k): v for k, v in row.items()}
        for c in d["columns"]:
            if fold(c["name"]) in given:
                out[c["name"]] = given[fold(c["name"])]
                continue
            v = c.get("default")
            if v is None and check and not schema.nullable(d, c):
                raise BadRequest(f"{tname}.{c['name']} may not be null, and the row gives no value", code="bad_type")
            out[c["name"]] = v
        return out

    def _where(self, table: sa.Table, where) -> list:
        """Clauses of a where that was checked (or came from the log)."""
        clauses = []
        for cname, oper, value in where or []:
            c = self._c(table, cname)
            if oper == "in":
                clauses.append(c.in_(value))
            elif value is None:
                clauses.append(c.is_(None) if oper == "=" else c.is_not(None))
            else:
                clauses.append({"=": c == value, "!=": c != value, "<": c < value, "<=": c <= value,
                                ">": c > value, ">=": c >= value}[oper])
        return clauses

    def _expect(self, op: dict, rowcount: int, replay: bool) -> None:
        exp = op.get("expect")
        if exp is None or replay:
            return
        if rowcount != exp:
            raise PreconditionFailed(f"{op.get('op')} on {op.get('table')} touched {rowcount} rows, expected {exp}",
                                     tag=op.get("tag"))

    def _check_add(self, tname: str, table: sa.Table, clauses: list, adds: dict) -> None:
        """The rows an update adds to must stay within their column's range:
        64-bit for integers (SQLite would silently turn them into reals), finite for reals."""
        for k, delta in adds.items():
            c = self._c(table, k)
            lo, hi = self.conn.execute(sa.select(sa.func.min(c), sa.func.max(c)).where(*clauses)).one()
            if lo is None:
                continue
            if self._column(tname, k)["type"] == "integer" and isinstance(delta, int):
                ok = INT64_MIN <= lo + delta <= INT64_MAX and INT64_MIN <= hi + delta <= INT64_MAX
            else:
                ok = math.isfinite(float(lo) + delta) and math.isfinite(float(hi) + delta)
            if not ok:
                raise BadRequest(f"add {delta!r} to {tname}.{k} would leave its range (now {lo!r} to {hi!r})",
                                 code="out_of_range")

    def _apply(self, op: dict, *, replay: bool) -> tuple[dict, list]:
        """Apply one checked operation (or one from the log); returns (result, ops to log)."""
        kind = op["op"]
        if kind == "create_table":
            return self._create_table(schema.definition(op))
        if kind == "setseq":
            if not replay:
                raise BadRequest("setseq comes only from the replication log")
            self._set_seq(op["name"], op["value"])
            return {}, [op]
        if kind == "clear":
            # From a client: the tables its tenant has now. From the log: the
            # tables the master emptied (a log of an earlier version: all).
            names = op["tables"] if "tables" in op else \
                namespace.tables_of(self.defs, op["tenant"]) if "tenant" in op else list(self.tables)
            for name in names:
                if name in self.tables:
                    self.conn.execute(sa.delete(self.tables[name]))
            return {}, [{"op": "clear", "tables": names}]
        if kind == "drop_tenant":
            return self._drop_tenant(op["tenant"])
        tname, table = self._table(op["table"])
        if kind == "insert":
            rows, seq_ops = [], []
            for r in op["rows"] if "rows" in op else [op["values"]]:
                vals, s = self._resolve_seqs(r) if not replay else (r, [])
                rows.append(self._full_row(tname, vals, check=False))
                seq_ops.extend(s)
            self.conn.execute(sa.insert(table), rows)   # every row has every column: nothing is dropped
            self._expect(op, len(rows), replay)
            result = {"rowcount": len(rows), "values": rows[0] if len(rows) == 1 else rows}
            return result, seq_ops + [{"op": "insert", "table": tname, "rows": rows}]
        if kind == "update":
            clauses = self._where(table, op.get("where"))
            sets, adds = op.get("set") or {}, op.get("add") or {}
            if adds and not replay:
                self._check_add(tname, table, clauses, adds)
            values = {self._c(table, k).name: v for k, v in sets.items()}
            values.update({self._c(table, k).name: self._c(table, k) + v for k, v in adds.items()})
            rc = self.conn.execute(sa.update(table).where(*clauses).values(**values)).rowcount
            self._expect(op, rc, replay)
            logged = {"op": "update", "table": tname, "where": op.get("where") or []}
            if sets:
                logged["set"] = sets
            if adds:
                logged["add"] = adds
            return {"rowcount": rc}, [logged]
        if kind == "delete":
            rc = self.conn.execute(sa.delete(table).where(*self._where(table, op.get("where")))).rowcount
            self._expect(op, rc, replay)
            return {"rowcount": rc}, [{"op": "delete", "table": tname, "where": op.get("where") or []}]
        if kind == "upsert":
            vals, seq_ops = self._resolve_seqs(op["values"]) if not replay else (op["values"], [])
            pk = self.defs[tname]["primary_key"]
            key = [self._c(table, k) == v for k, v in vals.items() if fold(k) in {fold(p) for p in pk}]
            rest = {self._c(table, k).name: v for k, v in vals.items() if fold(k) not in {fold(p) for p in pk}}
            rc = self.conn.execute(sa.update(table).where(*key).values(**rest)).rowcount if rest else \
                len(self.conn.execute(sa.select(*[table.c[k] for k in pk]).where(*key)).all())
            if rc == 0:
                self.conn.execute(sa.insert(table).values(**self._full_row(tname, vals, check=not replay)))
            self._expect(op, 1, replay)
            return {"rowcount": 1, "values": vals}, seq_ops + [{"op": "upsert", "table": tname, "values": vals}]
        if kind == "require":
            clauses = self._where(table, op.get("where"))
            exists = op.get("exists", True)
            found = self.conn.execute(sa.select(sa.literal(1)).select_from(table).where(*clauses).limit(1)).first() is not None
            if found != exists and not replay:
                what = "no row" if exists else "a row"
                raise PreconditionFailed(f"require failed: {what} in {tname} matches {op.get('where')!r:.200}",
                                         tag=op.get("tag"))
            return {"found": found}, []
        raise BadRequest(f"unknown operation {kind!r:.40}")

    def _drop_tenant(self, tenant: str) -> tuple[dict, list]:
        """Every table and sequence of the tenant, gone (the same on every
        worker: the log carries the op, and each drops what it holds)."""
        names = namespace.tables_of(self.defs, tenant)
        for name in names:
            self.tables[name].drop(self.conn)
            self.conn.execute(sa.delete(self.t_tables).where(self.t_tables.c.name == name))
            self.defs.pop(name)
            self.tables.pop(name)
            self.names.pop(fold(name))
        prefix = namespace.phys(tenant, "")
        self.conn.execute(sa.delete(self.t_seq).where(sa.func.substr(self.t_seq.c.name, 1, len(prefix)) == prefix))
        self._usage.pop(tenant, None)
        return {"dropped": len(names)}, [{"op": "drop_tenant", "tenant": tenant}]

    def _create_table(self, d: dict) -> tuple[dict, list]:
        if fold(d["table"]) in self.names:   # the same definition (validate refused any other)
            return {"created": False}, []
        self._register(d)
        self.tables[d["table"]].create(self.conn, checkfirst=False)
        self.conn.execute(sa.insert(self.t_tables).values(name=d["table"], definition=json.dumps(d)))
        return {"created": True}, [{"op": "create_table", **d}]

    # --- reads ------------------------------------------------------------
    def read(self, q, tenant: str = PLATFORM) -> Any:
        """Run one checked query for `tenant` in its own short read
        transaction. Errors are DBErrors, except failures of the store's machinery."""
        try:
            view = namespace.view(self.defs, tenant)
            checked = validate.read(q, view)
            if checked["op"] == "tables":
                return sorted(view)
            if checked["op"] == "storage":
                if tenant != PLATFORM:
                    raise Forbidden("storage is the platform's read")
                with self.conn.begin():
                    return self.storage()
            checked["table"] = namespace.phys(tenant, checked["table"])
            with self.conn.begin():
                return self._read(checked)
        except Exception as exc:
            err = request_error(exc, "read")
            if err is None:
                raise
            raise err from None

    def _read(self, q: dict) -> Any:
        kind = q["op"]
        if kind == "tables":
            return sorted(self.defs)
        tname, table = self._table(q["table"])
        clauses = self._where(table, q["where"])
        if kind == "count":
            return self.conn.execute(sa.select(sa.func.count()).select_from(table).where(*clauses)).scalar()
        cols = [table.c[c] for c in q["columns"]] if q.get("columns") else list(table.c)
        stmt = sa.select(*cols).where(*clauses)
        for name, direction in q.get("order_by") or []:
            stmt = stmt.order_by(table.c[name].asc() if direction == "asc" else table.c[name].desc())
        stmt = stmt.limit(q["limit"])
        return [{k: validate.finite_or_none(v) for k, v in r._mapping.items()} for r in self.conn.execute(stmt)]

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


# --- what failed: the request, or the store ---------------------------------
def machinery_failed(exc: BaseException) -> bool:
    """True when the exception is the store's own failure (its file, its
    connection), which no request causes and after which the worker must stop."""
    if isinstance(exc, (sa_exc.ResourceClosedError, sa_exc.PendingRollbackError)):
        return True
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    orig = exc.orig if isinstance(exc, sa_exc.StatementError) else exc
    if isinstance(orig, sqlite3.Error):
        name = getattr(orig, "sqlite_errorname", None)
        if name:
            return name.startswith(MACHINERY_CODES)
        # raised by the sqlite3 module itself: a closed connection is the store's failure
        return isinstance(orig, (sqlite3.OperationalError, sqlite3.InternalError)) or "closed" in str(orig).lower()
    if isinstance(exc, sa_exc.DBAPIError):   # another database: trust the DB-API's classes
        return isinstance(exc, (sa_exc.OperationalError, sa_exc.InternalError))
    return False


def request_error(exc: BaseException, what: str) -> DBError | None:
    """The DBError a request's failure is answered with, or None when the
    store's machinery failed (or the process is stopping): that propagates."""
    if not isinstance(exc, Exception):
        return None
    if isinstance(exc, DBError):
        return exc
    if machinery_failed(exc):
        return None
    if isinstance(exc, sa_exc.IntegrityError):
        return ConstraintViolation(f"constraint violated: {_short(exc)}")
    if isinstance(exc, sa_exc.DBAPIError):
        return BadRequest(f"the database refused the {what}: {_short(exc)}", code="rejected")
    log.exception("a %s could not be applied", what)
    return BadRequest(f"the {what} could not be applied ({type(exc).__name__})", code="rejected")


def _short(exc: Exception) -> str:
    """The database's own message (never the statement), first line, bounded."""
    msg = str(getattr(exc, "orig", exc)).splitlines()
    return (msg[0] if msg else type(exc).__name__)[:MAX_MESSAGE]
