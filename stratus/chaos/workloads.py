"""The workloads a chaos run plays through the gateway while faults happen,
and the history they record for the checker (stratus/chaos/checker.py).

Every request goes to the gateway's admin database routes with the admin's
token and the tenant named in the body ("tenant": the run's tenant):
POST /api/v1/db/write {"tenant", "ops"} and POST /api/v1/db/read {"tenant",
"op", ...}. Times are seconds on the run's clock (time.monotonic() minus the
run's start), the clock the fault schedule uses.

An attempt's outcome:
  ok    200: the write is acknowledged (the answer's lsn is kept);
  fail  a definite refusal: 503 (the request was never sent to the
        database: no worker, no bus, the orchestrator unreachable) or any
        other 4xx; nothing was written;
  info  indeterminate: 504, 500, 502, a dropped connection or a client
        timeout: the write may or may not have happened.

Set workload (open loop): every `interval` seconds a new key "s<n>-<hex>" is
inserted into the table chaos_set (id from a sequence, k the key) by a pool
thread. An indeterminate attempt is sent again with the same X-Request-Id,
hence the same bus request id (bus/web.py write_id), which the worker
deduplicates: a retry must never write a key twice. A key's record: first
invoke time, every attempt (invoke, complete, outcome, status, lsn), and
whether any attempt was acknowledged. At the end, final_read() pages through
the whole table (min_lsn = the highest acknowledged LSN).

Register workload (closed loop, `clients` threads): client c owns the row
(c, v) of chaos_reg. It writes v+1 (an upsert), and after an acknowledged
write reads its row back with the write's LSN in the X-Stratus-Min-LSN header
(lsn_via="header": the gateway's read-your-writes), in the body's "min_lsn"
(lsn_via="body": the db route's own field), or both. A read that answers
with a value below the client's last acknowledged value (or no row) is a
stale read. A value above it is fine only if this client attempted it
(an indeterminate write that happened); otherwise it is unexpected."""
from __future__ import annotations

import dataclasses
import http.client
import itertools
import json
import logging
import random
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("stratus.chaos.workloads")

SET_TABLE = "chaos_set"
REG_TABLE = "chaos_reg"
INDETERMINATE = {500, 502, 504}


@dataclasses.dataclass
class Attempt:
    invoke: float
    complete: float
    outcome: str          # ok | fail | info
    status: int           # HTTP status; 0 for a connection error or client timeout
    lsn: int = 0
    error: str = ""


@dataclasses.dataclass
class SetKey:
    key: str
    invoke: float
    attempts: list = dataclasses.field(default_factory=list)

    @property
    def acked(self) -> Attempt | None:
        return next((a for a in self.attempts if a.outcome == "ok"), None)

    @property
    def definitely_failed(self) -> bool:
        return bool(self.attempts) and all(a.outcome == "fail" for a in self.attempts)


@dataclasses.dataclass
class RegRead:
    client: str
    invoke: float
    complete: float
    expected: int         # the client's last acknowledged value
    attempted: tuple      # every value this client attempted so far
    got: int | None       # None: no row
    outcome: str          # ok | fail | info (a read that failed says nothing)
    lsn: int = 0


