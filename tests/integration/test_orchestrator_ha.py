"""Orchestrator high availability: two orchestrators under a ZooKeeper
election; kill -9 the leader and the standby takes over the running workers."""
from __future__ import annotations

import os
import signal
import time

from bus import ops
from bus import zk as bzk
from harness import wait_for
from harness import EV_TABLE
from test_orchestrator import Orch, cleanup, worker_pids_of


def test_standby_adopts_the_workers_when_the_leader_is_killed(cluster):
    a = Orch(cluster, "orch-a")
    b = None
    try:
        v = a.wait_healthy_cluster(1)
        assert v["orchestrator"]["leading"]
        b = Orch(cluster, "orch-b")
        wait_for(lambda: b.view()["orchestrator"]["candidates"] == 2, 10, 0.1, what="two orchestrator candidates")
        vb = b.view()
        assert not vb["orchestrator"]["leading"]
        # the standby shows the cluster but does not act
        assert sorted(b.pids()) == sorted(a.pids())
        status, body, _ = b.post("/api/v1/crash/slave")
        assert status == 503 and "standby" in body["error"]
        regs = bzk.children_json(cluster.zk, cluster.paths.service("orchestrator"))
        assert [r["port"] for r in regs.values()] == [a.port]

        db = cluster.client(tenant="rideshare")
        db.write([EV_TABLE])
        lsn = db.write([ops.insert("ev", {"id": 1, "k": "before"})]).lsn
        pids = a.pids()
        assert set(pids) == worker_pids_of(cluster)
        # reads counted in the current scaling window (kept in ZooKeeper for the standby)
        for _ in range(30):   # min_lsn: a slave that has not applied the table yet would answer 400
            assert a.post("/api/v1/db/read", {**ops.count("ev"), "min_lsn": lsn})[0] == 200
        window = wait_for(lambda: (v := a.view())["reads_in_window"] >= 30 and v, 10, 0.1,
                          what="the leader to count the reads")
        time.sleep(1.0)   # the state is saved on every change; let the last save land

        # kill -9 the leading orchestrator (its gunicorn arbiter and worker)
        os.killpg(a.proc.pid, signal.SIGKILL)
        a.proc.wait(10)
        t0 = time.monotonic()
        wait_for(lambda: b.view()["orchestrator"]["leading"], 20, 0.05, what="the standby to lead")
        took = time.monotonic() - t0
        print(f"\nstandby took over {took:.2f}s after kill -9 of the leader")
        assert took < 10
        # it adopted the workers it found: same pids, no new cluster
        assert b.pids() == pids
        # it continues the same scaling window with the reads counted so far
        vb = b.view()
        assert vb["window_start"] == window["window_start"] and vb["reads_in_window"] == window["reads_in_window"]
        time.sleep(3)   # a few reconcile rounds later, still the same workers
        v = b.view()
        assert b.pids() == pids and v["term"] == 1 and len(v["elections"]) == 1
        assert worker_pids_of(cluster) == set(pids)
        assert "adopted 2 running workers" in cluster.log("orch-b")
        regs = bzk.children_json(cluster.zk, cluster.paths.service("orchestrator"))
        assert [r["port"] for r in regs.values()] == [b.port]

        # a later crash/master still recovers, driven by the new leader
        master = next(w for w in v["workers"] if w["role"] == "master")
        status, body, _ = b.post("/api/v1/crash/master")
        assert status == 200 and body == [str(master["pid"])]
        r = db.write([ops.insert("ev", {"id": 2, "k": "after"})], timeout=20)
        assert r.lsn == lsn + 1
        v = b.wait_healthy_cluster(1)
        assert v["term"] == 2 and master["pid"] not in b.pids()
        rows = db.read(ops.select("ev", order_by=["id"]), min_lsn=r.lsn).result
        assert [x["k"] for x in rows] == ["before", "after"]
    finally:
        left = cleanup(cluster, *[o for o in (a, b) if o is not None])
    # the successor's clean shutdown stopped the workers it adopted too
    assert left == set()


