"""The DB worker: one program, two roles.

Slave:  applies the replication log (a RabbitMQ stream) in LSN order from its
        own last applied position, and serves reads from readQ once it has
        caught up (it publishes a probe record and is ready when it reads the
        probe back).
Master: consumes writeQ. Writes that arrive together are group-committed: each
        is applied atomically under its own savepoint with the next LSN, the
        batch is appended to the log with a publisher confirm, the master then
        checks in ZooKeeper that it still holds the leader term (fencing), and
        only then commits locally and replies. An acknowledged write is
        therefore always in the durable log, before any newer barrier.
Promotion: a slave named leader publishes a barrier with the new term and keeps
        applying the log until it reads its barrier back, then takes writes.
        Entries of an older term that follow a newer barrier are ignored by
        every applier.

The main thread owns the AMQP connection (pika is not thread-safe); a ZooKeeper
thread keeps the membership znode current and reports leader changes."""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid

import pika
from kazoo.client import KazooState
from kazoo.recipe.watchers import DataWatch

from bus import protocol
from bus.client import connection_params
from bus.cluster import Leader, read_leader
from bus.errors import BadRequest, DBError
from bus.names import Names, Paths
from bus.settings import Settings
from bus.topology import declare_all
from bus.zk import children_json, connect, put_json

from .store import Store

log = logging.getLogger("stratus.worker")

READ_PREFETCH = 32
WRITE_PREFETCH = 512
LOG_PREFETCH = 1000
MAX_BATCH = 256
LOG_RECORDS_PER_TURN = 100  # so promotion and SIGTERM are noticed between chunks of a long replay
READY_PROBE_RTT = 0.5       # a slave is ready when its probe comes back this fast: it is near the log's head


class Fatal(Exception):
    """The worker cannot go on safely (lost its term, log publish uncertain)."""