class Http:
    """One keep-alive connection to the gateway; JSON in and out. Never
    raises for a network error: returns status 0 and the error's text."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 12.0):
        self.host, self.port, self.timeout = host, port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def post(self, path: str, body: dict, headers: dict | None = None) -> tuple[int, object, dict]:
        data = json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        for _ in range(2):   # a keep-alive connection the server closed while idle: once more
            fresh = self.conn is None
            if fresh:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request("POST", path, body=data, headers=hdrs)
                resp = self.conn.getresponse()
                raw = resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                if fresh:
                    return 0, str(exc) or type(exc).__name__, {}
                continue   # a stale pooled connection: the request may not have left; the caller retries with its id
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                return 0, f"{type(exc).__name__}: {exc}", {}
            if resp.will_close:
                self.close()
            try:
                parsed = json.loads(raw) if raw else None
            except ValueError:
                parsed = raw.decode(errors="replace")
            return resp.status, parsed, {k.lower(): v for k, v in resp.getheaders()}
        return 0, "connection closed", {}

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:
                pass
        self.conn = None


def classify(status: int) -> str:
    if status == 200:
        return "ok"
    if status == 0 or status in INDETERMINATE:
        return "info"
    return "fail"


class Gateway:
    """The admin's view of the gateway: a token, renewed when refused."""

    def __init__(self, port: int, admin_password: str, tenant: str, *, timeout: float = 12.0):
        self.port, self.password, self.tenant, self.timeout = port, admin_password, tenant, timeout
        self._token: str | None = None
        self._lock = threading.Lock()

    def token(self, renew: bool = False) -> str | None:
        with self._lock:
            if self._token is None or renew:
                c = Http(self.port, timeout=5)
                status, body, _ = c.post("/api/v1/auth/token", {"username": "admin", "password": self.password})
                c.close()
                self._token = body["token"] if status == 200 and isinstance(body, dict) else None
            return self._token

    def call(self, http: Http, path: str, body: dict, headers: dict | None = None):
        tok = self.token()
        hdrs = {**(headers or {}), **({"Authorization": f"Bearer {tok}"} if tok else {})}
        status, parsed, h = http.post(path, {"tenant": self.tenant, **body}, hdrs)
        if status == 401:
            tok = self.token(renew=True)
            hdrs["Authorization"] = f"Bearer {tok}"
            status, parsed, h = http.post(path, {"tenant": self.tenant, **body}, hdrs)
        return status, parsed, h

    def setup(self, deadline: float = 60.0) -> None:
        """Create the workloads' tables (idempotent), retried until it works."""
        schema = [
            {"op": "create_table", "table": SET_TABLE, "primary_key": ["id"], "unique": [], "indexes": [],
             "columns": [{"name": "id", "type": "integer", "nullable": False},
                         {"name": "k", "type": "text", "nullable": False}]},
            {"op": "create_table", "table": REG_TABLE, "primary_key": ["client"], "unique": [], "indexes": [],
             "columns": [{"name": "client", "type": "text", "nullable": False},
                         {"name": "v", "type": "integer", "nullable": False}]},
        ]
        end = time.monotonic() + deadline
        http = Http(self.port, timeout=self.timeout)
        last = None
        try:
            while time.monotonic() < end:
                status, body, _ = self.call(http, "/api/v1/db/write", {"ops": schema})
                if status == 200:
                    return
                last = (status, body)
                time.sleep(0.5)
        finally:
            http.close()
        raise RuntimeError(f"the workload tables could not be created: {last}")


class SetWorkload:
    def __init__(self, gw: Gateway, clock, *, interval: float = 0.05, retries: int = 3,
                 retry_budget: float = 40.0, threads: int = 48):
        self.gw, self.clock = gw, clock
        self.interval, self.retries, self.retry_budget = interval, retries, retry_budget
        self.keys: list[SetKey] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="chaos-set")
        self.busy = threading.Semaphore(threads)
        self.inflight = 0
        self.skipped = 0      # ticks with every pool thread busy: no key made (never attempted)
        self._local = threading.local()
        self._n = itertools.count()
        self._thread = threading.Thread(target=self._generate, name="chaos-set-gen", daemon=True)

    def start(self) -> "SetWorkload":
        self._thread.start()
        return self

    def _http(self) -> Http:
        h = getattr(self._local, "http", None)
        if h is None:
            h = self._local.http = Http(self.gw.port, timeout=self.gw.timeout)
        return h

    def _generate(self) -> None:
        nxt = time.monotonic()
        while not self.stop.is_set():
            nxt += self.interval
            if self.busy.acquire(blocking=False):
                k = SetKey(f"s{next(self._n)}-{uuid.uuid4().hex[:8]}", self.clock())
                with self.lock:
                    self.keys.append(k)
                    self.inflight += 1
                self.pool.submit(self._insert, k)
            else:
                self.skipped += 1
            self.stop.wait(max(0.0, nxt - time.monotonic()))

    def _insert(self, k: SetKey) -> None:
        try:
            rid = f"chaos-{k.key}"
            ops = [{"op": "insert", "table": SET_TABLE, "values": {"id": {"$seq": SET_TABLE, "start": 1}, "k": k.key}}]
            end = time.monotonic() + self.retry_budget
            for attempt in range(1 + self.retries):
                t0 = self.clock()
                status, body, _ = self.gw.call(self._http(), "/api/v1/db/write", {"ops": ops},
                                               {"X-Request-Id": rid})
                outcome = classify(status)
                lsn = body.get("lsn", 0) if outcome == "ok" and isinstance(body, dict) else 0
                a = Attempt(t0, self.clock(), outcome, status, lsn,
                            "" if outcome == "ok" else str(body)[:200])
                with self.lock:
                    k.attempts.append(a)
                if outcome == "ok" or self.stop.is_set() or time.monotonic() > end:
                    return
                if outcome == "fail" and status != 503:
                    return   # refused for good (a 4xx): sending it again would not help
                time.sleep(min(1.0, 0.2 * (attempt + 1)))
        finally:
            with self.lock:
                self.inflight -= 1
            self.busy.release()

    def close(self, wait: float = 60.0) -> None:
        self.stop.set()
        self._thread.join(5)
        self.pool.shutdown(wait=False)
        end = time.monotonic() + wait
        # In-flight inserts finish (their outcome matters); bounded.
        while time.monotonic() < end:
            with self.lock:
                if self.inflight == 0:
                    break
            time.sleep(0.1)

    def snapshot(self) -> list[SetKey]:
        with self.lock:
            return [dataclasses.replace(k, attempts=list(k.attempts)) for k in self.keys]

    def final_read(self, deadline: float = 120.0) -> list[str]:
        """Every key in the table, in id order (duplicates kept), read with
        min_lsn = the highest acknowledged LSN; retried until it answers."""
        top = max((a.lsn for k in self.snapshot() for a in k.attempts if a.outcome == "ok"), default=0)
        http = Http(self.gw.port, timeout=30)
        end = time.monotonic() + deadline
        last_err = None
        try:
            while time.monotonic() < end:
                keys: list[str] = []
                last = 0
                try:
                    while True:
                        q = {"op": "select", "table": SET_TABLE, "where": [["id", ">", last]],
                             "order_by": [["id", "asc"]], "limit": 10_000}
                        if top:
                            q["min_lsn"] = top
                        status, rows, _ = self.gw.call(http, "/api/v1/db/read", q)
                        if status != 200 or not isinstance(rows, list):
                            raise RuntimeError(f"{status}: {str(rows)[:200]}")
                        keys += [r["k"] for r in rows]
                        if len(rows) < 10_000:
                            return keys
                        last = rows[-1]["id"]
                except RuntimeError as exc:
                    last_err = exc
                    time.sleep(1.0)
        finally:
            http.close()
        raise RuntimeError(f"the final read did not succeed within {deadline:g}s: {last_err}")


