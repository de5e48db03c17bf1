"""HTTP conventions of a tenant service, on top of bus/service.py: JSON
bodies checked before any write, read-your-writes LSN headers, the
per-instance request counter, the lazily ensured schema, and DB errors as
HTTP statuses. The tenant services use it; it knows nothing of any of them.

Complete lists (read_all): one read answers at most READ_LIMIT rows, so a
list is read in pages by keyset: ordered by a key that is unique among the
selected rows, each next page is `key > the last row's key` (for a key of
several columns, the prefix equal and the next column greater, then a
shorter prefix). Every page asks min_lsn = the highest LSN a page so far
came from, so no page comes from a replica behind an earlier one; pages
are not one snapshot (a row written meanwhile may or may not appear, never
twice). A list longer than LIST_MAX_ROWS, or not read within LIST_BUDGET
seconds, is refused (ListIncomplete, 503): never answered in part.

Request ids of writes (write, write_id): the bus request id of a write that
an HTTP request causes is the request's X-Request-Id (bus/service.py keeps
it in g.request_id) plus a digest of the service, method, path and the
write's operations. The workers remember each applied write's result under
its request id, so a retry of the HTTP request (same X-Request-Id, same
body) sends the same write under the same id and gets the first attempt's
result, which the service answers exactly as it did the first time. Another
write, or the same write under another X-Request-Id, is a new write. In one
process, writes under one id go one at a time (the DB client matches
replies by request id)."""
from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
import uuid
from contextlib import contextmanager

from flask import Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from bus.errors import DBError, Timeout, Unavailable
from bus.service import MAX_BODY, base_app, json_error

LSN_HEADER = "X-Stratus-LSN"
MIN_LSN_HEADER = "X-Stratus-Min-LSN"
MAX_FIELD = 255
READ_LIMIT = 10_000       # rows one read answers at most (the workers' limit); a page of read_all
LIST_MAX_ROWS = 200_000   # a longer list is refused (503), never cut
LIST_BUDGET = 20.0        # seconds to read a whole list (the gateway waits 30 s for an answer)
_PLAIN_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,64}$")

log = logging.getLogger("stratus.web")


class InputError(Exception):
    """The request is malformed: 400, nothing written."""


class RequestCounter:
    """Requests answered on a path prefix, exact under concurrency."""

    def __init__(self, prefix: str):
        self.prefix = prefix.rstrip("/")
        self._lock = threading.Lock()
        self._n = 0

    def matches(self, path: str) -> bool:
        return path == self.prefix or path.startswith(self.prefix + "/")

    def incr(self) -> None:
        with self._lock:
            self._n += 1

    def get(self) -> int:
        with self._lock:
            return self._n

    def reset(self) -> None:
        with self._lock:
            self._n = 0


class SchemaGuard:
    """Creates the tenant's tables once per process: in the background from
    start, and on demand before a request's first DB operation."""

    def __init__(self, create):
        self._create = create
        self._lock = threading.Lock()
        self.ready = threading.Event()

    def ensure(self) -> None:
        if self.ready.is_set():
            return
        with self._lock:
            if not self.ready.is_set():
                self._create()
                self.ready.set()

    def forget(self) -> None:
        self.ready.clear()

    def start_background(self, name: str) -> None:
        def loop():
            delay = 0.2
            while not self.ready.is_set():
                try:
                    self.ensure()
                    log.info("%s: tables ready", name)
                except DBError as exc:
                    log.info("%s: tables not created yet (%s); retrying", name, exc)
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
        threading.Thread(target=loop, name=f"{name}-schema", daemon=True).start()


def _is_text(s: str) -> bool:
    """False for strings holding a lone surrogate (JSON allows "\\ud800"; the bus cannot carry it)."""
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def json_object(required: tuple[str, ...]) -> dict:
    """The request body as a JSON object holding `required` fields. Raises
    InputError (400) otherwise, RequestEntityTooLarge (413) above the limit."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise RequestEntityTooLarge()
    raw = request.get_data(cache=True)
    if len(raw) > MAX_BODY:
        raise RequestEntityTooLarge()
    if not raw.strip():
        raise InputError("the body must be a JSON object")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InputError("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InputError("the body must be a JSON object")
    for k, v in body.items():
        if len(k) > MAX_FIELD or (isinstance(v, str) and len(v) > MAX_FIELD):
            raise InputError(f"field {k[:40]!r} is longer than {MAX_FIELD} characters")
        if not _is_text(k) or (isinstance(v, str) and not _is_text(v)):
            raise InputError(f"field {k[:40]!r} is not valid Unicode text")
    missing = [f for f in required if f not in body or body[f] is None or body[f] == ""]
    if missing:
        raise InputError(f"missing or empty field(s): {', '.join(missing)}")
    return body


def text_field(body: dict, name: str) -> str:
    v = body[name]
    if not isinstance(v, str):
        raise InputError(f"{name} must be a string")
    return v


def min_lsn() -> int | None:
    """The client's X-Stratus-Min-LSN, raised by every reply read so far."""
    return g.get("min_lsn")