def test_master_dying_with_the_orchestrator_is_replaced_by_the_successor(cluster):
    """kill -9 the leading orchestrator and the master together: the standby
    adopts the surviving slave, finds the leader gone and elects it; an
    adopted worker killed from outside is noticed and replaced too."""
    a = Orch(cluster, "orch-a")
    b = None
    try:
        v = a.wait_healthy_cluster(1)
        b = Orch(cluster, "orch-b")
        wait_for(lambda: b.view()["orchestrator"]["candidates"] == 2, 10, 0.1, what="two orchestrator candidates")
        master = next(w for w in v["workers"] if w["role"] == "master")
        slave = next(w for w in v["workers"] if w["role"] == "slave")
        db = cluster.client(tenant="rideshare")
        db.write([EV_TABLE])
        lsn = db.write([ops.insert("ev", {"id": 1, "k": "before"})]).lsn

        os.killpg(a.proc.pid, signal.SIGKILL)
        os.kill(master["pid"], signal.SIGKILL)
        a.proc.wait(10)
        r = db.write([ops.insert("ev", {"id": 2, "k": "after"})], timeout=30)
        assert r.lsn == lsn + 1 and r.worker == slave["id"]
        v = b.wait_healthy_cluster(1)
        assert v["orchestrator"]["leading"] and v["leader"] == slave["id"] and v["term"] == 2
        assert v["elections"][-1]["old"] == master["id"]
        assert slave["pid"] in b.pids() and master["pid"] not in b.pids()

        # the promoted slave was adopted, not started by b: kill it from outside
        os.kill(slave["pid"], signal.SIGKILL)
        r = db.write([ops.insert("ev", {"id": 3, "k": "again"})], timeout=30)
        v = b.wait_healthy_cluster(1)
        assert v["term"] == 3 and slave["pid"] not in b.pids()
        rows = db.read(ops.select("ev", order_by=["id"]), min_lsn=r.lsn).result
        assert [x["k"] for x in rows] == ["before", "after", "again"]
    finally:
        left = cleanup(cluster, *[o for o in (a, b) if o is not None])
    assert left == set()


def test_a_paused_leader_comes_back_as_a_standby(cluster):
    """SIGSTOP the leading orchestrator past its ZooKeeper session (a long GC
    pause, a frozen VM): the standby takes over. When the old leader resumes
    it finds its session expired and rejoins as a standby: one leader, the
    same workers, no second election, no registry entry of its own."""
    a = Orch(cluster, "orch-a")
    b = None
    try:
        a.wait_healthy_cluster(1)
        b = Orch(cluster, "orch-b")
        wait_for(lambda: b.view()["orchestrator"]["candidates"] == 2, 10, 0.1, what="two orchestrator candidates")
        db = cluster.client(tenant="rideshare")
        db.write([EV_TABLE])
        lsn = db.write([ops.insert("ev", {"id": 1, "k": "before"})]).lsn
        pids = a.pids()

        os.killpg(a.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            wait_for(lambda: b.view()["orchestrator"]["leading"], 30, 0.05, what="the standby to lead")
            took = time.monotonic() - t0
            # while a is frozen, the cluster keeps taking writes under b
            assert db.write([ops.insert("ev", {"id": 2, "k": "paused"})], timeout=20).lsn == lsn + 1
        finally:
            os.killpg(a.proc.pid, signal.SIGCONT)
        print(f"\nstandby took over {took:.2f}s after the leader froze")

        def a_is_standby():
            status, body, _ = a.get("/api/v1/cluster")   # 503 while its new session opens
            return status == 200 and not body["orchestrator"]["leading"] and body["orchestrator"]["candidates"] == 2
        wait_for(a_is_standby, 30, 0.1, what="the resumed leader to rejoin as a standby")
        assert "stopped leading" in cluster.log("orch-a")
        time.sleep(3)   # a few control rounds: neither acts on stale state
        va, vb = a.view(), b.view()
        assert vb["orchestrator"]["leading"] and not va["orchestrator"]["leading"]
        assert b.pids() == pids and worker_pids_of(cluster) == set(pids)
        assert vb["term"] == 1 and len(vb["elections"]) == 1
        regs = bzk.children_json(cluster.zk, cluster.paths.service("orchestrator"))
        assert [r["port"] for r in regs.values()] == [b.port]
        status, body, _ = a.post("/api/v1/crash/slave")
        assert status == 503 and "standby" in body["error"]
        r = db.write([ops.insert("ev", {"id": 3, "k": "after"})], timeout=20)
        assert r.lsn == lsn + 2
        rows = db.read(ops.select("ev", order_by=["id"]), min_lsn=r.lsn).result
        assert [x["k"] for x in rows] == ["before", "paused", "after"]
    finally:
        if a.proc.poll() is None:
            try:
                os.killpg(a.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        left = cleanup(cluster, *[o for o in (a, b) if o is not None])
    assert left == set()
