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
        every applier. A promotion either finishes or gives the role back: a
        lost broker connection starts it again with a new barrier; a lost
        ZooKeeper session, or a leader record that names someone else
        meanwhile, ends it (the orchestrator elects again).
Fencing of replies: a master sends nothing (result, error, duplicate answer,
        read) until a leader-record read that began after the reply was made
        confirms its term; a check that cannot finish within the session
        timeout ends the worker. A deposed master therefore says nothing.
Terms never go back: a worker remembers the highest barrier term another
        master wrote in the log (foreign_term; at start, its store's term). A
        worker named master for a term at or below it refuses when it reads
        its own barrier back (a stale term would fork history: every replica
        ignores it); it says so in its membership (refused_term) and the
        orchestrator names it again above the log's term. This is what keeps
        a cluster whole after ZooKeeper lost its state and its leader record.
Cluster identity: every barrier carries the cluster's identity ("cluster"),
        and a store keeps the first one it reads. A worker finishing a
        promotion settles it with ZooKeeper's (bus/cluster.py settle_identity):
        it restores ZooKeeper's record from its log's, stamps ZooKeeper's into
        a log that had none, or, when they differ, refuses to take writes
        with the error (the orchestrator then elects no one: check_identity).
Stalled replicas: a ready slave whose applied LSN has not moved for
        STALL_BOUND seconds while the master's is ahead of it (it ignores a
        master's entries, or cannot apply them) stops serving reads until it
        applies again and its probe comes back.
Divergence: an applier never skips a record and never applies past a gap in
        LSNs. A record that fails, or a gap (the position fell off the retained
        log, or records went missing), marks the worker `diverged`, with the
        reason, in its membership; it then exits with EXIT_REBUILD so that a
        fresh worker replaces it from a snapshot (worker/snapshot.py).
Tenants: a request's tenant is the one its broker-validated AMQP user_id
        names (bus/tenancy.py); a request without one is refused. The store
        resolves every name inside that tenant (worker/namespace.py), and a
        write's request id is remembered under its tenant.
Request ids: with STRATUS_LOG_REQUESTS on, a master logs one INFO line per
        write of a committed batch ("write <request id> tenant <t> lsn <n>", or
        "... answered again" / "... refused: <code>"); a service's write id
        starts with the HTTP request's X-Request-Id (bus/web.py), so one
        request can be followed from the gateway to the worker.
Reconnect of a master: before it appends again, it reads the log's tail and
        checks that the last LSN there is its own last LSN.
Broker status: the membership says whether the worker has a working broker
        connection (broker_up, and since when it lost it). The orchestrator
        deposes a master cut off from the broker while another replica
        reaches it (orchestrator/decisions.py check_master_broker); a master
        that sees, while reconnecting, that the leader record names another
        worker for a newer term stops there (exit 70). A worker retries its
        connection every RECONNECT_MAX seconds at most, and gives up after
        GIVE_UP_AFTER seconds without one (exit 70).

The main thread owns the AMQP connection (pika is not thread-safe); a ZooKeeper
thread keeps the membership znode current and reports leader changes."""
from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid

import pika
from kazoo.client import KazooState
from sqlalchemy import exc as sa_exc
from kazoo.recipe.watchers import DataWatch

from bus import protocol, tenancy
from bus.client import connection_params
from bus.cluster import Leader, Member, Role, State, claim_identity, read_identity, read_leader, settle_identity, workers
from bus.errors import BadRequest, DBError, Forbidden
from bus.names import Names, Paths
from bus.settings import Settings, env_bool, env_float
from bus.topology import declare_all
from bus.zk import connect, put_json

from . import faults
from .store import Store

log = logging.getLogger("stratus.worker")

READ_PREFETCH = 32
WRITE_PREFETCH = 512
LOG_PREFETCH = 1000
MAX_BATCH = 256
MAX_BATCH_BYTES = 8 * 1024 * 1024  # a log record holds ops and results: keep it well under the broker's limit
LOG_RECORDS_PER_TURN = 100  # so promotion and SIGTERM are noticed between chunks of a long replay
READY_PROBE_RTT = 0.5       # a slave is ready when its probe comes back this fast: it is near the log's head
EXIT_SESSION_LOST = 75      # a master (or a worker promoting) lost its ZooKeeper session
EXIT_REBUILD = 77           # diverged: replace this worker with a fresh one (snapshot + log tail)
EXIT_LOG_STUCK = 76         # a log append unconfirmed for LOG_CONFIRM_TIMEOUT: this master cannot append
# A log append (publisher confirm on the stream) that the broker neither
# confirms nor refuses within this long ends the worker: pika's blocking
# publish has no time limit, and after the stream's leader node dies a confirm
# can stay unanswered for minutes while the connection looks healthy. Nothing
# was answered for the batch (answers wait for the confirm and the term check),
# and its transaction is never committed; the orchestrator elects the most
# advanced replica, as after kill -9. STRATUS_LOG_CONFIRM_TIMEOUT, seconds.
LOG_CONFIRM_TIMEOUT_DEFAULT = 3.0
STALL_BOUND = 2.0           # a ready slave that applies nothing this long while the master is ahead is not ready
DIVERGED_LINGER = 1.0       # how long a diverged worker keeps its membership up, so its reason is seen
TAIL_MARGIN = 5.0           # a reconnecting master reads the log from this long before its last append
RECONNECT_MAX = 0.5         # at most this long between two connection attempts: back soon after a broker's
                            # return (the orchestrator deposes a master still away 1 s after a replica is back)
GIVE_UP_AFTER = 120.0       # without a broker connection this long, the worker exits 70
# One log line per write (STRATUS_LOG_REQUESTS, on by default). Its cost, measured:
# about 27 us of logging per write against about 1.3-1.5 ms of the master's
# CPU per write (8 writer threads, 3 alternating runs of 4,000 writes: within
# the run-to-run noise, about 2% by the arithmetic), so under the 5% bar.
LOG_REQUESTS_DEFAULT = True


class Fatal(Exception):
    """The worker cannot go on safely (lost its term, log publish uncertain)."""


class Gap(Exception):
    """The next entry in the log is not the next LSN."""


class Worker:
    def __init__(self, settings: Settings, worker_id: str, db_url: str):
        self.settings = settings
        self.id = worker_id
        self.names = Names(settings.cluster)
        self.paths = Paths(settings.cluster)
        self.store = Store(db_url, dedup_retention=settings.dedup_retention, storage_quota=settings.tenant_storage)
        # the user_ids that mean the platform itself: its components' accounts
        self.platform_account = tenancy.platform_accounts(tenancy.platform_user(settings.amqp_url))
        self.role = Role.SLAVE
        self.state = State.CATCHING_UP
        self.ready = False
        self.publishing_since: float | None = None   # a log append waiting for its confirm, since
        self.current_term = self.store.term   # highest barrier term seen in the log
        # ... of a barrier another master wrote: the store's term, unless that
        # barrier was our own (a restart under the same id resumes its term)
        self.foreign_term = foreign_term_at_start(self.store.term, self.store.term_master, worker_id)
        self.refused_term = 0                 # the last term we were named for and refused (it was not above the log's)
        self.identity_refused = 0             # the last term refused because ZooKeeper's cluster identity is another's
        self.stalled = ""                     # why this slave stalls while the master advances ("" when it does not)
        self.stall_unready = False            # not ready because of a stall: probe again once it applies
        self._behind = (None, -1)             # (since when, at which applied LSN) the master has been ahead
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
        self.reason = ""                      # why this worker is not ready (diverged, ...)
        self.diverged_at: float | None = None
        self.outgoing: list = []              # a master's replies waiting for a term check
        self.term_checked_at = 0.0            # monotonic start of the last successful term check
        self.last_append_wall: float | None = None  # wall time of this master's last log append
        self.stopping = False
        self.started = time.time()
        self.broker_up = False                # a working broker connection (published in the membership)
        self.broker_down_since: float | None = None   # wall time it was lost (None while up, and before the first)
        self.membership_changed = threading.Event()   # wakes the membership loop at once
        self.conn = None
        self.ch_work = self.ch_log = self.ch_pub = None
        self.tags: dict[str, str] = {}        # consumer name -> tag
        self.zk = None
        self.log_requests = env_bool("STRATUS_LOG_REQUESTS", LOG_REQUESTS_DEFAULT)
        self.request_lines: list[tuple] = []  # a batch's per-write log lines, logged once it is committed
        # Metrics (worker/metrics.py reads them when scraped).
        self.metrics_addr: tuple[str, int] | None = None   # (host, port) of /metrics, in the membership
        self.reads_served = 0
        self.write_counts = {"applied": 0, "duplicate": 0, "refused": 0}
        self.log_entries_applied = 0
        self.write_batches = 0

    # --- ZooKeeper side ----------------------------------------------------
    def membership(self) -> dict:
        return Member(id=self.id, pid=os.getpid(), host=socket.gethostname(), role=self.role, state=self.state,
                      term=self.current_term if self.role is Role.SLAVE else self.store.term,
                      applied_lsn=self.store.applied_lsn, ready=self.ready, reads=self.reads,
                      serves_reads=self.ready and (self.role is Role.SLAVE or self.master_serves_reads),
                      started=self.started, reason=self.reason,
                      metrics_host=self.metrics_addr[0] if self.metrics_addr else None,
                      metrics_port=self.metrics_addr[1] if self.metrics_addr else None,
                      broker_up=self.broker_up, broker_down_since=self.broker_down_since,
                      refused_term=self.refused_term, cluster_id=self.store.cluster_id).to_dict()

    def _set_broker(self, up: bool) -> None:
        if up == self.broker_up:
            return
        self.broker_up = up
        self.broker_down_since = None if up else time.time()
        self.membership_changed.set()

    def _zk_loop(self) -> None:
        last, last_at = None, 0.0
        while not self.stopping:
            try:
                data = self.membership()
                if data != last or time.time() - last_at > 1.0:
                    put_json(self.zk, self.paths.worker(self.id), data, ephemeral=True)
                    last, last_at = data, time.time()
                if self.role is Role.MASTER:
                    any_ready = any(m.role is Role.SLAVE and m.ready for m in workers(self.zk, self.paths).values())
                    if self.master_serves_reads == any_ready:
                        self.master_serves_reads = not any_ready
                        self._wake()
                elif self.ready or self.stall_unready:
                    self._check_stall(workers(self.zk, self.paths).get(self.leader.id))
            except Exception as exc:
                log.debug("membership refresh failed: %s", exc)
            self.membership_changed.wait(0.25)
            self.membership_changed.clear()

    def _check_stall(self, master: Member | None) -> None:
        """(ZooKeeper thread) Does this slave stall while the master advances?
        Sets `stalled`; the main thread stops serving reads (_steer)."""
        mine, now = self.store.applied_lsn, time.monotonic()
        ahead = master is not None and master.role is Role.MASTER and master.applied_lsn > mine
        since, at = self._behind
        if not ahead or at != mine or since is None:
            self._behind = (now if ahead else None, mine)
            stalled = ""
        else:
            stalled = stall_reason(master.applied_lsn, mine, now - since, self.current_term, master.term)
        if stalled != self.stalled:
            self.stalled = stalled
            self._wake()

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
        if state != KazooState.LOST or self.stopping:
            return
        if self.role is Role.MASTER:
            # Our session is gone: another master may be elected any moment.
            log.error("ZooKeeper session lost while master: stopping writes now")
            os._exit(EXIT_SESSION_LOST)
        if self.promoting_term:
            # The orchestrator sees us gone and elects again: give the role back.
            log.error("ZooKeeper session lost while promoting to term %d: giving the role back", self.promoting_term)
            os._exit(EXIT_SESSION_LOST)

    def _on_leader(self, data, stat, event=None) -> None:
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
        threading.Thread(target=self._watch_publish, name="log-confirm-watch", daemon=True).start()
        DataWatch(self.zk, self.paths.leader, self._on_leader)
        signal.signal(signal.SIGTERM, lambda *_: self._request_stop())
        signal.signal(signal.SIGINT, lambda *_: self._request_stop())
        try:
            attempt = 0
            unreachable_since = None
            while True:
                try:
                    self._connect()
                    self._set_broker(True)
                    if self.promoting_term and self.role is not Role.MASTER:
                        # The connection dropped mid-promotion: our barrier may or may
                        # not be in the log. Start the promotion again with a new one.
                        log.warning("reconnected while promoting to term %d: starting the promotion again",
                                    self.promoting_term)
                        self.promoting_term = 0
                        self.barrier_nonce = None
                    self._start_log_if_slave()
                    if self.role is Role.MASTER:
                        faults.hit("master.before_tail_check", self)
                        self._check_log_tail()
                        self._resume_master()
                    elif self.leader.id != self.id:
                        self.ready, self.state = False, State.CATCHING_UP
                        self._probe()
                    attempt, unreachable_since = 0, None
                    code = self._loop()
                    if code is not None:
                        return code
                except Fatal:
                    raise
                except pika.exceptions.AMQPError as exc:
                    # Broker restart or a stream still being created: reconnect.
                    # Unacked deliveries are redelivered; our state is what we committed.
                    self._set_broker(False)
                    attempt += 1
                    unreachable_since = unreachable_since or time.monotonic()
                    if time.monotonic() - unreachable_since > GIVE_UP_AFTER:
                        raise Fatal(f"the broker stays unreachable: {exc!r}") from None
                    log.warning("bus connection lost (%r); reconnecting", exc)
                    self._drop_connection()
                    time.sleep(min(0.2 * attempt, RECONNECT_MAX))
                    leader = self.leader
                    if self.role is Role.MASTER and leader.id != self.id and leader.term > self.store.term:
                        # Deposed while cut off (decisions.check_master_broker): our
                        # term is fenced, nothing more to do here.
                        raise Fatal(f"deposed while cut off from the broker: {leader.id} is master "
                                    f"for term {leader.term}") from None
        except Fatal as exc:
            log.error("fatal: %s", exc)
            return 70
        finally:
            self._close()

    def _loop(self) -> int | None:
        while True:
            self.conn.process_data_events(time_limit=0 if self.log_backlog else 0.05)
            if self.diverged_at is not None:
                if time.monotonic() - self.diverged_at >= DIVERGED_LINGER:
                    return EXIT_REBUILD
                continue
            if self.stopping:
                return self._drain_and_exit()
            self._apply_backlog()
            self._steer()
            if self.role is Role.MASTER:
                while self.pending_writes and not self.stopping:
                    self._commit_batch()
                    self.conn.process_data_events(time_limit=0)
                self._flush_replies()
            else:
                self._expire_parked()

    def _drop_connection(self) -> None:
        self.tags.clear()
        self.log_backlog.clear()     # re-read from our stored offset
        self.parked.clear()          # unacked: the broker redelivers them
        self.pending_writes.clear()  # likewise
        self.outgoing.clear()        # unsent replies: their requests were not acked, so they come again
        try:
            if self.conn is not None and self.conn.is_open:
                self.conn.close()
        except Exception:
            pass
        self.conn = None

    def _start_log_if_slave(self) -> None:
        if self.role is not Role.MASTER:
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
        declare_all(self.ch_work, self.names, self.settings)
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

    def _publish_log(self, body: bytes, *, fault_point: str | None = None) -> None:
        self.publishing_since = time.monotonic()     # watched by _watch_publish
        try:
            if fault_point:
                faults.hit(fault_point, self)          # pause:S stands for a confirm that does not come
            self.ch_pub.basic_publish(self.names.sync_exchange, "", body,
                                      pika.BasicProperties(delivery_mode=2, content_type="application/json"),
                                      mandatory=True)
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            raise Fatal(f"the log refused a record: {exc}") from None
        finally:
            self.publishing_since = None

    def _watch_publish(self) -> None:
        """The bound on a log append's confirm (EXIT_LOG_STUCK, above)."""
        limit = env_float("STRATUS_LOG_CONFIRM_TIMEOUT", LOG_CONFIRM_TIMEOUT_DEFAULT)
        while not self.stopping:
            since = self.publishing_since
            if since is not None and time.monotonic() - since > limit:
                log.error("a log append has had no confirm from the broker for %.1fs: exiting (role %s)",
                          time.monotonic() - since, self.role.value)
                logging.shutdown()
                os._exit(EXIT_LOG_STUCK)
            time.sleep(min(0.1, limit / 4))

    def _check_log_tail(self) -> None:
        """A master back on the bus: the log's last LSN must be its own before
        it appends again. More means another master wrote (we are deposed);
        less means records we had confirmed are gone. Either way, stop."""
        mine = self.store.applied_lsn
        tail = self._log_tail_lsn()
        if tail is None and mine == 0:
            return
        if tail != mine:
            raise Fatal(f"the log's tail is at LSN {tail}, this master's last LSN is {mine}: not appending")
        log.info("log tail checked after reconnecting: LSN %d", tail)

    def _log_tail_lsn(self) -> int | None:
        """The highest LSN among the log's last records: read from a little
        before this master's last append (or the last chunk), until quiet."""
        starts: list = []
        if self.last_append_wall is not None:
            starts.append(datetime.datetime.fromtimestamp(self.last_append_wall - TAIL_MARGIN, datetime.timezone.utc))
        starts.append("last")
        for start in starts:
            ch = self.conn.channel()
            ch.basic_qos(prefetch_count=LOG_PREFETCH)
            best: list[int] = []

            def on_record(_ch, method, _props, body):
                try:
                    rec = protocol.decode_record(body)
                except ValueError:
                    rec = {}
                if rec.get("type") == "entries":
                    best.extend(int(e["lsn"]) for e in rec.get("entries") or [])
                _ch.basic_ack(method.delivery_tag)
                got.append(1)

            got: list = []
            ch.basic_consume(self.names.log_stream, on_record, arguments={"x-stream-offset": start})
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                before = len(got)
                self.conn.process_data_events(time_limit=0.3)
                if len(got) == before and (got or time.monotonic() > deadline - 4.0):
                    break   # quiet for 0.3 s after records came, or nothing within 1 s
            try:
                ch.close()
            except Exception:
                pass
            if best:
                return max(best)
        return None

    def _probe(self) -> None:
        self.probe_nonce = uuid.uuid4().hex
        self.probe_sent_at = time.monotonic()
        self._publish_log(protocol.encode_probe(self.id, self.probe_nonce))

    def _steer(self) -> None:
        """React to the leader record and to whether the master must serve reads."""
        leader = self.leader
        if self.promoting_term and self.role is not Role.MASTER and (leader.id != self.id or leader.term > self.promoting_term):
            self._abandon_promotion(leader)
        if leader.id == self.id and leader.term > max(self.promoting_term, self.refused_term, self.identity_refused,
                                                      self.store.term if self.role is Role.MASTER else 0):
            self._begin_promotion(leader.term)
        elif self.role is Role.MASTER and leader.id != self.id and leader.term > self.store.term:
            raise Fatal(f"demoted: {leader.id} is master for term {leader.term}")
        if self.role is Role.MASTER:
            if self.master_serves_reads:
                self._consume("read", self.ch_work, self.names.read_queue, self._on_read_queue)
            else:
                self._cancel("read", self.ch_work)
        elif self.stalled and self.ready and not self.promoting_term:
            log.warning("not serving reads: %s", self.stalled)
            self.ready, self.state, self.reason = False, State.CATCHING_UP, self.stalled
            self.stall_unready = True
            self._cancel("read", self.ch_work)
            self.membership_changed.set()
        elif self.stall_unready and not self.stalled and not self.ready and not self.promoting_term:
            self.stall_unready = False
            self.reason = ""
            self._probe()

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
            if self.diverged_at is not None:
                self.log_backlog.clear()
                return
            if self.ch_log is not None and self.ch_log.is_open:
                self.ch_log.basic_ack(method.delivery_tag)
            if "log" not in self.tags:   # promoted meanwhile: the rest is for a slave
                self.log_backlog.clear()
                return

    def _apply_record(self, rec: dict, offset) -> None:
        kind = rec.get("type")
        if kind == "probe":
            if rec.get("nonce") == self.probe_nonce and self.role is Role.SLAVE and not self.ready:
                rtt = time.monotonic() - self.probe_sent_at
                if self.stalled:   # near the head, but not applying what the master writes
                    self.stall_unready = True
                elif rtt <= READY_PROBE_RTT:
                    self._become_ready()
                else:  # still replaying a long way behind the head: measure again
                    log.info("probe came back after %.1fs at LSN %d; catching up", rtt, self.store.applied_lsn)
                    self._probe()
            return
        term = rec["term"]
        if kind == "barrier":
            ident = rec.get("cluster")
            if isinstance(ident, str) and ident and not self.store.cluster_id:   # the first one read wins
                with self.store.transaction():
                    self.store.cluster_id = ident
            elif isinstance(ident, str) and ident and ident != self.store.cluster_id:
                log.warning("a barrier of term %s carries cluster %s; this store's is %s", term, ident,
                            self.store.cluster_id)
            mine = rec.get("nonce") == self.barrier_nonce and rec.get("master") == self.id
            if mine and self.foreign_term >= term:
                self._refuse_term(term)
                return
            if rec.get("master") != self.id:
                self.foreign_term = max(self.foreign_term, term)
            if term >= self.current_term:
                self.current_term = term
                with self.store.transaction():
                    self.store.term = term
                    self.store.term_master = str(rec.get("master") or "")
                    if offset is not None:
                        self.store.stream_offset = offset
            if mine:
                self._finish_promotion(term)
            return
        if term < self.current_term:
            log.info("ignoring %d entries of stale term %d (current %d)", len(rec["entries"]), term, self.current_term)
            return
        fresh = [e for e in rec["entries"] if e["lsn"] > self.store.applied_lsn]
        if not fresh:
            return
        try:
            with self.store.transaction():
                for e in fresh:
                    if e["lsn"] != self.store.applied_lsn + 1:
                        raise Gap(f"log gap: applied LSN {self.store.applied_lsn}, the next entry in the log is "
                                  f"{e['lsn']} (offset {offset})")
                    self.store.replay(e["ops"], e.get("id"), e["lsn"], e.get("result"))
                    self.store.applied_lsn = e["lsn"]
                if offset is not None:
                    self.store.stream_offset = offset
            self.log_entries_applied += len(fresh)
        except Gap as exc:
            self._diverge(str(exc))
            return
        except Exception as exc:  # the record applied on the master but not here: never skip it
            log.exception("log record at offset %s failed to apply", offset)
            self._diverge(f"the record at offset {offset} (LSN {fresh[0]['lsn']}) failed to apply: {exc!r:.300}")
            return
        if self.parked:
            self._serve_parked()

    def _diverge(self, reason: str) -> None:
        """Stop applying: this replica can no longer follow the log exactly.
        It says why in its membership, stops serving, and exits to be rebuilt."""
        log.error("diverged, stopping to be rebuilt: %s", reason)
        self.ready, self.state, self.reason = False, State.DIVERGED, reason
        self.diverged_at = time.monotonic()
        try:
            self._cancel("read", self.ch_work)
        except Exception:
            self.tags.pop("read", None)
        self._drop_log_channel()
        for item in self.parked:
            self._forward_to_master(*item[2:])
        self.parked.clear()

    def _become_ready(self) -> None:
        self.ready = True
        self.state = State.READY
        log.info("caught up at LSN %d: serving reads", self.store.applied_lsn)
        self._consume("read", self.ch_work, self.names.read_queue, self._on_read_queue)

    # --- promotion -----------------------------------------------------------
    def _begin_promotion(self, term: int) -> None:
        log.info("named master for term %d: draining the log first", term)
        self.promoting_term = term
        self.state = State.PROMOTING
        self._cancel("read", self.ch_work)   # reads go to ready slaves meanwhile
        for item in self.parked:
            self._forward_to_master(*item[2:])
        self.parked.clear()
        if "log" not in self.tags:
            self._start_log()
        self.barrier_nonce = uuid.uuid4().hex
        self._publish_log(self._barrier(term, self.barrier_nonce))
        self.last_append_wall = time.time()
        faults.hit("promotion.after_barrier", self)

    def _drop_log_channel(self) -> None:
        """Stop consuming the log by closing its channel, not by a cancel: a
        cancel makes pika nack the deliveries it has not handed over yet, and a
        stream refuses a nack (540, which closes the whole connection)."""
        self.tags.pop("log", None)
        ch, self.ch_log = self.ch_log, None
        try:
            if ch is not None and ch.is_open:
                ch.close()
        except (pika.exceptions.ChannelClosed, pika.exceptions.ChannelWrongStateError):
            pass

    def _abandon_promotion(self, leader: Leader) -> None:
        """Named master, but the leader record moved on before we finished:
        back to an ordinary slave that catches up again."""
        log.warning("promotion to term %d abandoned: the leader is now %s/%d", self.promoting_term, leader.id, leader.term)
        self.promoting_term = 0
        self.barrier_nonce = None
        self.ready, self.state = False, State.CATCHING_UP
        self._probe()

    def _barrier(self, term: int, nonce: str) -> bytes:
        """A barrier record, carrying the cluster identity this store holds."""
        rec = {"v": protocol.VERSION, "type": "barrier", "term": term, "master": self.id, "nonce": nonce}
        if self.store.cluster_id:
            rec["cluster"] = self.store.cluster_id
        return protocol.dumps(rec)

    def _settle_identity(self, term: int) -> str | None:
        """The identity this new master takes (None: it must not take writes)."""
        try:
            zk = read_identity(self.zk, self.paths)
            ident, why = settle_identity(zk.id if zk else None, self.store.cluster_id, uuid.uuid4().hex)
            if ident is not None and zk is None:
                won = claim_identity(self.zk, self.paths, ident).id
                if won != ident:   # another wrote one meanwhile
                    ident, why = settle_identity(won, self.store.cluster_id, "")
        except Exception as exc:
            raise Fatal(f"cannot settle the cluster identity with ZooKeeper: {exc!r}") from None
        if ident is None:
            log.error("named master for term %d: %s", term, why)
            self.identity_refused = term
            self.promoting_term = 0
            self.barrier_nonce = None
            self.ready, self.state, self.reason = False, State.CATCHING_UP, why
            self.membership_changed.set()
            self._probe()
            return None
        log.info("%s", why)
        return ident

    def _refuse_term(self, term: int) -> None:
        """Our barrier came back, but the log already holds a barrier of this
        term or a newer one from another master: taking writes at this term
        would fork history (every replica ignores a stale term). Stay a slave,
        say so (refused_term), and wait to be named again above it."""
        log.error("named master for term %d, but the log already holds term %d from another master: "
                  "refusing it (the orchestrator names a higher term)", term, self.foreign_term)
        self.refused_term = term
        self.promoting_term = 0
        self.barrier_nonce = None
        self.ready, self.state = False, State.CATCHING_UP
        self.reason = f"refused term {term}: the log already holds term {self.foreign_term}"
        self.membership_changed.set()
        self._probe()

    def _finish_promotion(self, term: int) -> None:
        if self.leader.id != self.id or self.leader.term != term:
            log.warning("barrier for term %d read back, but the leader is now %s/%d", term, self.leader.id, self.leader.term)
            return
        faults.hit("promotion.before_finish", self)
        ident = self._settle_identity(term)
        if ident is None:
            return
        # Stop reading the log: deliveries still in flight on the stream
        # consumer are dropped with its channel (a lost connection raises, and
        # run() reconnects and promotes again).
        self._drop_log_channel()
        stamp = ident != self.store.cluster_id   # our barrier did not carry it: the log gets it now
        with self.store.transaction():
            self.store.term = term
            self.store.cluster_id = ident
        if stamp:
            self._publish_log(self._barrier(term, uuid.uuid4().hex))
        self.role, self.state, self.ready = Role.MASTER, State.MASTER, True
        self.promoting_term = 0
        self.reason = ""
        self.term_checked_at = 0.0
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
            # dead-lettered, never redelivered
            self._respond(props, protocol.encode_error(exc, self.id), ch, method.delivery_tag, nack=True)
            return
        if req.kind != "read":
            self._respond(props, protocol.encode_error(BadRequest("writes go to writeQ, not readQ"), self.id),
                          ch, method.delivery_tag)
            return
        try:
            self._tenant(props)
        except Forbidden as exc:
            self._respond(props, protocol.encode_error(exc, self.id), ch, method.delivery_tag)
            return
        if may_park and self.role is Role.SLAVE and req.min_lsn and req.min_lsn > self.store.applied_lsn:
            self.parked.append((time.monotonic() + self.settings.min_lsn_wait, req.min_lsn, method, props, body))
            return
        self._serve_read(req, props, ch, method.delivery_tag)

    def _serve_read(self, req: protocol.Request, props, ch, tag) -> None:
        self.reads_served += 1
        try:
            result = self.store.read(req.body, self._tenant(props))
            out = protocol.Reply(result, self.store.applied_lsn, self.id).encode()
        except DBError as exc:
            out = protocol.encode_error(exc, self.id)
        except Exception as exc:  # never let one query take the worker down
            log.exception("read failed")
            out = protocol.encode_error(BadRequest(f"the read could not be run: {type(exc).__name__}",
                                                   code="rejected"), self.id)
        self._respond(props, out, ch, tag)

    def _serve_parked(self) -> None:
        keep = []
        for item in self.parked:
            deadline, min_lsn, method, props, body = item
            if min_lsn <= self.store.applied_lsn:
                self._serve_read(protocol.decode_request(body), props, self.ch_work, method.delivery_tag)
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

    def _tenant(self, props) -> str:
        """The tenant a request acts for: its validated user_id's (the broker
        refuses a user_id that is not the publisher's own, unless the
        publisher is the platform's impersonating account)."""
        tenant = tenancy.tenant_of(getattr(props, "user_id", None), cluster=self.settings.cluster,
                                   platform=self.platform_account)
        if tenant is None:
            raise Forbidden("a request must carry a validated user_id naming its tenant "
                            f"(got {getattr(props, 'user_id', None)!r:.80})")
        return tenant

    # --- replies ----------------------------------------------------------------
    def _respond(self, props, body: bytes, ch, tag, *, nack: bool = False, made_at: float | None = None) -> None:
        """Answer a request and settle its delivery. A slave answers at once;
        a master's answers wait in `outgoing` for a term check (fencing) that
        begins after `made_at`, when the answer was made."""
        if self.role is Role.MASTER:
            self.outgoing.append((props, body, ch, tag, nack, time.monotonic() if made_at is None else made_at))
            return
        self._send(props, body, ch, tag, nack)

    def _send(self, props, body: bytes, ch, tag, nack: bool) -> None:
        if props is not None and props.reply_to:
            self.ch_work.basic_publish("", props.reply_to, body, pika.BasicProperties(
                correlation_id=props.correlation_id, content_type="application/json"))
        if tag is not None:
            if nack:
                ch.basic_nack(tag, requeue=False)
            else:
                ch.basic_ack(tag)

    def _flush_replies(self) -> None:
        """Send a master's waiting answers once a term check that began after
        the oldest of them was made has confirmed the term."""
        if not self.outgoing:
            return
        if self.term_checked_at <= self.outgoing[0][5]:
            self._confirm_term()
        items, self.outgoing = self.outgoing, []
        for props, body, ch, tag, nack, _ in items:
            self._send(props, body, ch, tag, nack)

    def _confirm_term(self) -> None:
        """Fencing: does the leader record still name us for our term? Asked
        of ZooKeeper after a sync, so the answer is at least as new as the
        moment we asked (the sync and the read are sent together: FIFO client
        order serves the read after the sync). Unanswered within the session
        timeout: we stop."""
        started = time.monotonic()
        budget = self.settings.zk_timeout
        last_exc: Exception | None = None
        while True:
            left = budget - (time.monotonic() - started)
            if left <= 0:
                raise Fatal(f"cannot confirm the leader term within {budget:g}s ({last_exc!r}): "
                            "replying no more")
            try:
                # Pipelined: ZooKeeper runs one session's requests in the order
                # sent, so the read is served after the sync: one round trip, not two.
                synced = self.zk.sync_async(self.paths.leader)
                read = self.zk.get_async(self.paths.leader)
                synced.get(timeout=left)
                data, _ = read.get(timeout=max(0.01, budget - (time.monotonic() - started)))
                break
            except Exception as exc:  # connection loss, timeout: retry within the budget
                last_exc = exc
                time.sleep(0.02)
        d = json.loads(data) if data else {}
        if d.get("id") != self.id or int(d.get("term", 0)) != self.store.term:
            raise Fatal(f"stale master: term {self.store.term} was superseded by {d.get('id')}/{d.get('term')}")
        self.term_checked_at = started

    # --- master: writes ---------------------------------------------------------
    def _on_write(self, ch, method, props, body) -> None:
        self.pending_writes.append((method, props, body))

    def _commit_batch(self) -> None:
        n, size = 0, 0
        for _, _, body in self.pending_writes[:MAX_BATCH]:
            if n and size + len(body) > MAX_BATCH_BYTES:
                break
            n, size = n + 1, size + len(body)
        batch = self.pending_writes[:n]
        del self.pending_writes[:n]
        answers, entries = [], []   # answers: (method, props, reply body, dead-letter?)
        try:
            with self.store.transaction():
                for method, props, body in batch:
                    answers.append((method, props, *self._apply_write(props, body, entries)))
                made_at = time.monotonic()
                if entries:
                    self._publish_log(protocol.encode_entries(self.store.term, self.id, entries),
                                      fault_point="master.log_append")
                    self.last_append_wall = time.time()
                    self._confirm_term()
                    self.write_batches += 1
        except Fatal:
            raise
        except Exception as exc:
            raise Fatal(f"write batch failed: {exc!r}") from exc
        finally:
            lines, self.request_lines = self.request_lines, []
        for line in lines:
            log.info(*line)
        for method, props, out, dead in answers:
            self._respond(props, out, self.ch_work, method.delivery_tag, nack=dead, made_at=made_at)
        self._flush_replies()
        faults.hit("master.after_commit", self)

    def _apply_write(self, props, body: bytes, entries: list) -> tuple[bytes, bool]:
        """One write of a batch, inside the batch's transaction: (reply, dead-letter?).
        A request's own failure is its error reply; only the store's machinery
        (its file, its connection) may raise out of here."""
        try:
            req = protocol.decode_request(body)
            if req.kind != "write":
                raise BadRequest("reads go to readQ, not writeQ")
        except BadRequest as exc:
            dead = exc.code in ("bad_request", "unsupported_version") and req_unparsable(body)
            return protocol.encode_error(exc, self.id), dead
        try:
            tenant = self._tenant(props)
        except Forbidden as exc:
            return protocol.encode_error(exc, self.id), False
        # One tenant's request id never answers for another's.
        key = req.id if tenant == tenancy.PLATFORM else f"{tenant}:{req.id}"
        seen = self.store.seen(key)
        if seen is not None:  # a retry, or redelivered after a crash: answer, don't apply twice
            self.write_counts["duplicate"] += 1
            if self.log_requests:
                self.request_lines.append(("write %s tenant %s answered again (lsn %d)", req.id, tenant, seen[0]))
            return protocol.Reply(seen[1], seen[0], self.id).encode(), False
        lsn = self.store.applied_lsn + 1
        try:
            results, resolved = self.store.apply_request(req.body.get("ops"), lsn, key, tenant)
        except DBError as exc:
            self.write_counts["refused"] += 1
            if self.log_requests:
                self.request_lines.append(("write %s tenant %s refused: %s", req.id, tenant, exc.code))
            return protocol.encode_error(exc, self.id), False
        except (sa_exc.DBAPIError, sa_exc.ResourceClosedError, sa_exc.PendingRollbackError):
            raise   # the store itself failed: not this request's doing
        except Exception as exc:
            # A bug the store's validation missed: this request is refused,
            # its savepoint is rolled back, and the worker goes on.
            log.exception("write %s could not be applied", req.id)
            return protocol.encode_error(BadRequest(f"the write could not be applied: {type(exc).__name__}",
                                                    code="rejected"), self.id), False
        self.store.applied_lsn = lsn
        self.write_counts["applied"] += 1
        entries.append({"lsn": lsn, "id": key, "ops": resolved, "result": results})
        if self.log_requests:
            self.request_lines.append(("write %s tenant %s lsn %d", req.id, tenant, lsn))
        return protocol.Reply(results, lsn, self.id).encode(), False

    # --- leaving ------------------------------------------------------------------
    def _drain_and_exit(self) -> int:
        """Stop consuming, finish what is in flight, then exit (scale-down)."""
        self.state = State.DRAINING
        log.info("draining")
        for name in ("read", "write", "master_read"):
            self._cancel(name, self.ch_work)
        self.conn.process_data_events(time_limit=0)
        while self.role is Role.MASTER and self.pending_writes:
            self._commit_batch()
        self._flush_replies()
        for item in self.parked:
            self._forward_to_master(*item[2:])
        self.parked.clear()
        self.conn.process_data_events(time_limit=0)
        return 0


def foreign_term_at_start(store_term: int, term_master: str, me: str) -> int:
    """The highest barrier term another master wrote, as far as a store
    tells at start: its term, unless its highest barrier was this worker's
    own (then every other master's is below it); a store that does not say
    whose it was (an older one) counts as another's."""
    if term_master and term_master == me:
        return max(store_term - 1, 0)
    return store_term


def stall_reason(master_lsn: int, mine: int, behind_for: float, term: int, master_term: int,
                 bound: float = STALL_BOUND) -> str:
    """Why a slave must not serve reads ("" when it may): it has applied
    nothing for `bound` seconds while the master's applied LSN is ahead."""
    if master_lsn <= mine or behind_for < bound:
        return ""
    why = f"the master is at LSN {master_lsn}, this replica stalls at {mine} for {behind_for:.1f}s"
    if master_term < term:
        why += f" (the master's term {master_term} is below the log's {term}: its entries are ignored)"
    return why


def req_unparsable(body: bytes) -> bool:
    """True when a message is not even a JSON object: it is dead-lettered."""
    try:
        return not isinstance(json.loads(body), dict)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return True