def note_lsn(lsn: int) -> None:
    """Remember the LSN a reply carried: the response's X-Stratus-LSN, and the
    floor for the request's further reads (they never go back in time)."""
    if lsn:
        g.lsn = max(g.get("lsn") or 0, lsn)
        g.min_lsn = max(g.get("min_lsn") or 0, lsn)


def min_lsn_header() -> int | None:
    """The request's X-Stratus-Min-LSN: None when absent. Raises InputError
    (400) when it is not a non-negative integer."""
    raw = request.headers.get(MIN_LSN_HEADER, "").strip()
    if not raw:
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise InputError(f"{MIN_LSN_HEADER} must be a non-negative integer")
    return int(raw) or None


def min_lsn_hint() -> int | None:
    """X-Stratus-Min-LSN taken as a hint: a malformed header is ignored
    rather than refused (the toy store's choice; RideShare answers 400)."""
    try:
        return min_lsn_header()
    except InputError:
        return None


class ListIncomplete(DBError):
    """A list could not be read whole within LIST_MAX_ROWS / LIST_BUDGET:
    503 with a message, never a partial list."""
    code = "list_incomplete"
    status = 503


def read_all(db, query: dict, key: list[str], *, min_lsn: int | None = None, max_rows: int = LIST_MAX_ROWS,
             budget: float = LIST_BUDGET, page: int = READ_LIMIT) -> tuple[list[dict], int]:
    """Every row of the select `query`, in ascending `key` order, read in
    pages of `page` rows (keyset pagination; see the module docstring).
    `key` must be unique among the rows `query` selects. Returns (rows,
    the highest LSN a page came from). Raises ListIncomplete past max_rows
    rows or budget seconds, or the DBError of a page."""
    deadline = time.monotonic() + budget
    where = list(query.get("where") or [])
    base = dict(query)
    if base.get("columns"):
        base["columns"] = list(base["columns"]) + [k for k in key if k not in base["columns"]]
    rows: list[dict] = []
    lsn = min_lsn or 0
    level, last = 0, None  # the next page: key[:level] equal to last's, key[level] greater (none: the first)
    while True:
        after = [] if last is None else [[k, "=", last[k]] for k in key[:level]] + [[key[level], ">", last[key[level]]]]
        left = deadline - time.monotonic()
        if left <= 0:
            raise ListIncomplete(f"the list was not read whole within {budget:g}s ({len(rows)} rows so far)")
        reply = db.read(dict(base, where=where + after, order_by=[[k, "asc"] for k in key[level:]], limit=page),
                        min_lsn=lsn or None, timeout=min(left, db.settings.request_timeout))
        lsn = max(lsn, reply.lsn)
        rows.extend(reply.result)
        if len(rows) > max_rows:
            raise ListIncomplete(f"the list holds more than {max_rows} rows; it is not answered in part")
        if len(reply.result) == page:     # maybe more after this page's last row
            level, last = len(key) - 1, reply.result[-1]
        elif last is not None and level > 0:  # rows with this prefix are done: a shorter prefix
            level -= 1
        else:
            return rows, lsn


def read_list(db, query: dict, key: list[str]) -> list[dict]:
    """read_all for the current HTTP request: from the request's min LSN,
    and the LSN it reached becomes the request's (X-Stratus-LSN)."""
    rows, lsn = read_all(db, query, key, min_lsn=min_lsn())
    note_lsn(lsn)
    return rows


def write_id(ops: list[dict]) -> str:
    """The bus request id of `ops` written for the current HTTP request:
    its X-Request-Id (hashed when it is long or unusual) and a digest of the
    service, method, path and write (at most 88 characters; the bus takes 128)."""
    rid = g.get("request_id") or uuid.uuid4().hex
    if not _PLAIN_ID.match(rid):
        rid = "h" + hashlib.sha256(rid.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    what = [current_app.name, request.method, request.path, ops]  # the same write on another route is another
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, separators=(",", ":")).encode("utf-8", "surrogatepass"))
    return f"{rid}/{digest.hexdigest()[:22]}"