class RegisterWorkload:
    def __init__(self, gw: Gateway, clock, *, clients: int = 4, lsn_via: str = "header", pause: float = 0.05,
                 seed: int = 0):
        if lsn_via not in ("header", "body", "both"):
            raise ValueError("lsn_via: header, body or both")
        self.gw, self.clock, self.lsn_via, self.pause = gw, clock, lsn_via, pause
        self.clients = [f"r{i}" for i in range(clients)]
        self.reads: list[RegRead] = []
        self.writes: list[tuple[str, int, Attempt]] = []   # (client, value, attempt)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.rng = random.Random(seed)
        self.threads = [threading.Thread(target=self._run, args=(c,), name=f"chaos-reg-{c}", daemon=True)
                        for c in self.clients]

    def start(self) -> "RegisterWorkload":
        for t in self.threads:
            t.start()
        return self

    def _run(self, client: str) -> None:
        http = Http(self.gw.port, timeout=self.gw.timeout)
        acked = 0          # the last acknowledged value
        attempted: list[int] = []
        v = 0
        try:
            while not self.stop.is_set():
                v += 1
                attempted.append(v)
                ops = [{"op": "upsert", "table": REG_TABLE, "values": {"client": client, "v": v}}]
                t0 = self.clock()
                status, body, _ = self.gw.call(http, "/api/v1/db/write", {"ops": ops},
                                               {"X-Request-Id": f"chaos-{client}-{v}-{uuid.uuid4().hex[:6]}"})
                outcome = classify(status)
                lsn = body.get("lsn", 0) if outcome == "ok" and isinstance(body, dict) else 0
                a = Attempt(t0, self.clock(), outcome, status, lsn, "" if outcome == "ok" else str(body)[:200])
                with self.lock:
                    self.writes.append((client, v, a))
                if outcome != "ok":
                    self.stop.wait(0.2)
                    continue
                acked = v
                self._read(http, client, acked, tuple(attempted), lsn)
                self.stop.wait(self.pause)
        finally:
            http.close()

    def _read(self, http: Http, client: str, expected: int, attempted: tuple, lsn: int) -> None:
        q = {"op": "select", "table": REG_TABLE, "where": [["client", "=", client]]}
        headers = {}
        if self.lsn_via in ("header", "both"):
            headers["X-Stratus-Min-LSN"] = str(lsn)
        if self.lsn_via in ("body", "both"):
            q["min_lsn"] = lsn
        t0 = self.clock()
        status, rows, h = self.gw.call(http, "/api/v1/db/read", q, headers)
        outcome = classify(status)
        got = None
        if outcome == "ok" and isinstance(rows, list):
            got = rows[0]["v"] if rows else None
        elif outcome == "ok":
            outcome = "info"
        try:
            rlsn = int(h.get("x-stratus-lsn", "0") or 0)
        except ValueError:
            rlsn = 0
        with self.lock:
            self.reads.append(RegRead(client, t0, self.clock(), expected, attempted, got, outcome, rlsn))

    def close(self, wait: float = 30.0) -> None:
        self.stop.set()
        end = time.monotonic() + wait
        for t in self.threads:
            t.join(max(0.1, end - time.monotonic()))

    def snapshot(self) -> tuple[list[RegRead], list]:
        with self.lock:
            return list(self.reads), list(self.writes)


def gateway_reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
