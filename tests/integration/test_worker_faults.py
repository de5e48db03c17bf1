"""Faults at the worst moments, against real workers on the real broker and
ZooKeeper (issue #13, sections 1-4):

- a deposed master says nothing: paused past its session, replaced, resumed;
- a promotion finishes after a dropped connection between its barrier's
  publish and read-back, with deliveries in flight on its stream consumer, and
  across a broker restart;
- a replica never skips a record that fails to apply, nor applies past a gap:
  it reports itself diverged with the reason and exits to be rebuilt;
- a master that reconnects checks the log's tail before appending again.

Faults inside a worker are named in STRATUS_FAULTS (worker/faults.py)."""
from __future__ import annotations

import json
import signal
import time
import uuid

import pika
import pytest

from bus import ops, protocol, tenancy
from bus.client import connection_params
from bus.errors import DBError
from harness import restart_rabbitmq, wait_for

KV = ops.create_table("kv", [ops.column("k", "text", nullable=False), ops.column("v", "integer")], ["k"])


def write_until_acked(db, op_list, timeout: float = 20.0, each: float = 2.0):
    """Write with one request id until acknowledged (a retry is answered, never applied twice)."""
    rid = uuid.uuid4().hex
    deadline = time.monotonic() + timeout
    while True:
        try:
            return db.write(op_list, timeout=each, request_id=rid)
        except DBError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class Raw:
    """A bare AMQP connection: publish hand-made requests and log records,
    and collect the replies that come back."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.conn = pika.BlockingConnection(connection_params(cluster.settings.amqp_url))
        self.ch = self.conn.channel()
        self.reply_q = self.ch.queue_declare("", exclusive=True).method.queue
        self.replies: dict[str, dict] = {}
        self.ch.basic_consume(self.reply_q, self._on_reply, auto_ack=True)

    def _on_reply(self, ch, method, props, body):
        self.replies[props.correlation_id] = json.loads(body)

    def request(self, queue: str, kind: str, body: dict) -> str:
        req = protocol.Request(kind=kind, body=body)
        self.ch.basic_publish("", queue, req.encode(),
                              pika.BasicProperties(reply_to=self.reply_q, correlation_id=req.id,
                                                   user_id=tenancy.platform_user(self.cluster.settings.amqp_url)))
        return req.id

    def record(self, raw: bytes) -> None:
        self.ch.basic_publish(self.cluster.names.sync_exchange, "", raw, pika.BasicProperties(delivery_mode=2))

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.conn.process_data_events(time_limit=0.1)

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass


@pytest.fixture
def raw(cluster):
    r = Raw(cluster)
    yield r
    r.close()


def term_of(cluster) -> int:
    from bus.cluster import read_leader
    return read_leader(cluster.zk, cluster.paths)[0].term


# --- 3. a deposed master says nothing ------------------------------------------
@pytest.mark.parametrize("session", ["expired", "alive"])
def test_a_paused_then_deposed_master_answers_nothing(make_cluster, session):
    """Paused master w1 is replaced by s1, which changes the data; then w1 is
    resumed with requests for it already in its buffers. With its session
    expired, or still alive (a 4 s session: only the term check can stop it),
    no client gets an answer from w1."""
    cluster = make_cluster(zk_timeout=4.0) if session == "alive" else make_cluster()
    raw = Raw(cluster)
    try:
        _deposed_master_case(cluster, raw, session)
    finally:
        raw.close()


def _deposed_master_case(cluster, raw, session):
    cluster.bootstrap(slaves=1)
    db = cluster.client()
    db.write([KV, ops.insert("kv", {"k": "x", "v": 1})])
    lsn = db.write([ops.upsert("kv", {"k": "x", "v": 1})]).lsn
    wait_for(lambda: cluster.workers()["s1"]["applied_lsn"] >= lsn, 10, what="s1 to catch up")

    cluster.signal("w1", signal.SIGSTOP)
    paused = time.monotonic()
    try:
        if session == "expired":
            wait_for(lambda: "w1" not in cluster.workers(), 10, what="w1's session to expire")
        cluster.promote("s1")
        cluster.wait_master("s1")
        write_until_acked(db, [ops.upsert("kv", {"k": "x", "v": 2})], each=0.5)   # changed on the new master
        # Requests that the broker hands to either consumer of the master's queues;
        # the paused one takes its share into its buffers.
        reads = [raw.request(cluster.names.master_read_queue, "read", ops.select("kv", [ops.eq("k", "x")]))
                 for _ in range(40)]
        ids = reads + [raw.request(cluster.names.write_queue, "write",
                                   {"ops": [ops.upsert("kv", {"k": f"n{i}", "v": i})]}) for i in range(40)]
        raw.pump(0.3)
    finally:
        cluster.signal("w1", signal.SIGCONT)
    if session == "alive":
        assert time.monotonic() - paused < 3.5, "the pause outlived the session: the case did not happen"
    deadline = time.monotonic() + 30
    while len(raw.replies) < len(ids) and time.monotonic() < deadline:
        raw.pump(0.5)
    assert set(raw.replies) == set(ids), f"{len(ids) - len(raw.replies)} requests were never answered"
    by = {}
    for rid, rep in raw.replies.items():
        by.setdefault(rep.get("worker"), []).append(rid)
    assert set(by) == {"s1"}, {w: len(r) for w, r in by.items()}   # nothing from w1
    assert all(raw.replies[r]["ok"] for r in ids)
    assert [raw.replies[r]["result"] for r in reads] == [[{"k": "x", "v": 2}]] * len(reads)   # none stale
    wait_for(lambda: cluster.procs["w1"].poll() is not None, 10, what="the deposed master to exit")
    if session == "alive":
        log = cluster.log("w1")
        assert "stale master" in log or "demoted" in log, log[-2000:]


# --- 2. every promotion finishes -------------------------------------------------
def report(scenario: str, seconds: float) -> None:
    """A recovery time, in the form benchmarks/promotion_faults.py collects."""
    print(f"\nRECOVERY {scenario} {seconds:.3f}")


def _fail_over_to_s1(cluster, db) -> float:
    """kill -9 the master, name s1; returns the time of the kill."""
    t0 = time.monotonic()
    cluster.kill("w1")
    cluster.promote("s1")
    return t0


def test_promotion_finishes_after_its_connection_drops_between_barrier_and_read_back(cluster):
    cluster.bootstrap(slaves=0)
    cluster.start_worker("s1", STRATUS_FAULTS="promotion.after_barrier=drop_connection")
    cluster.wait_ready(["s1"])
    db = cluster.client()
    db.write([KV, ops.insert("kv", {"k": "a", "v": 1})])
    t0 = _fail_over_to_s1(cluster, db)
    write_until_acked(db, [ops.insert("kv", {"k": "b", "v": 2})])
    took = time.monotonic() - t0
    log = cluster.log("s1")
    assert "fault injected at promotion.after_barrier" in log
    assert "starting the promotion again" in log
    cluster.wait_master("s1", timeout=5)
    rows = db.read(ops.select("kv", order_by=[["k", "asc"]])).result
    assert [r["k"] for r in rows] == ["a", "b"]
    report("connection-dropped-after-barrier", took)   # from the kill of the old master
    assert took < 15


def test_promotion_finishes_with_deliveries_in_flight_on_its_stream_consumer(cluster, raw):
    cluster.bootstrap(slaves=0)
    cluster.start_worker("s1", STRATUS_FAULTS="promotion.before_finish=pause:1")
    cluster.wait_ready(["s1"])
    db = cluster.client()
    db.write([KV, ops.insert("kv", {"k": "a", "v": 1})])
    _fail_over_to_s1(cluster, db)
    # While s1 sits between reading its barrier and cancelling its consumer,
    # the log keeps growing: its prefetch fills with deliveries in flight.
    t_end = time.monotonic() + 2.0
    n = 0
    while time.monotonic() < t_end:
        raw.record(protocol.encode_probe("noise", uuid.uuid4().hex))
        n += 1
        if n % 50 == 0:
            raw.pump(0.01)
    write_until_acked(db, [ops.insert("kv", {"k": "b", "v": 2})])
    report("deliveries-in-flight-at-cancel", time.monotonic() - t_end)   # from the end of the flood
    assert "fault injected at promotion.before_finish" in cluster.log("s1")
    cluster.wait_master("s1", timeout=5)
    assert cluster.procs["s1"].poll() is None


@pytest.mark.slow
def test_promotion_finishes_across_a_broker_restart(cluster):
    cluster.bootstrap(slaves=0)
    cluster.start_worker("s1", STRATUS_FAULTS="promotion.after_barrier=pause:3")
    cluster.wait_ready(["s1"])
    db = cluster.client()
    db.write([KV, ops.insert("kv", {"k": "a", "v": 1})])
    _fail_over_to_s1(cluster, db)
    wait_for(lambda: "fault injected at promotion.after_barrier" in cluster.log("s1"), 10, what="s1 to promote")
    restart_rabbitmq(down_for=0.5)
    back = time.monotonic()
    write_until_acked(db, [ops.insert("kv", {"k": "b", "v": 2})], timeout=60)
    took = time.monotonic() - back
    cluster.wait_master("s1", timeout=5)
    report("broker-restart-mid-promotion", took)   # from the broker being back
    rows = db.read(ops.select("kv", order_by=[["k", "asc"]])).result
    assert [r["k"] for r in rows] == ["a", "b"]


# --- 1 and 4. replicas never skip, never apply past a gap -------------------------------
def _forged_entries(cluster, lsn: int, ops_list: list) -> bytes:
    return protocol.encode_entries(term_of(cluster), "w1", [{"lsn": lsn, "id": uuid.uuid4().hex,
                                                             "ops": ops_list, "result": [{}]}])


def _wait_diverged(cluster, wid: str) -> dict:
    seen = wait_for(lambda: (w := cluster.workers().get(wid)) and w.get("state") == "diverged" and w, 15,
                    interval=0.02, what=f"{wid} to report itself diverged")
    assert cluster.procs[wid].wait(15) == 77
    return seen


def test_a_record_that_fails_on_a_replica_stops_it_and_it_exits_to_be_rebuilt(cluster, raw):
    cluster.bootstrap(slaves=1)
    db = cluster.client()
    lsn = db.write([KV, ops.insert("kv", {"k": "a", "v": 1})]).lsn
    wait_for(lambda: cluster.workers()["s1"]["applied_lsn"] >= lsn, 10, what="s1 to catch up")
    before = cluster.checksum("s1")
    raw.record(_forged_entries(cluster, lsn + 1, [{"op": "insert", "table": "nope", "rows": [{"x": 1}]}]))
    seen = _wait_diverged(cluster, "s1")
    assert not seen["ready"] and "failed to apply" in seen["reason"] and str(lsn + 1) in seen["reason"]
    assert cluster.checksum("s1") == before           # nothing of the record, nothing after it
    assert seen["applied_lsn"] == lsn                 # never skipped


def test_a_replica_never_applies_past_a_gap(cluster, raw):
    cluster.bootstrap(slaves=1)
    db = cluster.client()
    lsn = db.write([KV, ops.insert("kv", {"k": "a", "v": 1})]).lsn
    wait_for(lambda: cluster.workers()["s1"]["applied_lsn"] >= lsn, 10, what="s1 to catch up")
    raw.record(_forged_entries(cluster, lsn + 5, [{"op": "insert", "table": "kv", "rows": [{"k": "z", "v": 9}]}]))
    seen = _wait_diverged(cluster, "s1")
    assert "gap" in seen["reason"] and seen["applied_lsn"] == lsn
    assert cluster.procs["w1"].poll() is None        # the master is not concerned


# --- 4. a master that reconnects checks the log's tail --------------------------------------
def test_a_master_reconnecting_checks_the_log_tail_and_goes_on(cluster):
    cluster.promote("w1")
    cluster.start_worker("w1", STRATUS_FAULTS="master.after_commit=drop_connection")
    cluster.wait_master("w1")
    db = cluster.client()
    db.write([KV])
    for i in range(5):
        write_until_acked(db, [ops.insert("kv", {"k": f"k{i}", "v": i})])
    log = cluster.log("w1")
    assert "fault injected at master.after_commit" in log and "log tail checked after reconnecting" in log
    assert db.read(ops.count("kv")).result == 5
    assert cluster.procs["w1"].poll() is None


def test_a_master_whose_log_tail_moved_on_does_not_append(cluster, raw):
    cluster.promote("w1")
    cluster.start_worker("w1", STRATUS_FAULTS="master.after_commit=drop_connection,master.before_tail_check=pause:2")
    cluster.wait_master("w1")
    db = cluster.client()
    lsn = db.write([KV]).lsn
    wait_for(lambda: "fault injected at master.before_tail_check" in cluster.log("w1"), 10, what="the reconnect")
    raw.record(_forged_entries(cluster, lsn + 1, [{"op": "insert", "table": "kv", "rows": [{"k": "x", "v": 1}]}]))
    assert cluster.procs["w1"].wait(20) == 70
    assert "the log's tail is at LSN" in cluster.log("w1")


def test_a_master_whose_log_append_is_never_confirmed_exits_and_nothing_is_lost(cluster):
    """A publish on the log stream that the broker neither confirms nor refuses
    (seen after the stream leader's node died, on 3 nodes) must not hang the
    master: past STRATUS_LOG_CONFIRM_TIMEOUT it exits 76, having answered
    nothing for that batch, and the write, sent again with its request id,
    is applied once by the next master."""
    cluster.promote("w1")
    cluster.start_worker("w1", STRATUS_FAULTS="master.log_append=pause:60", STRATUS_LOG_CONFIRM_TIMEOUT="1")
    cluster.wait_master("w1")
    cluster.start_worker("s1")
    cluster.wait_ready(["s1"])
    db = cluster.client()
    rid = uuid.uuid4().hex
    t0 = time.monotonic()
    with pytest.raises(DBError):
        db.write([KV, ops.insert("kv", {"k": "a", "v": 1})], timeout=4, request_id=rid)   # w1 is stuck
    code = wait_for(lambda: cluster.procs["w1"].poll(), 10, what="the stuck master to exit")
    assert code == 76, code
    took = time.monotonic() - t0
    assert "no confirm from the broker" in cluster.log("w1")
    cluster.promote("s1")
    cluster.wait_master("s1", timeout=10)
    deadline = time.monotonic() + 20
    while True:
        try:
            db.write([KV, ops.insert("kv", {"k": "a", "v": 1})], timeout=2, request_id=rid)
            break
        except DBError:
            assert time.monotonic() < deadline, "the write was never acknowledged by the next master"
            time.sleep(0.1)
    rows = db.read(ops.select("kv")).result
    assert rows == [{"k": "a", "v": 1}], rows
    report("log-append-unconfirmed", took)
