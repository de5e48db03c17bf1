"""Snapshots of a worker's store, and how a new worker fetches one over the bus.

Making one: `make_snapshot(db_path, out_path)` copies the SQLite store with the
backup API in ONE step (`backup(pages=-1)` holds one read transaction, so the
copy is consistent while the worker goes on writing, WAL mode lets it), into a
temp file that is renamed into place. The copy is in rollback-journal mode (one
self-contained file). Its `_stratus_meta` says where it stands: applied LSN,
term and stream offset, committed with the data.

Serving (one `SnapshotService` thread per worker, with its own AMQP connection):
it consumes `names.snapshot_queue` only while its worker is ready, keeps its
latest snapshot in `<store dir>/snapshots/`, makes one every
STRATUS_SNAPSHOT_EVERY seconds (0: only on demand), and on a request serves the
latest one, or a new one when it is older than SERVE_MAX_AGE and behind the
store by more than SERVE_MAX_BEHIND LSNs.

  request  body {"v": 1, "type": "snapshot_request", "requester": <worker id>},
           reply_to: the requester's exclusive queue, correlation_id: its id,
           expiration: ACCEPT_WAIT (nobody took it by then: the requester gave up)
  answers  to reply_to with the request's correlation_id, headers["kind"]:
           "accepted"  at once (the member may first need to make the snapshot);
           "chunk"     count messages of CHUNK_BYTES (the last shorter), headers
                       snapshot (id), index, count, chunk_sha256, sha256 and size
                       (of the whole file), lsn, term, stream_offset (-1: none),
                       made_at (unix ms), source (worker id), role;
           "error"     headers reason: the member could not make one.

Fetching: `fetch_snapshot(settings, names, dest_path)` asks, verifies every
chunk and the whole file (a bad or missing chunk: the whole fetch is asked
again, MAX_ATTEMPTS times; a corrupt file is never loaded), writes a temp file,
fsyncs it and renames it to the store path. Every wait is bounded; it returns
None when no ready member answers.

Where the new worker starts the log: at the snapshot's stream_offset + 1, read
from the file as on any restart. A slave's offset is the last record it applied,
so every entry above the snapshot's LSN comes after it. A master's offset does
not advance when it writes (it is where it stopped reading as a slave, or none
for a cluster's first master: the new worker then reads from the first retained
record): that is earlier, never later, and appliers skip entries at or below
their applied LSN, so it is safe and only costs replay. That is why a master
consumes requests only while no slave is ready (the caller's `is_ready`). A
snapshot whose tail has since left the retained log gives a worker that meets
an LSN gap and exits 77 to be rebuilt again, from a newer snapshot."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pika

from bus.client import connection_params
from bus.files import fsync_dir
from bus.names import Names
from bus.settings import Settings
from bus.topology import declare_snapshot_queue

log = logging.getLogger("stratus.snapshot")

CHUNK_BYTES = 1024 * 1024
SERVE_MAX_AGE = 30.0         # seconds: a younger snapshot is served as it is...
SERVE_MAX_BEHIND = 1000      # ...when the store is at most this many LSNs ahead of it
POLL = 0.2                   # how often the service looks at is_ready
ACCEPT_WAIT = 5.0            # a request nobody accepts within this long: no ready member
CONSUMER_WAIT = 3.0          # ZooKeeper says a member is ready: wait this long for it to consume requests
CHUNK_WAIT = 30.0            # longest silence between two chunks (or before the first, once accepted: MAKE_WAIT)
MAKE_WAIT = 120.0            # how long a member may take to make the snapshot before its first chunk
FETCH_TIMEOUT = 600.0        # the whole fetch, all attempts
MAX_ATTEMPTS = 3
# Headers that are the same on every chunk of one snapshot.
SNAPSHOT_KEYS = ("snapshot", "count", "sha256", "size", "lsn", "term", "stream_offset", "made_at", "source", "role")


class SnapshotError(Exception):
    """A snapshot that cannot be made, or a fetched one that does not verify."""


# --- making -------------------------------------------------------------------
def make_snapshot(db_path, out_path) -> dict:
    """A consistent copy of the store at `db_path` in `out_path` (atomically
    replaced). Returns its info: lsn, term, stream_offset, size, sha256."""
    db_path, out_path = Path(db_path), Path(out_path)
    if not db_path.exists():
        raise SnapshotError(f"no store at {db_path}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f"{out_path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        src = sqlite3.connect(str(db_path), timeout=30)
        try:
            dst = sqlite3.connect(str(tmp))
            try:
                src.backup(dst, pages=-1)            # one step: one read transaction
                dst.execute("PRAGMA journal_mode=DELETE")   # one self-contained file
                meta = _meta(dst)
            finally:
                dst.close()
        finally:
            src.close()
        size, sha = _fsync_and_hash(tmp)
        os.replace(tmp, out_path)
        fsync_dir(out_path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {**meta, "size": size, "sha256": sha}


def _meta(conn: sqlite3.Connection) -> dict:
    try:
        m = dict(conn.execute("SELECT key, value FROM _stratus_meta").fetchall())
    except sqlite3.OperationalError:   # not a Stratus store (yet): nothing applied
        m = {}
    off = m.get("stream_offset")
    return {"lsn": int(m.get("applied_lsn") or 0), "term": int(m.get("term") or 0),
            "stream_offset": int(off) if off not in (None, "") else None}


def read_meta(path) -> dict:
    """lsn, term, stream_offset of a store or snapshot file."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return _meta(conn)
    finally:
        conn.close()


