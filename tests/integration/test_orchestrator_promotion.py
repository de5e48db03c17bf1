"""Every promotion finishes, the orchestrator's half: a worker named master
that does not take over within STRATUS_PROMOTION_TIMEOUT is killed and
another is elected. Real workers, the real broker and ZooKeeper.

The stuck candidate is a real worker whose STRATUS_AMQP_URL points at a
closed port: it registers in ZooKeeper (before it connects to the broker), so
it is a slave the orchestrator can elect, but it can never publish its
barrier. To make it the only candidate, and one the orchestrator runs, the
test stops the first orchestrator with kill -9, replaces the healthy slave by
the stuck worker (with a runtime pid file, as the process runtime writes one)
and starts a second orchestrator, which adopts it."""
from __future__ import annotations

import json
import os
import signal
import time
from urllib.parse import urlsplit, urlunsplit

from bus import ops
from harness import EV_TABLE, free_port, wait_for
from test_orchestrator import Orch, cleanup

PROMOTION_TIMEOUT = 3.0


def closed_port_url(url: str) -> str:
    """The same broker URL (credentials, vhost) on a port nobody listens on."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{free_port()}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


def hand_to_runtime(cluster, worker_id: str, pid: int) -> None:
    """A pid file in the process runtime's directory: the next orchestrator adopts the worker."""
    run_dir = cluster.settings.cluster_state_path() / "runtime"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"{worker_id}.json").write_text(json.dumps({"id": worker_id, "pid": pid, "started": time.time()}))


def test_a_named_master_that_cannot_take_over_is_killed_and_another_elected(cluster):
    env = {"STRATUS_PROMOTION_TIMEOUT": str(PROMOTION_TIMEOUT)}
    a = Orch(cluster, "orch-a", **env)
    b = None
    try:
        v = a.wait_healthy_cluster(1)
        master = next(w for w in v["workers"] if w["role"] == "master")
        slave = next(w for w in v["workers"] if w["role"] == "slave")
        db = cluster.client()
        db.write([EV_TABLE])
        lsn = db.write([ops.insert("ev", {"id": 1, "k": "before"})]).lsn

        # kill -9 the orchestrator (the workers run on), then swap the healthy
        # slave for one that can never reach the broker
        os.killpg(a.proc.pid, signal.SIGKILL)
        a.proc.wait(10)
        os.kill(slave["pid"], signal.SIGKILL)
        stuck = cluster.start_worker("w-stuck", STRATUS_AMQP_URL=closed_port_url(cluster.settings.amqp_url))
        hand_to_runtime(cluster, "w-stuck", stuck.pid)

        def stuck_registered():
            if stuck.poll() is not None:
                raise AssertionError(f"w-stuck exited with {stuck.returncode}:\n{cluster.log('w-stuck')[-3000:]}")
            return cluster.workers().get("w-stuck")
        w = wait_for(stuck_registered, 30, 0.1, what="the stuck worker to register")
        assert w["role"] == "slave" and not w["ready"]
        wait_for(lambda: slave["id"] not in cluster.workers(), 30, 0.1,
                 what=f"the znode of the killed slave {slave['id']} (pid {slave['pid']}) to go")
        assert stuck.poll() is None   # it keeps trying to reach the broker

        b = Orch(cluster, "orch-b", **env)
        wait_for(lambda: b.view()["orchestrator"]["leading"], 30, 0.1, what="the second orchestrator to lead")
        v = b.view()
        assert sorted(w["id"] for w in v["workers"]) == sorted([master["id"], "w-stuck"]), v["workers"]
        assert v["term"] == 1 and "adopted 2 running workers" in cluster.log("orch-b")

        # the master dies: the stuck worker is the only candidate
        status, body, _ = b.post("/api/v1/crash/master")
        assert status == 200 and body == [str(master["pid"])]
        t0 = time.monotonic()
        named = wait_for(lambda: (es := b.view()["elections"]) and len(es) >= 2 and es[1], 20, 0.05,
                         what="the stuck worker to be named")
        assert named["new"] == "w-stuck" and named["term"] == 2 and named["old"] == master["id"]

        # ... it cannot take over: after the promotion timeout it is killed
        code = stuck.wait(30)
        killed_after = time.monotonic() - t0
        print(f"\nstuck candidate killed {killed_after:.2f}s after the master's crash "
              f"(promotion timeout {PROMOTION_TIMEOUT:g}s)")
        assert code == -signal.SIGKILL
        assert PROMOTION_TIMEOUT - 1.0 <= killed_after <= PROMOTION_TIMEOUT + 15

        # ... and another is elected, with the reason on record
        again = wait_for(lambda: (es := b.view()["elections"]) and len(es) >= 3 and es[2], 20, 0.05,
                         what="a new election")
        assert again["term"] == 3 and again["old"] == "w-stuck" and again["new"] not in ("w-stuck", master["id"])
        assert again["reason"].startswith(
            f"w-stuck was named master for term 2 but did not take over in {PROMOTION_TIMEOUT:g}s"), again
        assert "did not take over" in cluster.log("orch-b")

        # writes are acknowledged again, with nothing lost
        r = db.write([ops.insert("ev", {"id": 2, "k": "after"})], timeout=45)
        print(f"first write acknowledged {time.monotonic() - t0:.2f}s after the master's crash")
        assert r.lsn == lsn + 1 and r.worker == again["new"]
        v = b.wait_healthy_cluster(1, timeout=60)
        assert v["leader"] == again["new"] and v["term"] == 3 and len(v["elections"]) == 3
        assert stuck.pid not in b.pids() and master["pid"] not in b.pids()
        rows = db.read(ops.select("ev", order_by=["id"]), min_lsn=r.lsn).result
        assert [x["k"] for x in rows] == ["before", "after"]
    finally:
        left = cleanup(cluster, *[o for o in (a, b) if o is not None])
    assert left == set()
