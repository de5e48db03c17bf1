"""ZooKeeper forgets a cluster (issue #23): its data directory lost, or an old
backup restored, while the broker keeps the replication log and the workers
run on. The real orchestrator, workers, RabbitMQ and ZooKeeper; the amnesia is
the deletion of this cluster's whole znode tree (Paths.root), which is what
the orchestrator and the workers see after an empty ZooKeeper, without
disturbing the other clusters that share the server.

Before the fix the orchestrator found no leader record, handed out term 1
over a log that held a term-2 barrier, every slave ignored the new master's
entries as a stale term while staying ready (stale reads), and the next
crash/master promoted a stale slave: everything written since was lost."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
from kazoo.exceptions import NoNodeError

from bus import ops
from bus.cluster import read_identity
from harness import EV_TABLE, Writers, check_no_loss, wait_for
from test_orchestrator import Orch, cleanup


def forget_everything(cluster) -> None:
    """Delete the cluster's znode tree at once (one ZooKeeper transaction,
    deepest first), as an empty ZooKeeper has it: nobody sees half a tree. A
    worker re-creating its record meanwhile fails the transaction: again."""
    zk = cluster.zk
    for _ in range(50):
        nodes: list[str] = []

        def walk(path: str) -> None:
            try:
                children = zk.get_children(path)
            except NoNodeError:
                return
            for c in children:
                walk(f"{path}/{c}")
            nodes.append(path)
        walk(cluster.paths.root)
        tx = zk.transaction()
        for path in nodes:
            tx.delete(path)
        if not any(isinstance(r, Exception) for r in tx.commit()):
            return
    raise AssertionError("could not delete the cluster's znodes")


def healthy_at_term_above(orch, term: int, timeout: float = 60.0) -> dict:
    def ok():
        v = orch.view()
        ws = v["workers"]
        masters = [w for w in ws if w["role"] == "master" and w["state"] == "master" and w["id"] == v["leader"]]
        return (v["term"] > term and len(masters) == 1 and masters[0]["term"] == v["term"]
                and any(w["role"] == "slave" and w["ready"] for w in ws) and v)
    return wait_for(ok, timeout, 0.2, what=f"a master for a term above {term} and a ready slave")


@pytest.mark.parametrize("orchestrator", ["stays", "restarts"])
def test_zookeeper_amnesia_then_crash_master_loses_nothing(cluster, orchestrator):
    """With the orchestrator leading throughout, or (as after a ZooKeeper
    restart, which ends its session) a new orchestrator that adopts the
    running workers once they have registered again in the empty tree."""
    orch = a = Orch(cluster, "orch-a")
    b = None
    try:
        orch.wait_healthy_cluster(1)
        db = cluster.client(name="writers")
        db.write([EV_TABLE])
        with Writers(db, 4) as writers:
            wait_for(lambda: len(writers.acked) >= 100, 30, what="100 acknowledged writes")
            # a first failover: the log holds a term-2 barrier
            assert orch.post("/api/v1/crash/master")[0] == 200
            v = healthy_at_term_above(orch, 1)
            assert v["term"] == 2
            t = time.monotonic()
            wait_for(lambda: len(writers.acked_after(t)) >= 100, 30, what="writes at term 2")
            ids = {w["id"] for w in v["workers"]}
            identity = read_identity(cluster.zk, cluster.paths)
            assert identity is not None   # the first master made one

            if orchestrator == "restarts":
                os.killpg(a.proc.pid, signal.SIGKILL)   # the workers run on
                a.proc.wait(10)
            forget_everything(cluster)
            t_amnesia = time.monotonic()
            if orchestrator == "restarts":
                wait_for(lambda: ids <= set(cluster.workers()), 15, 0.1, what="the workers to register again")
                orch = b = Orch(cluster, "orch-b")
            v = healthy_at_term_above(orch, 2)
            term = v["term"]
            assert read_identity(cluster.zk, cluster.paths).id == identity.id   # rebuilt from the log
            wait_for(lambda: len(writers.acked_after(t_amnesia)) >= 200, 60, what="writes after the amnesia")

            # the next failover must not promote a stale replica
            status, body, _ = orch.post("/api/v1/crash/master")
            assert status == 200, body
            t_crash = time.monotonic()
            v = healthy_at_term_above(orch, term)
            wait_for(lambda: len(writers.acked_after(t_crash)) >= 100, 60, what="writes after the crash")
        acked, stored = check_no_loss(db, writers)
        print(f"\n{acked} acknowledged writes, {stored} rows; terms 2 -> {term} -> {v['term']}")
        assert len(writers.acked_after(t_amnesia)) >= 300

        # no replica serves stale reads: every ready slave follows the master's
        # term and reaches its LSN, and every read from readQ sees every row
        v = orch.wait_healthy_cluster(1)
        master = next(w for w in v["workers"] if w["id"] == v["leader"])

        def slaves_caught_up():
            ws = orch.view()["workers"]
            ready = [w for w in ws if w["role"] == "slave" and w["ready"]]
            return ready and all(w["applied_lsn"] >= master["applied_lsn"] and w["term"] == v["term"] for w in ready)
        wait_for(slaves_caught_up, 15, 0.1, what="the ready slaves to reach the master's LSN at its term")
        for _ in range(20):
            assert db.read(ops.count("ev")).result == stored
    finally:
        cleanup(cluster, *(o for o in (a, b) if o is not None))


def test_a_bootstrap_over_a_log_with_history_takes_a_term_above_it(cluster):
    """No worker left and ZooKeeper empty, the log intact: the orchestrator
    bootstraps with term 1 (nothing tells it more), the fresh worker replays
    the log, finds a term-2 barrier before its own, refuses term 1, and is
    named again above it. Every row is there, and its slaves follow it."""
    a = Orch(cluster, "orch-a")
    b = None
    try:
        a.wait_healthy_cluster(1)
        db = cluster.client()
        db.write([EV_TABLE])
        keys = []
        for i in range(30):
            keys.append(f"before-{i}")
            db.write([ops.insert("ev", {"id": ops.seq("ev"), "k": keys[-1]})])
        assert a.post("/api/v1/crash/master")[0] == 200
        healthy_at_term_above(a, 1)
        for i in range(30):
            keys.append(f"term2-{i}")
            db.write([ops.insert("ev", {"id": ops.seq("ev"), "k": keys[-1]})], timeout=15)
        identity = read_identity(cluster.zk, cluster.paths)
        a.stop()                      # every worker stops
        forget_everything(cluster)
        b = Orch(cluster, "orch-b")
        v = healthy_at_term_above(b, 2)
        assert v["term"] == 3, v
        assert "refused term 1: the log already holds term 2" in cluster.log("orch-b")
        assert read_identity(cluster.zk, cluster.paths).id == identity.id
        lsn = db.write([ops.insert("ev", {"id": ops.seq("ev"), "k": "after"})], timeout=15).lsn
        rows = db.read(ops.select("ev", order_by=[["id", "asc"]]), min_lsn=lsn).result
        assert [r["k"] for r in rows] == keys + ["after"]
        assert db.read(ops.count("ev"), min_lsn=lsn).result == len(keys) + 1
    finally:
        cleanup(cluster, *(o for o in (a, b) if o is not None))


def test_a_zookeeper_of_another_cluster_stops_the_bootstrap_with_the_error(cluster):
    """ZooKeeper holds another cluster's identity (say, another cluster's
    backup) over this cluster's log: the new worker reads the log's identity,
    and no master is made (no fork) until the operator puts things right;
    then the cluster comes back with every row."""
    a = Orch(cluster, "orch-a")
    b = None
    try:
        a.wait_healthy_cluster(1)
        db = cluster.client()
        db.write([EV_TABLE])
        lsn = 0
        for i in range(20):
            lsn = db.write([ops.insert("ev", {"id": ops.seq("ev"), "k": f"k{i}"})]).lsn
        identity = read_identity(cluster.zk, cluster.paths)
        a.stop()
        forget_everything(cluster)
        cluster.zk.create(cluster.paths.identity, b'{"id": "another-cluster", "created": 1}', makepath=True)
        b = Orch(cluster, "orch-b")
        error = "cluster identity mismatch: ZooKeeper holds another-cluster, the log of worker"
        wait_for(lambda: error in cluster.log("orch-b"), 30, 0.2, what="the orchestrator to stop on the mismatch")
        v = b.view()
        assert not any(w["role"] == "master" for w in v["workers"]), v["workers"]
        assert v["term"] == 1   # the bootstrap's naming, never taken up, never renumbered
        time.sleep(2)
        assert not any(w["role"] == "master" for w in b.view()["workers"])
        # the operator removes the wrong record: the log's identity is restored, nothing lost
        cluster.zk.delete(cluster.paths.identity)
        healthy_at_term_above(b, 1)
        assert read_identity(cluster.zk, cluster.paths).id == identity.id
        assert db.read(ops.count("ev"), min_lsn=lsn, timeout=15).result == 20
    finally:
        cleanup(cluster, *(o for o in (a, b) if o is not None))


def test_a_replica_that_stops_applying_while_the_master_advances_serves_no_reads(cluster):
    """The other half of the fork: a replica that ignores the master's entries
    (here a forged barrier of a higher term, as a log with a newer history
    would hold, makes the slave take the master's term-1 entries as stale)
    must not stay `ready` and answer reads from an old state. It stops
    serving within STALL_BOUND (2 s), and the reads go to the master."""
    import pika

    from bus.broker_accounts import url_file
    from bus.client import connection_params
    from bus.settings import secrets_dir

    cluster.bootstrap(slaves=1)
    db = cluster.client()
    db.write([EV_TABLE])
    for i in range(5):
        db.write([ops.insert("ev", {"id": ops.seq("ev"), "k": f"a{i}"})])
    cluster.wait_ready(["s1"])
    conn = pika.BlockingConnection(connection_params(url_file(secrets_dir(), "worker").read_text().strip()))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish(cluster.names.sync_exchange, "", json.dumps(
            {"v": 1, "type": "barrier", "term": 9, "master": "ghost", "nonce": "n"}).encode(),
            pika.BasicProperties(delivery_mode=2, content_type="application/json"), mandatory=True)
    finally:
        conn.close()
    wait_for(lambda: cluster.workers()["s1"]["term"] == 9, 10, 0.1, what="the slave to read the forged barrier")
    t = time.monotonic()
    n = 5
    while time.monotonic() - t < 4.0:   # the master advances; the slave ignores its entries
        db.write([ops.insert("ev", {"id": ops.seq("ev"), "k": f"b{n}"})])
        n += 1
    s1 = wait_for(lambda: (w := cluster.workers()["s1"]) and not w["ready"] and w, 5, 0.1,
                  what="the stalled slave to stop serving reads")
    assert s1["state"] == "catching_up" and "this replica stalls at" in s1["reason"], s1
    assert "the master's term 1 is below the log's 9" in s1["reason"]
    assert not s1["serves_reads"]
    wait_for(lambda: cluster.workers()["w1"]["serves_reads"], 10, 0.1, what="the master to take the reads")
    for _ in range(10):   # no read is answered from the stalled replica's old state
        r = db.read(ops.count("ev"), timeout=10)
        assert r.result == n, (r.result, n)