def _fsync_and_hash(path: Path) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
        while block := f.read(CHUNK_BYTES):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()



# --- chunks (the wire format, both sides) --------------------------------------
def chunk_messages(path, info: dict, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[dict, bytes]]:
    """(headers, body) of every chunk of the snapshot file `path` described by `info`."""
    count = max(1, math.ceil(info["size"] / chunk_bytes))
    common = {"kind": "chunk", "snapshot": f"{info['sha256'][:16]}-{info['lsn']}", "count": count,
              "sha256": info["sha256"], "size": info["size"], "lsn": info["lsn"], "term": info["term"],
              "stream_offset": -1 if info["stream_offset"] is None else info["stream_offset"],
              "made_at": int(info.get("made_at", 0) * 1000), "source": info.get("source", ""),
              "role": info.get("role", "")}
    with open(path, "rb") as f:
        for index in range(count):
            body = f.read(chunk_bytes)
            yield {**common, "index": index, "chunk_sha256": hashlib.sha256(body).hexdigest()}, body


class Assembler:
    """Writes the chunks of one snapshot to `path` in order, verifying each
    chunk and, at the end, the whole file. Raises SnapshotError on anything off."""

    def __init__(self, path):
        self.path = Path(path)
        self.f = open(self.path, "wb")
        self.hash = hashlib.sha256()
        self.size = 0
        self.next = 0
        self.info: dict | None = None

    def add(self, headers: dict, body: bytes) -> bool:
        """Take one chunk; True when the snapshot is complete and verified."""
        try:
            h = {k: headers[k] for k in (*SNAPSHOT_KEYS, "index", "chunk_sha256")}
        except (KeyError, TypeError):
            raise SnapshotError("a chunk without its headers") from None
        if self.info is None:
            if not isinstance(h["count"], int) or h["count"] < 1:
                raise SnapshotError(f"a snapshot of {h['count']!r} chunks")
            self.info = {k: h[k] for k in SNAPSHOT_KEYS}
        elif any(h[k] != self.info[k] for k in SNAPSHOT_KEYS):
            raise SnapshotError(f"chunk {h['index']} belongs to another snapshot ({h['snapshot']})")
        if h["index"] != self.next:
            raise SnapshotError(f"chunk {h['index']} came where chunk {self.next} was due")
        if hashlib.sha256(body).hexdigest() != h["chunk_sha256"]:
            raise SnapshotError(f"chunk {h['index']} of {h['count']} does not match its checksum")
        self.f.write(body)
        self.hash.update(body)
        self.size += len(body)
        self.next += 1
        if self.next < self.info["count"]:
            return False
        if self.size != self.info["size"] or self.hash.hexdigest() != self.info["sha256"]:
            raise SnapshotError("the assembled snapshot does not match its checksum")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return True

    def discard(self) -> None:
        self.f.close()
        self.path.unlink(missing_ok=True)


def install(tmp: Path, dest: Path) -> None:
    """Rename a verified snapshot to the store path; a stale WAL of an earlier
    store there must not be applied to it."""
    for side in ("-wal", "-shm", "-journal"):
        Path(f"{dest}{side}").unlink(missing_ok=True)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)