class _OneAtATime:
    """One holder per key at a time, waiting a bounded time; forgets idle keys."""

    def __init__(self):
        self._lock = threading.Lock()
        self._held: dict[str, list] = {}  # key -> [lock, holders and waiters]

    @contextmanager
    def hold(self, key: str, timeout: float):
        with self._lock:
            entry = self._held.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            if not entry[0].acquire(timeout=timeout):
                raise Timeout(f"write {key} is still in flight for an earlier attempt; a write may still be applied")
            try:
                yield
            finally:
                entry[0].release()
        finally:
            with self._lock:
                entry[1] -= 1
                if not entry[1]:
                    del self._held[key]


_in_flight = _OneAtATime()


def write(db, ops: list[dict], *, attempts: int = 1):
    """Write `ops` under write_id(ops); after a Timeout or
    Unavailable send the same write again, up to `attempts` times in all
    (the workers answer a repeated id from their record, so it is applied at
    most once). The reply's LSN becomes the request's. Returns the Reply;
    raises the write's DBError."""
    rid = write_id(ops)
    wait = db.settings.request_timeout * attempts  # for an earlier attempt of the same write
    with _in_flight.hold(rid, wait):
        for attempt in range(1, attempts + 1):
            try:
                reply = db.write(ops, request_id=rid)
                break
            except (Timeout, Unavailable) as exc:
                if attempt == attempts:
                    raise
                log.warning("write %s: %r; sending it again (attempt %d)", rid, exc, attempt + 1)
                time.sleep(0.2 * attempt)
    note_lsn(reply.lsn)
    return reply


def data_row(db, query: dict, not_found: str, on_error):
    """A read of at most one row, answered in the toy store's shape: 200
    {"data": row}, or 404 `not_found`; `on_error(exc)` answers a DB error.
    The reply's LSN goes back in X-Stratus-LSN."""
    try:
        reply = db.read(query, min_lsn=min_lsn_hint())
    except DBError as exc:
        return on_error(exc)
    if not reply.result:
        resp, status = json_error(404, not_found)
    else:
        resp, status = jsonify({"data": reply.result[0]}), 200
    resp.headers[LSN_HEADER] = str(reply.lsn)
    return resp, status


def db_error_response(exc: DBError, *, not_ready: str = "the database is not ready yet",
                      unexpected_status: int | None = None):
    """A DB error as an HTTP answer: Unavailable 503, Timeout 504 (never 400:
    a write may still happen), a table not created yet 503. Other errors keep
    their status, or get `unexpected_status` when the caller mapped every
    error it expects itself (then the rest are its bugs)."""
    if exc.code == "unknown_table":
        return json_error(503, not_ready)
    if exc.status >= 500:
        log.warning("database error: %r", exc)
        prefix = {503: "database unavailable", 504: "database timeout"}.get(exc.status, "database error")
        return json_error(exc.status, f"{prefix}: {exc.message}")
    if unexpected_status is not None:
        log.error("unexpected database error: %r", exc)
        return json_error(unexpected_status, f"database error: {exc.message}")
    return json_error(exc.status, exc.message)


def install(app: Flask, counter: RequestCounter, schema: SchemaGuard) -> None:
    """Counter, LSN headers and error handlers on `app`."""

    def _count():
        if counter.matches(request.path):
            counter.incr()
    # Count before anything else may answer (413 from base_app included).
    app.before_request_funcs.setdefault(None, []).insert(0, _count)

    @app.before_request
    def _parse_min_lsn():
        g.min_lsn = min_lsn_header()

    @app.after_request
    def _lsn_header(resp: Response):
        lsn = g.get("lsn")
        if lsn:
            resp.headers[LSN_HEADER] = str(lsn)
        return resp

    @app.errorhandler(InputError)
    def _input_error(exc: InputError):
        return json_error(400, str(exc))

    @app.errorhandler(DBError)
    def _db_error(exc: DBError):
        if exc.code == "unknown_table":  # tables gone or not made yet: make them on the next request
            schema.forget()
        return db_error_response(exc)

    @app.get("/api/v1/_count")
    def _get_count():
        return jsonify([counter.get()])

    @app.delete("/api/v1/_count")
    def _reset_count():
        counter.reset()
        return jsonify({})


def tenant_app(name: str, counted_prefix: str, create_tables, *, ensure_schema: bool = True) -> tuple[Flask, SchemaGuard]:
    """A service app that counts requests under `counted_prefix` and creates
    its tables through the bus (in the background from start when
    ensure_schema, and on demand before a request's first DB operation)."""
    app = base_app(name)
    counter = RequestCounter(counted_prefix)
    schema = SchemaGuard(create_tables)
    install(app, counter, schema)
    app.extensions["request_counter"] = counter
    if ensure_schema:
        schema.start_background(name)
    return app, schema