class Worker:
    def __init__(self, settings: Settings, worker_id: str, db_url: str):
        self.settings = settings
        self.id = worker_id
        self.names = Names(settings.cluster)
        self.paths = Paths(settings.cluster)
        self.store = Store(db_url)
        self.role = "slave"
        self.state = "catching_up"
        self.ready = False
        self.current_term = self.store.term   # highest barrier term seen in the log
        self.reads = 0
        self.leader = Leader(None, 0)
        self.pending_writes: list = []
        self.log_backlog: list = []           # log deliveries not applied yet
        self.probe_sent_at = 0.0
        self.parked: list = []                # reads waiting for their min_lsn
        self.probe_nonce: str | None = None
        self.barrier_nonce: str | None = None
        self.promoting_term = 0
        self.master_serves_reads = False      # no slave is ready: the master reads too
        self.stopping = False
        self.started = time.time()
        self.conn = None
        self.ch_work = self.ch_log = self.ch_pub = None
        self.tags: dict[str, str] = {}        # consumer name -> tag
        self.zk = None

    # --- ZooKeeper side ----------------------------------------------------
    def membership(self) -> dict:
        return {"id": self.id, "pid": os.getpid(), "host": socket.gethostname(), "role": self.role,
                "state": self.state, "term": self.current_term if self.role == "slave" else self.store.term,
                "applied_lsn": self.store.applied_lsn, "ready": self.ready, "reads": self.reads,
                "serves_reads": self.ready and (self.role == "slave" or self.master_serves_reads),
                "started": self.started}

    def _zk_loop(self) -> None:
        last, last_at = None, 0.0
        while not self.stopping:
            try:
                data = self.membership()
                if data != last or time.time() - last_at > 1.0:
                    put_json(self.zk, self.paths.worker(self.id), data, ephemeral=True)
                    last, last_at = data, time.time()
                if self.role == "master":
                    ws = children_json(self.zk, self.paths.workers)
                    any_ready = any(w.get("role") == "slave" and w.get("ready") for w in ws.values())
                    if self.master_serves_reads == any_ready:
                        self.master_serves_reads = not any_ready
                        self._wake()
            except Exception as exc:
                log.debug("membership refresh failed: %s", exc)
            time.sleep(0.25)

    def _claim_membership(self) -> None:
        """A worker restarted under the same id may find its predecessor's
        ephemeral node, due to vanish when that dead session expires: replace it
        now with one of our own session."""
        path = self.paths.worker(self.id)
        stat = self.zk.exists(path)
        if stat is not None and stat.ephemeralOwner != self.zk.client_id[0]:
            try:
                self.zk.delete(path)
            except Exception:
                pass
        put_json(self.zk, path, self.membership(), ephemeral=True)

    def _on_zk_state(self, state) -> None:
        if state == KazooState.LOST and self.role == "master" and not self.stopping:
            # Our session is gone: another master may be elected any moment.
            log.error("ZooKeeper session lost while master: stopping writes now")
            os._exit(75)

    def _on_leader(self, data, stat, event=None) -> None:
        import json
        d = json.loads(data) if data else {}
        self.leader = Leader(d.get("id"), int(d.get("term", 0)))
        self._wake()

    def _wake(self) -> None:
        conn = self.conn
        if conn is not None:
            try:
                conn.add_callback_threadsafe(lambda: None)
            except Exception:
                pass

    # --- main loop ---------------------------------------------------------
    def run(self) -> int:
        self.zk = connect(self.settings)
        self.zk.add_listener(self._on_zk_state)
        self.leader, _ = read_leader(self.zk, self.paths)
        self._claim_membership()
        threading.Thread(target=self._zk_loop, name="zk-membership", daemon=True).start()
        DataWatch(self.zk, self.paths.leader, self._on_leader)
        signal.signal(signal.SIGTERM, lambda *_: self._request_stop())
        signal.signal(signal.SIGINT, lambda *_: self._request_stop())
        try:
            attempt = 0
            while True:
                try:
                    self._connect()
                    self._start_log_if_slave()
                    if self.role == "master":
                        self._resume_master()
                    elif self.leader.id != self.id:
                        self.ready, self.state = False, "catching_up"
                        self._probe()
                    attempt = 0
                    code = self._loop()
                    if code is not None:
                        return code
                except Fatal:
                    raise
                except pika.exceptions.AMQPError as exc:
                    # Broker restart or a stream still being created: reconnect.
                    # Unacked deliveries are redelivered; our state is what we committed.
                    attempt += 1
                    if attempt > 60:
                        raise Fatal(f"the broker stays unreachable: {exc!r}") from None
                    log.warning("bus connection lost (%r); reconnecting", exc)
                    self._drop_connection()
                    time.sleep(min(0.2 * attempt, 2.0))
        except Fatal as exc:
            log.error("fatal: %s", exc)
            return 70
        finally:
            self._close()

    def _loop(self) -> int | None:
        while True:
            self.conn.process_data_events(time_limit=0 if self.log_backlog else 0.05)
            if self.stopping:
                return self._drain_and_exit()
            self._apply_backlog()
            self._steer()
            if self.role == "master":
                while self.pending_writes and not self.stopping:
                    self._commit_batch()
                    self.conn.process_data_events(time_limit=0)
            else:
                self._expire_parked()

    def _drop_connection(self) -> None:
        self.tags.clear()
        self.log_backlog.clear()     # re-read from our stored offset
        self.parked.clear()          # unacked: the broker redelivers them
        self.pending_writes.clear()  # likewise
        try:
            if self.conn is not None and self.conn.is_open:
                self.conn.close()
        except Exception:
            pass
        self.conn = None

    def _start_log_if_slave(self) -> None:
        if self.role != "master":
            self._start_log()

    def _resume_master(self) -> None:
        self.ch_work.basic_qos(prefetch_count=WRITE_PREFETCH)
        self._consume("write", self.ch_work, self.names.write_queue, self._on_write)
        self._consume("master_read", self.ch_work, self.names.master_read_queue, self._on_master_read)

    def _request_stop(self) -> None:
        self.stopping = True
        self._wake()

    def _connect(self) -> None:
        self.conn = pika.BlockingConnection(connection_params(self.settings.amqp_url))
        self.ch_work = self.conn.channel()
        declare_all(self.ch_work, self.names)
        self.ch_work.basic_qos(prefetch_count=READ_PREFETCH)
        self.ch_pub = self.conn.channel()
        self.ch_pub.confirm_delivery()

    def _close(self) -> None:
        self.stopping = True
        try:
            if self.conn is not None and self.conn.is_open:
                self.conn.close()
        except Exception:
            pass
        try:
            self.zk.stop()
            self.zk.close()
        except Exception:
            pass

    def _consume(self, name: str, ch, queue: str, cb, **kw) -> None:
        if name not in self.tags:
            self.tags[name] = ch.basic_consume(queue, cb, **kw)

    def _cancel(self, name: str, ch) -> None:
        tag = self.tags.pop(name, None)
        if tag is not None:
            ch.basic_cancel(tag)

    def _start_log(self) -> None:
        self.ch_log = self.conn.channel()
        self.ch_log.basic_qos(prefetch_count=LOG_PREFETCH)  # streams need a prefetch
        off = self.store.stream_offset
        start = "first" if off is None else off + 1
        log.info("applying the log from offset %s (applied LSN %d)", start, self.store.applied_lsn)
        self._consume("log", self.ch_log, self.names.log_stream, self._on_log, arguments={"x-stream-offset": start})

    def _publish_log(self, body: bytes) -> None:
        try:
            self.ch_pub.basic_publish(self.names.sync_exchange, "", body,
                                      pika.BasicProperties(delivery_mode=2, content_type="application/json"),
                                      mandatory=True)
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            raise Fatal(f"the log refused a record: {exc}") from None

    def _probe(self) -> None:
        self.probe_nonce = uuid.uuid4().hex
        self.probe_sent_at = time.monotonic()
        self._publish_log(protocol.encode_probe(self.id, self.probe_nonce))

    def _steer(self) -> None:
        """React to the leader record and to whether the master must serve reads."""
        leader = self.leader
        if leader.id == self.id and leader.term > max(self.promoting_term, self.store.term if self.role == "master" else 0):
            self._begin_promotion(leader.term)
        elif self.role == "master" and leader.id != self.id and leader.term > self.store.term:
            raise Fatal(f"demoted: {leader.id} is master for term {leader.term}")
        if self.role == "master":
            if self.master_serves_reads:
                self._consume("read", self.ch_work, self.names.read_queue, self._on_read_queue)
            else:
                self._cancel("read", self.ch_work)

    # --- slave: applying the log -------------------------------------------
    def _on_log(self, ch, method, props, body) -> None:
        self.log_backlog.append((method, props, body))

    def _apply_backlog(self) -> None:
        chunk = self.log_backlog[:LOG_RECORDS_PER_TURN]
        del self.log_backlog[:LOG_RECORDS_PER_TURN]
        for method, props, body in chunk:
            offset = (props.headers or {}).get("x-stream-offset")
            try:
                rec = protocol.decode_record(body)
            except ValueError:
                log.warning("skipping an unreadable log record at offset %s", offset)
            else:
                self._apply_record(rec, offset)
            if self.ch_log is not None and self.ch_log.is_open:
                self.ch_log.basic_ack(method.delivery_tag)
            if "log" not in self.tags:   # promoted meanwhile: the rest is for a slave
                self.log_backlog.clear()
                return

    def _apply_record(self, rec: dict, offset) -> None:
        kind = rec.get("type")
        if kind == "probe":
            if rec.get("nonce") == self.probe_nonce and self.role == "slave" and not self.ready:
                rtt = time.monotonic() - self.probe_sent_at
                if rtt <= READY_PROBE_RTT:
                    self._become_ready()
                else:  # still replaying a long way behind the head: measure again
                    log.info("probe came back after %.1fs at LSN %d; catching up", rtt, self.store.applied_lsn)
                    self._probe()
            return
        term = rec["term"]
        if kind == "barrier":
            if term >= self.current_term:
                self.current_term = term
                with self.store.transaction():
                    self.store.term = term
                    if offset is not None:
                        self.store.stream_offset = offset
            if rec.get("nonce") == self.barrier_nonce and rec.get("master") == self.id:
                self._finish_promotion(term)
            return
        if term < self.current_term:
            log.info("ignoring %d entries of stale term %d (current %d)", len(rec["entries"]), term, self.current_term)
            return
        fresh = [e for e in rec["entries"] if e["lsn"] > self.store.applied_lsn]
        if not fresh:
            return
        with self.store.transaction():
            for e in fresh:
                if e["lsn"] != self.store.applied_lsn + 1:
                    log.error("log gap: at LSN %d, next entry is %d", self.store.applied_lsn, e["lsn"])
                self.store.replay(e["ops"], e.get("id"), e["lsn"], e.get("result"))
                self.store.applied_lsn = e["lsn"]
            if offset is not None:
                self.store.stream_offset = offset
        if self.parked:
            self._serve_parked()

    def _become_ready(self) -> None:
        self.ready = True
        self.state = "ready"
        log.info("caught up at LSN %d: serving reads", self.store.applied_lsn)
        self._consume("read", self.ch_work, self.names.read_queue, self._on_read_queue)

    # --- promotion -----------------------------------------------------------
    def _begin_promotion(self, term: int) -> None:
        log.info("named master for term %d: draining the log first", term)
        self.promoting_term = term
        self.state = "promoting"
        self._cancel("read", self.ch_work)   # reads go to ready slaves meanwhile
        for item in self.parked:
            self._forward_to_master(*item[2:])
        self.parked.clear()
        if "log" not in self.tags:
            self._start_log()
        self.barrier_nonce = uuid.uuid4().hex
        self._publish_log(protocol.encode_barrier(term, self.id, self.barrier_nonce))

    def _finish_promotion(self, term: int) -> None:
        if self.leader.id != self.id or self.leader.term != term:
            log.warning("barrier for term %d read back, but the leader is now %s/%d", term, self.leader.id, self.leader.term)
            return
        self._cancel("log", self.ch_log)
        with self.store.transaction():
            self.store.term = term
        self.role, self.state, self.ready = "master", "master", True
        self._resume_master()
        self.master_serves_reads = True  # until the membership loop sees a ready slave
        log.info("master for term %d from LSN %d", term, self.store.applied_lsn)

    # --- reads ----------------------------------------------------------------
    def _on_read_queue(self, ch, method, props, body) -> None:
        self.reads += 1
        self._on_read(ch, method, props, body, may_park=True)

    def _on_master_read(self, ch, method, props, body) -> None:
        self._on_read(ch, method, props, body, may_park=False)

    def _on_read(self, ch, method, props, body, *, may_park: bool) -> None:
        try:
            req = protocol.decode_request(body)
        except BadRequest as exc:
            self._reply(props, protocol.encode_error(exc, self.id))
            ch.basic_nack(method.delivery_tag, requeue=False)  # dead-lettered, never redelivered
            return
        if req.kind != "read":
            self._reply(props, protocol.encode_error(BadRequest("writes go to writeQ, not readQ"), self.id))
            ch.basic_ack(method.delivery_tag)
            return
        if may_park and self.role == "slave" and req.min_lsn and req.min_lsn > self.store.applied_lsn:
            self.parked.append((time.monotonic() + self.settings.min_lsn_wait, req.min_lsn, method, props, body))
            return
        self._serve_read(req, props)
        ch.basic_ack(method.delivery_tag)

    def _serve_read(self, req: protocol.Request, props) -> None:
        try:
            result = self.store.read(req.body)
            out = protocol.Reply(result, self.store.applied_lsn, self.id).encode()
        except DBError as exc:
            out = protocol.encode_error(exc, self.id)
        except Exception as exc:  # never let one query take the worker down
            log.exception("read failed")
            out = protocol.encode_error(DBError(f"read failed: {exc}"), self.id)
        self._reply(props, out)

    def _serve_parked(self) -> None:
        keep = []
        for item in self.parked:
            deadline, min_lsn, method, props, body = item
            if min_lsn <= self.store.applied_lsn:
                self._serve_read(protocol.decode_request(body), props)
                self.ch_work.basic_ack(method.delivery_tag)
            else:
                keep.append(item)
        self.parked = keep

    def _expire_parked(self) -> None:
        if not self.parked:
            return
        now = time.monotonic()
        keep = []
        for item in self.parked:
            if item[0] <= now:
                self._forward_to_master(*item[2:])
            else:
                keep.append(item)
        self.parked = keep

    def _forward_to_master(self, method, props, body) -> None:
        """A read this slave could not answer in time falls back to the master."""
        self.ch_work.basic_publish("", self.names.master_read_queue, body, props)
        self.ch_work.basic_ack(method.delivery_tag)

    def _reply(self, props, body: bytes) -> None:
        if props.reply_to:
            self.ch_work.basic_publish("", props.reply_to, body, pika.BasicProperties(
                correlation_id=props.correlation_id, content_type="application/json"))

    # --- master: writes ---------------------------------------------------------
    def _on_write(self, ch, method, props, body) -> None:
        self.pending_writes.append((method, props, body))

    def _commit_batch(self) -> None:
        batch = self.pending_writes[:MAX_BATCH]
        del self.pending_writes[:MAX_BATCH]
        replies, entries, dead = [], [], []
        try:
            with self.store.transaction():
                for method, props, body in batch:
                    try:
                        req = protocol.decode_request(body)
                        if req.kind != "write":
                            raise BadRequest("reads go to readQ, not writeQ")
                    except BadRequest as exc:
                        replies.append((props, protocol.encode_error(exc, self.id)))
                        if exc.code in ("bad_request", "unsupported_version") and req_unparsable(body):
                            dead.append(method.delivery_tag)
                        continue
                    seen = self.store.seen(req.id)
                    if seen is not None:  # redelivered after a crash: answer, don't apply twice
                        replies.append((props, protocol.Reply(seen[1], seen[0], self.id).encode()))
                        continue
                    lsn = self.store.applied_lsn + 1
                    try:
                        results, resolved = self.store.apply_request(req.body.get("ops"), lsn, req.id)
                    except DBError as exc:
                        replies.append((props, protocol.encode_error(exc, self.id)))
                        continue
                    self.store.applied_lsn = lsn
                    entries.append({"lsn": lsn, "id": req.id, "ops": resolved, "result": results})
                    replies.append((props, protocol.Reply(results, lsn, self.id).encode()))
                if entries:
                    self._publish_log(protocol.encode_entries(self.store.term, self.id, entries))
                    self._check_term()
        except Fatal:
            raise
        except Exception as exc:
            raise Fatal(f"write batch failed: {exc!r}") from exc
        for props, out in replies:
            self._reply(props, out)
        for method, _, _ in batch:
            if method.delivery_tag in dead:
                self.ch_work.basic_nack(method.delivery_tag, requeue=False)
            else:
                self.ch_work.basic_ack(method.delivery_tag)

    def _check_term(self) -> None:
        """Fencing: after the log confirmed our records, make sure we still
        hold the term. A newer barrier can only follow a leader change in
        ZooKeeper, so if the term is still ours, our records precede it."""
        try:
            self.zk.sync(self.paths.leader)
            leader, _ = read_leader(self.zk, self.paths)
        except Exception as exc:
            raise Fatal(f"cannot confirm the leader term: {exc!r}") from None
        if leader.id != self.id or leader.term != self.store.term:
            raise Fatal(f"stale master: term {self.store.term} was superseded by {leader.id}/{leader.term}")

    # --- leaving ------------------------------------------------------------------
    def _drain_and_exit(self) -> int:
        """Stop consuming, finish what is in flight, then exit (scale-down)."""
        self.state = "draining"
        log.info("draining")
        for name in ("read", "write", "master_read"):
            self._cancel(name, self.ch_work)
        self.conn.process_data_events(time_limit=0)
        while self.role == "master" and self.pending_writes:
            self._commit_batch()
        for item in self.parked:
            self._forward_to_master(*item[2:])
        self.parked.clear()
        self.conn.process_data_events(time_limit=0)
        return 0


def req_unparsable(body: bytes) -> bool:
    """True when a message is not even a JSON object: it is dead-lettered."""
    import json
    try:
        return not isinstance(json.loads(body), dict)
    except (ValueError, UnicodeDecodeError):
        return True