# --- serving --------------------------------------------------------------------
class SnapshotService(threading.Thread):
    """Serves snapshots of one worker's store to new workers, while `is_ready()`.
    Its own pika connection (pika is not thread-safe); reconnects on its own,
    so the worker runs whether or not this thread is connected."""

    def __init__(self, settings: Settings, worker_id: str, db_path, is_ready: Callable[[], bool], *,
                 applied_lsn: Callable[[], int] | None = None, role: Callable[[], str] | None = None,
                 chunk_bytes: int = CHUNK_BYTES):
        super().__init__(name="snapshot-service", daemon=True)
        self.settings = settings
        self.names = Names(settings.cluster)
        self.worker_id = worker_id
        self.db_path = Path(db_path)
        self.dir = self.db_path.parent / "snapshots"
        self.snap_path = self.dir / "latest.sqlite"
        self.info_path = self.dir / "latest.json"
        self.is_ready = is_ready
        self.applied_lsn = applied_lsn
        self.role = role or (lambda: "")
        self.chunk_bytes = chunk_bytes
        self.every = settings.snapshot_every
        self.info = self._load_info()
        self.next_due = time.monotonic() + self.every
        self.served = 0
        self._halt = threading.Event()

    def _load_info(self) -> dict | None:
        try:
            info = json.loads(self.info_path.read_text())
            if self.snap_path.stat().st_size == info["size"]:
                return info
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        backoff, failures = 0.2, 0
        while not self._halt.is_set():
            try:
                self._serve()
                return
            except Exception as exc:   # broker down or restarting: try again, the worker goes on
                failures += 1
                (log.warning if failures in (1, 10) or failures % 100 == 0 else log.debug)(
                    "snapshot service: no bus connection (%r); retrying", exc)
                self._halt.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _serve(self) -> None:
        conn = pika.BlockingConnection(connection_params(self.settings.amqp_url))
        try:
            ch = conn.channel()
            declare_snapshot_queue(ch, self.names)
            ch.basic_qos(prefetch_count=1)
            tag = None
            while not self._halt.is_set():
                ready = bool(self.is_ready())
                if ready and tag is None:
                    tag = ch.basic_consume(self.names.snapshot_queue, self._on_request)
                elif not ready and tag is not None:
                    ch.basic_cancel(tag)   # requests not yet handled go back to the queue
                    tag = None
                if ready and self.every > 0 and time.monotonic() >= self.next_due:
                    self._periodic()
                conn.process_data_events(time_limit=POLL)
        finally:
            try:
                conn.close()
            except Exception:
                pass

    def _periodic(self) -> None:
        self.next_due = time.monotonic() + self.every
        if self.info is not None and self._live_lsn() == self.info["lsn"]:
            return   # nothing written since
        try:
            self.snapshot()
        except Exception:
            log.exception("periodic snapshot failed")

    def _live_lsn(self) -> int | None:
        return self.applied_lsn() if self.applied_lsn is not None else None

    def snapshot(self) -> dict:
        """Make a snapshot now; it becomes the latest."""
        t0 = time.monotonic()
        info = make_snapshot(self.db_path, self.snap_path)
        info.update(made_at=time.time(), source=self.worker_id, role=self.role())
        tmp = self.info_path.with_name(self.info_path.name + ".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, self.info_path)
        self.info = info
        log.info("snapshot at LSN %d (stream offset %s): %d bytes in %.2fs", info["lsn"], info["stream_offset"],
                 info["size"], time.monotonic() - t0)
        return info

    def fresh(self) -> dict:
        """The latest snapshot if it is recent enough, else a new one."""
        info, live = self.info, self._live_lsn()
        if info is not None and self.snap_path.exists():
            if live is not None and (live == info["lsn"] or (
                    time.time() - info["made_at"] <= SERVE_MAX_AGE and live - info["lsn"] <= SERVE_MAX_BEHIND)):
                return info
        return self.snapshot()

    def _on_request(self, ch, method, props, body) -> None:
        try:
            req = json.loads(body)
            ok = isinstance(req, dict) and req.get("type") == "snapshot_request" and props.reply_to
        except (ValueError, UnicodeDecodeError):
            ok = False
        if not ok:
            log.warning("ignoring a malformed snapshot request")
            ch.basic_ack(method.delivery_tag)
            return
        reply = lambda headers, data=b"": ch.basic_publish(  # noqa: E731
            "", props.reply_to, data, pika.BasicProperties(correlation_id=props.correlation_id, headers=headers))
        reply({"kind": "accepted", "source": self.worker_id})
        try:
            info = self.fresh()
        except Exception as exc:
            log.exception("could not make a snapshot for %s", req.get("requester"))
            reply({"kind": "error", "reason": f"{type(exc).__name__}: {exc}"[:300]})
            ch.basic_ack(method.delivery_tag)
            return
        t0, n = time.monotonic(), 0
        for headers, data in chunk_messages(self.snap_path, info, self.chunk_bytes):
            reply(headers, data)
            n += 1
        ch.basic_ack(method.delivery_tag)
        self.served += 1
        log.info("served the snapshot at LSN %d to %s: %d chunks in %.2fs", info["lsn"], req.get("requester"),
                 n, time.monotonic() - t0)


# --- fetching ---------------------------------------------------------------------
def fetch_snapshot(settings: Settings, names: Names, dest_path, timeout: float = FETCH_TIMEOUT, *,
                   requester: str = "", consumer_wait: float = CONSUMER_WAIT) -> dict | None:
    """Fetch the latest snapshot of a ready member into `dest_path` (verified,
    fsynced, renamed). Its info (lsn, term, stream_offset, size, sha256, source),
    or None when no ready member answers or no copy verifies."""
    dest = Path(dest_path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    try:
        conn = pika.BlockingConnection(connection_params(settings.amqp_url))
    except pika.exceptions.AMQPError as exc:
        log.warning("no snapshot: the bus is unreachable (%r)", exc)
        return None
    try:
        ch = conn.channel()
        consumers = declare_snapshot_queue(ch, names).method.consumer_count
        wait_until = time.monotonic() + consumer_wait
        while consumers == 0 and time.monotonic() < wait_until:
            conn.sleep(0.1)
            consumers = ch.queue_declare(names.snapshot_queue, passive=True).method.consumer_count
        if consumers == 0:
            log.info("no snapshot: no ready member serves snapshots")
            return None
        for attempt in range(1, MAX_ATTEMPTS + 1):
            if time.monotonic() >= deadline:
                break
            tmp = dest.with_name(f"{dest.name}.fetch-{uuid.uuid4().hex[:8]}")
            try:
                info = _fetch_once(conn, names, tmp, deadline, requester)
            except SnapshotError as exc:
                log.warning("snapshot fetch, attempt %d of %d: %s", attempt, MAX_ATTEMPTS, exc)
                tmp.unlink(missing_ok=True)
                continue
            if info is None:
                tmp.unlink(missing_ok=True)
                return None
            install(tmp, dest)
            return info
        log.warning("no snapshot: no copy verified")
        return None
    except pika.exceptions.AMQPError as exc:
        log.warning("no snapshot: the bus failed during the fetch (%r)", exc)
        return None
    finally:
        for p in dest.parent.glob(f"{dest.name}.fetch-*"):
            p.unlink(missing_ok=True)
        try:
            conn.close()
        except Exception:
            pass


def _fetch_once(conn, names: Names, tmp: Path, deadline: float, requester: str) -> dict | None:
    """One request: the verified file at `tmp` and its info; None when nobody
    accepts; SnapshotError when a copy is refused or stops coming."""
    ch = conn.channel()
    asm = Assembler(tmp)
    done = False
    try:
        q = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
        corr = uuid.uuid4().hex
        ch.basic_publish("", names.snapshot_queue,
                         json.dumps({"v": 1, "type": "snapshot_request", "requester": requester}).encode(),
                         pika.BasicProperties(reply_to=q, correlation_id=corr, content_type="application/json",
                                              expiration=str(int(ACCEPT_WAIT * 1000))))
        t0 = time.monotonic()
        accepted = None
        wait_until = t0 + ACCEPT_WAIT
        for method, props, body in ch.consume(q, auto_ack=True, inactivity_timeout=0.25):
            now = time.monotonic()
            if method is None:
                if now >= min(wait_until, deadline):
                    if accepted is None:
                        log.info("no snapshot: no ready member accepted the request within %.0fs", ACCEPT_WAIT)
                        return None
                    raise SnapshotError(f"{accepted} stopped sending chunks ({asm.next} received)")
                continue
            if props.correlation_id != corr:
                continue
            headers = props.headers or {}
            kind = headers.get("kind")
            if kind == "accepted":
                accepted = headers.get("source") or "a member"
                wait_until = now + MAKE_WAIT
            elif kind == "error":
                raise SnapshotError(f"{accepted} could not make a snapshot: {headers.get('reason')}")
            elif kind == "chunk":
                wait_until = now + CHUNK_WAIT
                if asm.add(headers, body):
                    done = True
                    break
        info = dict(asm.info)
        meta = read_meta(tmp)
        if meta["lsn"] != info["lsn"]:
            raise SnapshotError(f"the snapshot says LSN {info['lsn']}, its store says {meta['lsn']}")
        info["stream_offset"] = meta["stream_offset"]
        log.info("fetched the snapshot at LSN %d (stream offset %s, %d bytes) from %s in %.2fs",
                 info["lsn"], info["stream_offset"], info["size"], info["source"], time.monotonic() - t0)
        return info
    finally:
        if not done:
            asm.discard()
        try:
            ch.close()   # the exclusive reply queue goes with it
        except Exception:
            pass
