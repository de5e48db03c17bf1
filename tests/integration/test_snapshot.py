"""A bounded log and snapshots, on the real broker and ZooKeeper: a new slave
whose log has lost its first records starts from a member's snapshot and
converges to the master; a worker that meets the gap is rebuilt; a snapshot
is served while writes go on; an older stream's arguments are kept."""
import logging
import time

import pika

from bus import ops
from bus.client import connection_params
from bus.names import Names
from bus.protocol import decode_record
from bus.topology import declare_all, delete_cluster
from worker.snapshot import fetch_snapshot
from harness import EV_TABLE, Writers, check_no_loss, wait_for

TINY_LOG = {"log_segment_bytes": 20_000, "log_max_bytes": 60_000}
PAD = "p" * 100


def first_lsn_in_log(cluster, timeout: float = 10.0) -> int | None:
    """The lowest LSN a consumer reading the stream from "first" sees."""
    conn = pika.BlockingConnection(connection_params(cluster.settings.amqp_url))
    try:
        ch = conn.channel()
        ch.basic_qos(prefetch_count=100)
        lsns: list[int] = []

        def on(_ch, method, _props, body):
            rec = decode_record(body)
            if rec.get("type") == "entries":
                lsns.extend(e["lsn"] for e in rec["entries"])
            _ch.basic_ack(method.delivery_tag)

        ch.basic_consume(cluster.names.log_stream, on, arguments={"x-stream-offset": "first"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:   # read it all (until quiet): nothing is left to nack
            n = len(lsns)
            conn.process_data_events(time_limit=0.3)
            if lsns and len(lsns) == n:
                break
        return min(lsns) if lsns else None
    finally:
        try:
            conn.close()
        except pika.exceptions.AMQPError:
            pass   # a cancel nacks undelivered records, which a stream refuses (540): we are done anyway


def fill(db, writes: int, rows: int = 50, start: int = 0) -> int:
    lsn = 0
    for j in range(start, start + writes):
        lsn = db.write([ops.insert_many("kv", [{"k": f"k{j}-{i}", "v": i, "pad": PAD} for i in range(rows)])]).lsn
    return lsn


def create_kv(db) -> None:
    db.create_table("kv", [ops.column("k", "text", nullable=False), ops.column("v", "integer"),
                           ops.column("pad", "text")], ["k"])


def converged(cluster, worker_id: str, master: str, lsn: int, timeout: float = 30.0) -> None:
    wait_for(lambda: cluster.workers().get(worker_id, {}).get("applied_lsn", 0) >= lsn, timeout,
             what=f"{worker_id} to apply LSN {lsn}")
    assert cluster.checksum(worker_id) == cluster.checksum(master)


def test_new_slave_starts_from_a_snapshot_when_the_log_lost_its_first_records(make_cluster):
    cluster = make_cluster(**TINY_LOG)
    cluster.bootstrap(slaves=1)
    db = cluster.client(name="t")
    create_kv(db)
    fill(db, 80)                               # about 6 kB per record: far more than 60 kB
    first = first_lsn_in_log(cluster)
    assert first is not None and first > 1, f"the log still starts at LSN {first}: retention did not apply"

    # Without a snapshot, a new worker meets the gap, says so, and exits 77; its store stays
    # there for inspection, marked to be rebuilt.
    store = cluster.db_path("s2")
    p = cluster.start_worker("s2", STRATUS_SNAPSHOT_FETCH="0")
    assert p.wait(30) == 77, cluster.log("s2")
    assert "log gap" in cluster.log("s2")
    assert store.exists() and store.with_name("store.sqlite.rebuild").exists()

    # Started again (as the orchestrator would), it moves the store aside, fetches a snapshot,
    # replays the tail and converges.
    cluster.start_worker("s2")
    cluster.wait_ready(["s2"])
    assert store.with_name("store.sqlite.diverged").exists()
    assert not store.with_name("store.sqlite.rebuild").exists()
    assert "fetched the snapshot" in cluster.log("s2")
    assert "starting from the snapshot" in cluster.log("s2")
    last = fill(db, 5, start=1000)
    converged(cluster, "s2", "w1", last)
    assert cluster.checksum("s2") == cluster.checksum("s1")
    assert all(cluster.procs[k].poll() is None for k in ("w1", "s1", "s2"))


def test_a_snapshot_is_served_while_writes_go_on(make_cluster):
    cluster = make_cluster(snapshot_every=1)
    cluster.bootstrap(slaves=1)
    db = cluster.client(name="t")
    create_kv(db)
    db.write([EV_TABLE])
    fill(db, 20)
    # periodic snapshots (every second) appear once the slave is ready
    snaps = cluster.db_path("s1").parent / "snapshots" / "latest.json"
    wait_for(snaps.exists, 15, what="a periodic snapshot of s1")
    with Writers(db, n=3) as writers:
        wait_for(lambda: len(writers.acked) > 20, 20, what="writes going on")
        cluster.start_worker("s2")
        cluster.wait_ready(["s2"], timeout=40)
        wait_for(lambda: len(writers.acked) > 60, 20, what="more writes after s2 joined")
    assert writers.acked, "no write was acknowledged"
    assert "fetched the snapshot" in cluster.log("s2")
    top = max(a[2] for a in writers.acked)
    last = fill(db, 1, start=5000)
    assert last > top
    converged(cluster, "s2", "w1", last)
    check_no_loss(db, writers)


def test_an_existing_log_stream_keeps_its_arguments(cluster, caplog):
    names = Names(cluster.name)
    conn = pika.BlockingConnection(connection_params(cluster.settings.amqp_url))
    try:
        ch = conn.channel()
        ch.queue_declare(names.log_stream, durable=True, arguments={"x-queue-type": "stream"})  # an older cluster
        with caplog.at_level(logging.WARNING, logger="stratus.topology"):
            declare_all(ch, names, cluster.settings)
            declare_all(ch, names, cluster.settings)
        assert ch.is_open
        assert sum("exists with other arguments" in r.getMessage() for r in caplog.records) == 1
        ch.basic_publish(names.sync_exchange, "", b"{}")   # still bound to the log's exchange
        delete_cluster(ch, names)
    finally:
        conn.close()


def test_a_masters_snapshot_resumes_the_log_early_enough(cluster, tmp_path):
    """With no slave ready the master serves: its stored offset is where it
    stopped reading (its barrier), before its own writes. The new slave
    starts there, skips what the snapshot holds, and loses nothing."""
    # Nobody ready: no snapshot, and a bounded answer.
    t0 = time.monotonic()
    assert fetch_snapshot(cluster.settings, cluster.names, tmp_path / "x.sqlite", consumer_wait=0.5) is None
    assert time.monotonic() - t0 < 10 and not (tmp_path / "x.sqlite").exists()
    cluster.bootstrap(slaves=0)
    db = cluster.client(name="t")
    create_kv(db)
    fill(db, 10)
    cluster.start_worker("s1")
    cluster.wait_ready(["s1"])
    assert "fetched the snapshot" in cluster.log("s1") and "from w1" in cluster.log("s1")
    last = fill(db, 3, start=100)
    converged(cluster, "s1", "w1", last)
