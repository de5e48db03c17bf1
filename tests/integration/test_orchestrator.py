"""The orchestrator against the real RabbitMQ and ZooKeeper, process runtime:
`python -m orchestrator` is started as a subprocess of a LocalCluster and
driven over HTTP on loopback, exactly as a user would."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from bus import metrics as bmetrics
from bus import ops
from bus import zk as bzk
from harness import EV_TABLE, Writers, check_no_loss, free_port, restart_rabbitmq, wait_for


# --- helpers (also used by test_orchestrator_ha.py) ------------------------------------
def http(port: int, method: str, path: str, body=None, *, raw: bytes | None = None, timeout: float = 30.0):
    """(status, parsed JSON body or text, headers)"""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, text, headers = r.status, r.read().decode(), r.headers
    except urllib.error.HTTPError as e:
        status, text, headers = e.code, e.read().decode(), e.headers
    try:
        return status, json.loads(text), headers
    except ValueError:
        return status, text, headers


class Orch:
    """One orchestrator process of a LocalCluster."""

    def __init__(self, cluster, key: str = "orch", **env):
        self.cluster = cluster
        self.key = key
        self.port = free_port()
        self.proc = cluster.spawn(key, ["-m", "orchestrator"], STRATUS_ORCHESTRATOR_PORT=self.port, **env)
        wait_for(lambda: self._healthy(), 30, what=f"orchestrator {key} to answer /health")

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"orchestrator exited:\n{self.cluster.log(self.key)[-3000:]}")
        try:
            return http(self.port, "GET", "/health", timeout=2)[0] == 200
        except OSError:
            return False

    def get(self, path: str):
        return http(self.port, "GET", path)

    def post(self, path: str, body=None, **kw):
        return http(self.port, "POST", path, body, **kw)

    def view(self) -> dict:
        status, body, _ = self.get("/api/v1/cluster")
        assert status == 200, body
        return body

    def pids(self) -> list[int]:
        status, body, _ = self.get("/api/v1/worker/list")
        assert status == 200, body
        return body

    def wait_healthy_cluster(self, slaves: int = 1, timeout: float = 45.0) -> dict:
        """A master with role=master and `slaves` ready slaves, all registered."""
        def ok():
            v = self.view()
            ws = v["workers"]
            masters = [w for w in ws if w["role"] == "master" and w["state"] == "master" and w["id"] == v["leader"]]
            ready = [w for w in ws if w["role"] == "slave" and w["ready"]]
            return len(masters) == 1 and len(ready) == slaves and len(ws) == slaves + 1 and v
        return wait_for(ok, timeout, 0.2, what=f"a master and {slaves} ready slave(s)")

    def stop(self) -> None:
        """SIGTERM: a clean shutdown that stops the workers it runs."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)


def worker_pids_of(cluster) -> set[int]:
    """Pids of live worker processes of this cluster (matched by their environment)."""
    found = set()
    marker = f"STRATUS_CLUSTER={cluster.name}".encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
            if b"worker" not in argv or b"--id" not in argv:
                continue
            if marker in (d / "environ").read_bytes().split(b"\0"):
                stat = (d / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    found.add(int(d.name))
        except OSError:
            continue
    return found


def cleanup(cluster, *orchs: Orch) -> set[int]:
    """Stop the orchestrators cleanly, then kill any worker of this cluster
    still running; returns the pids it had to kill (none after a clean stop)."""
    for o in orchs:
        try:
            o.stop()
        except Exception:
            pass
    left = worker_pids_of(cluster)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


# --- tests ------------------------------------------------------------------------------
def test_bootstrap_api_and_bad_inputs(cluster):
    orch = Orch(cluster)
    try:
        v = orch.wait_healthy_cluster(1)
        assert v["term"] == 1 and v["elections"][0]["old"] is None
        pids = orch.pids()
        assert pids == sorted(pids) and len(pids) == 2 and all(isinstance(p, int) for p in pids)

        # the database through the API
        status, body, _ = orch.post("/api/v1/db/write", {"ops": [ops.create_table(
            "kv", [ops.column("k", "text", nullable=False), ops.column("v", "integer")], ["k"])]})
        assert status == 200, body
        status, body, headers = orch.post("/api/v1/db/write", {"ops": [ops.insert("kv", {"k": "a", "v": 1})]})
        assert status == 200 and body["lsn"] == 2 and headers["X-Stratus-LSN"] == "2"
        assert body["results"][0]["rowcount"] == 1
        status, body, headers = orch.post("/api/v1/db/read", {**ops.select("kv", [ops.eq("k", "a")]), "min_lsn": 2})
        assert status == 200 and body == [{"k": "a", "v": 1}] and int(headers["X-Stratus-LSN"]) >= 2
        # a read without min_lsn may reach a slave that has not applied LSN 2 yet
        # (the read above may have been answered by the master): ask for it
        status, body, _ = orch.post("/api/v1/db/read", {**ops.count("kv"), "min_lsn": 2})
        assert status == 200 and body == 1

        # every bad input gets its status code and a JSON error body
        cases = [
            ("GET", "/api/v1/nothing", None, None, 404),
            ("GET", "/api/v1/crash/master", None, None, 405),
            ("GET", "/api/v1/db/read", None, None, 405),
            ("POST", "/api/v1/worker/list", None, None, 405),
            ("POST", "/api/v1/db/read", None, b"{not json", 400),
            ("POST", "/api/v1/db/write", None, b"[1, 2", 400),
            ("POST", "/api/v1/db/read", None, b"", 400),
            ("POST", "/api/v1/db/read", ["select"], None, 400),
            ("POST", "/api/v1/db/read", ops.select("nope"), None, 400),
            ("POST", "/api/v1/db/read", ops.select("kv", [ops.eq("nope", 1)]), None, 400),
            ("POST", "/api/v1/db/read", {"table": "kv"}, None, 400),
            ("POST", "/api/v1/db/read", {**ops.select("kv"), "min_lsn": "x"}, None, 400),
            ("POST", "/api/v1/db/write", {"ops": []}, None, 400),
            ("POST", "/api/v1/db/write", {"ops": [ops.insert("nope", {"k": "b"})]}, None, 400),
            ("POST", "/api/v1/db/write", {"ops": [ops.insert("kv", {"k": "a", "v": 2})]}, None, 400),  # duplicate key
            ("POST", "/api/v1/switchover", {"candidate": "no-such-worker"}, None, 409),
        ]
        for method, path, body, raw, expected in cases:
            status, resp, _ = http(orch.port, method, path, body, raw=raw)
            assert status == expected, (method, path, body, raw, status, resp)
            assert isinstance(resp, dict) and isinstance(resp.get("error"), str) and resp["error"], resp
        # the failed write changed nothing
        assert orch.post("/api/v1/db/read", {**ops.select("kv"), "min_lsn": 2})[1] == [{"k": "a", "v": 1}]

        status, body, _ = orch.post("/api/v1/db/clear")
        assert status == 200 and body == {}
        lsn = orch.post("/api/v1/db/write", {"ops": [ops.insert("kv", {"k": "z", "v": 0})]})[1]["lsn"]
        assert orch.post("/api/v1/db/read", {**ops.select("kv"), "min_lsn": lsn})[1] == [{"k": "z", "v": 0}]

        status, text, headers = orch.get("/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        got = bmetrics.parse(text)
        assert bmetrics.value(got, "stratus_workers", role="master") == 1 and bmetrics.value(got, "stratus_term") == 1
        assert bmetrics.value(got, "stratus_slave_target") == 1 and bmetrics.value(got, "stratus_elections_total") == 1

        # the leading orchestrator is in the service registry, for the gateway
        regs = bzk.children_json(cluster.zk, cluster.paths.service("orchestrator"))
        assert [r["port"] for r in regs.values()] == [orch.port]
    finally:
        left = cleanup(cluster, orch)
    # a clean shutdown (SIGTERM) stopped every worker it started
    assert left == set()


def test_crash_with_nothing_to_crash_is_409(make_cluster):
    cluster = make_cluster(max_slaves=0)   # a master alone: there is never a slave
    orch = Orch(cluster)
    try:
        orch.wait_healthy_cluster(0)
        status, body, _ = orch.post("/api/v1/crash/slave")
        assert status == 409 and "slave" in body["error"]
        status, body, _ = orch.post("/api/v1/switchover")
        assert status == 409 and body["error"]
        assert len(orch.pids()) == 1   # nothing was killed
        # the master alone: crash it, a new worker replays the log and takes over
        db = cluster.client()
        db.write([EV_TABLE])
        lsn = db.write([ops.insert("ev", {"id": 1, "k": "before"})]).lsn
        old = orch.pids()
        status, body, _ = orch.post("/api/v1/crash/master")
        assert status == 200 and body == [str(old[0])]
        v = orch.wait_healthy_cluster(0, timeout=45)
        assert v["workers"][0]["pid"] != old[0] and v["term"] == 2
        r = db.write([ops.insert("ev", {"id": 2, "k": "after"})], timeout=20)
        assert r.lsn == lsn + 1
        rows = db.read(ops.select("ev", order_by=["id"]), min_lsn=r.lsn).result
        assert [x["k"] for x in rows] == ["before", "after"]
    finally:
        cleanup(cluster, orch)


def test_crash_master_under_write_load_loses_nothing(cluster):
    orch = Orch(cluster)
    try:
        v = orch.wait_healthy_cluster(1)
        old_master = next(w for w in v["workers"] if w["role"] == "master")
        db = cluster.client(name="writers")
        db.write([EV_TABLE])
        with Writers(db, 4) as writers:
            wait_for(lambda: len(writers.acked) >= 100, 30, what="100 acknowledged writes before the crash")
            status, body, _ = orch.post("/api/v1/crash/master")
            t_crash = time.monotonic()
            assert status == 200 and body == [str(old_master["pid"])]
            first = wait_for(lambda: writers.acked_after(t_crash), 30, 0.01, what="a write acknowledged after the crash")
            recovery = min(a[0] for a in first) - t_crash
            print(f"\ncrash/master -> first acknowledged write: {recovery * 1000:.0f} ms")
            wait_for(lambda: len(writers.acked_after(t_crash)) >= 100, 30, what="writes flowing again")
        acked, stored = check_no_loss(db, writers)
        print(f"{acked} acknowledged writes, {stored} rows, {len(writers.failed)} unacknowledged attempts")
        v = orch.wait_healthy_cluster(1)
        new_master = next(w for w in v["workers"] if w["role"] == "master")
        assert new_master["id"] != old_master["id"] and v["term"] == 2
        assert old_master["pid"] not in orch.pids() and len(orch.pids()) == 2
        last = v["elections"][-1]
        assert last["old"] == old_master["id"] and last["new"] == new_master["id"] and last["term"] == 2
        assert recovery < 10
    finally:
        cleanup(cluster, orch)



@pytest.mark.slow
def test_broker_restart_under_write_load_loses_nothing(cluster):
    """RabbitMQ restarts (stop_app, start_app) while clients write. Workers,
    client and orchestrator reconnect on their own; the durable log and
    queues survive. A master whose batch was cut mid-publish cannot know if it
    reached the log, so it exits rather than risk reusing an LSN, and the
    orchestrator fails over as for any crash. Either way: every acknowledged
    write is there once, and every worker ends with the same content."""
    orch = Orch(cluster)
    try:
        orch.wait_healthy_cluster(1)
        db = cluster.client(name="writers")
        db.write([EV_TABLE])
        with Writers(db, 4) as writers:
            wait_for(lambda: len(writers.acked) >= 100, 30, what="100 acknowledged writes before the restart")
            down_at = restart_rabbitmq()
            first = wait_for(lambda: writers.acked_after(down_at), 120, 0.05, what="a write acknowledged after the restart")
            print(f"\nbroker stopped -> first acknowledged write: {first[0][0] - down_at:.1f} s")
            wait_for(lambda: len(writers.acked_after(down_at)) >= 100, 60, what="writes flowing again")
        acked, stored = check_no_loss(db, writers)
        v = orch.wait_healthy_cluster(1, timeout=90)
        print(f"{acked} acknowledged writes, {stored} rows; term {v['term']} after the restart")
        ids = [w["id"] for w in v["workers"]]
        wait_for(lambda: len({json.dumps(cluster.checksum(i), sort_keys=True) for i in ids}) == 1, 60, 0.5,
                 what="every worker to hold the same content")
    finally:
        cleanup(cluster, orch)

def test_two_crash_slave_calls_replace_the_highest_pid(cluster):
    # A saved scaling state of two slaves (as a previous orchestrator would leave it).
    bzk.put_json(cluster.zk, cluster.paths.orchestrator_state, {"target": 2})
    orch = Orch(cluster)
    try:
        orch.wait_healthy_cluster(2)
        db = cluster.client()
        db.write([EV_TABLE])
        lsn = 0
        for i in range(30):
            lsn = db.write([ops.insert("ev", {"id": i, "k": f"k{i}"})]).lsn
        expected = [{"id": i, "k": f"k{i}"} for i in range(30)]
        for round_ in range(2):
            v = orch.view()
            before = orch.pids()
            slaves = [w for w in v["workers"] if w["role"] == "slave"]
            highest = max(w["pid"] for w in slaves)
            status, body, _ = orch.post("/api/v1/crash/slave")
            assert status == 200 and body == [str(highest)], (round_, body, slaves)
            v = orch.wait_healthy_cluster(2)
            after = orch.pids()
            assert len(after) == len(before) and highest not in after
            new_ids = {w["id"] for w in v["workers"] if w["role"] == "slave"} - {w["id"] for w in slaves}
            assert len(new_ids) == 1
            # the new slave holds all the data: it answers a read at the last LSN
            seen = {}
            def served_by_new():
                r = db.read(ops.select("ev", order_by=["id"]), min_lsn=lsn)
                seen[r.worker] = r.result
                return new_ids <= set(seen)
            wait_for(served_by_new, 20, 0.01, what="a read served by the new slave")
            for wid in new_ids:
                assert seen[wid] == expected
            lsn = db.write([ops.insert("ev", {"id": 100 + round_, "k": f"r{round_}"})]).lsn
            expected.append({"id": 100 + round_, "k": f"r{round_}"})
    finally:
        cleanup(cluster, orch)


def test_autoscaling_follows_the_reads(make_cluster):
    # A ceiling of 4 slaves lets the test hold the target at 4 with a loose read
    # rate while the new slaves start (70 reads alone ask for exactly 4).
    cluster = make_cluster(scale_window=5, max_slaves=4)
    orch = Orch(cluster)
    try:
        orch.wait_healthy_cluster(1)
        status, body, _ = orch.post("/api/v1/db/write", {"ops": [EV_TABLE]})
        assert status == 200, body
        lsn = body["lsn"]
        for i in range(70):   # min_lsn: a slave that has not applied the table yet would answer 400
            status, _, _ = orch.post("/api/v1/db/read", {**ops.count("ev"), "min_lsn": lsn})
            assert status == 200
        up = wait_for(lambda: (d := orch.view()["last_decision"]) and d, 20, 0.2, what="the first scaling decision")
        assert up["target"] == 4 and up["action"] == "up" and 68 <= up["reads"] <= 72, up

        # Keep the load above 60 reads per window (the target stays 4) until the
        # four slaves are up and ready, whatever the machine's speed; then go idle.
        stop = threading.Event()

        def reader():
            t0, n = time.monotonic(), 0
            while not stop.is_set():
                n += 1
                stop.wait(max(0.0, t0 + n / 20.0 - time.monotonic()))
                if not stop.is_set():
                    orch.post("/api/v1/db/read", ops.count("ev"))
        t = threading.Thread(target=reader, daemon=True)
        t.start()
        try:
            wait_for(lambda: sum(1 for w in cluster.workers().values() if w["role"] == "slave" and w["ready"]) == 4,
                     30, 0.1, what="4 ready slaves")
            assert len(orch.pids()) == 5
        finally:
            stop.set()
            t.join(10)
        decisions = orch.view()["decisions"]
        assert all(d["target"] == 4 for d in decisions), decisions   # the load held the target
        # an idle window brings the count back to 1
        down = wait_for(lambda: (d := orch.view()["last_decision"]) and d["reads"] == 0 and d, 20, 0.2,
                        what="an idle window's scaling decision")
        assert down["target"] == 1, down
        # (the window the load stopped in may already have asked for fewer slaves)
        assert any(d["action"] == "down" for d in orch.view()["decisions"])
        v = orch.wait_healthy_cluster(1, timeout=30)
        assert v["slave_target"] == 1 and v["decisions_total"] >= 2
        # scaling down drained slaves (exit 0), never the master
        assert v["workers"][0]["role"] == "master"
        assert "draining slave" in cluster.log("orch")
    finally:
        cleanup(cluster, orch)


def test_switchover_under_write_load_loses_nothing(cluster):
    orch = Orch(cluster)
    try:
        v = orch.wait_healthy_cluster(1)
        old = next(w for w in v["workers"] if w["role"] == "master")
        slave = next(w for w in v["workers"] if w["role"] == "slave")
        db = cluster.client(name="writers")
        db.write([EV_TABLE])
        with Writers(db, 4) as writers:
            wait_for(lambda: len(writers.acked) >= 100, 30, what="writes before the switchover")
            t0 = time.monotonic()
            status, body, _ = orch.post("/api/v1/switchover", timeout=60)
            t = time.monotonic()
            print(f"\nswitchover answered in {t - t0:.2f}s: {body}")
            assert status == 200, (body, cluster.log("orch")[-3000:])
            assert body["old"] == old["id"] and body["new"] == slave["id"] and body["term"] == 2
            wait_for(lambda: len(writers.acked_after(t)) >= 100, 30, what="writes after the switchover")
        check_no_loss(db, writers)
        v = orch.wait_healthy_cluster(1)
        assert v["leader"] == slave["id"] and old["pid"] not in orch.pids()
        assert v["elections"][-1]["reason"].startswith("switchover")
    finally:
        cleanup(cluster, orch)


def test_cli_status_crash_and_switchover(cluster):
    import subprocess
    import sys
    orch = Orch(cluster)

    def stratus(*args):
        env = {**cluster.env, "STRATUS_ORCHESTRATOR_PORT": str(orch.port)}
        p = subprocess.run([sys.executable, "-m", "stratus.cli", *args], env=env, capture_output=True,
                           text=True, timeout=60)
        return p.returncode, p.stdout + p.stderr
    try:
        v = orch.wait_healthy_cluster(1)
        master = next(w for w in v["workers"] if w["role"] == "master")
        slave = next(w for w in v["workers"] if w["role"] == "slave")
        rc, out = stratus("status")
        assert rc == 0, out
        assert f"Cluster: {cluster.name} (term 1)" in out and "Leader" in out and "Replica" in out
        assert master["id"] in out and str(slave["pid"]) in out and "slave target 1" in out
        rc, out = stratus("crash", "slave")
        assert rc == 0 and f"pid {slave['pid']}" in out, out
        v = orch.wait_healthy_cluster(1)
        new_slave = next(w for w in v["workers"] if w["role"] == "slave")
        rc, out = stratus("switchover", "--candidate", new_slave["id"])
        assert rc == 0 and f"{master['id']} -> {new_slave['id']} (term 2)" in out, out
        rc, out = stratus("status", "--url", f"http://127.0.0.1:{free_port()}")
        assert rc == 1 and "cannot reach the orchestrator" in out
        rc, out = stratus("switchover", "--candidate", "w-nobody")
        assert rc == 1 and "409" in out
    finally:
        cleanup(cluster, orch)


def test_hung_workers_are_replaced_once_their_session_expires(cluster):
    """SIGSTOP: the process lives on but stops answering; ZooKeeper drops its
    znode when its session expires and the orchestrator replaces it."""
    orch = Orch(cluster)
    try:
        v = orch.wait_healthy_cluster(1)
        master = next(w for w in v["workers"] if w["role"] == "master")
        db = cluster.client()
        db.write([EV_TABLE])
        lsn = db.write([ops.insert("ev", {"id": 1, "k": "before"})]).lsn
        os.kill(master["pid"], signal.SIGSTOP)
        t0 = time.monotonic()
        r = db.write([ops.insert("ev", {"id": 2, "k": "after"})], timeout=30)
        print(f"\nhung master: first acknowledged write after {time.monotonic() - t0:.2f}s")
        assert r.lsn == lsn + 1 and r.worker != master["id"]
        v = orch.wait_healthy_cluster(1)
        assert master["pid"] not in orch.pids() and v["term"] == 2
        assert "lost its ZooKeeper session: killing it" in cluster.log("orch")
        assert master["pid"] not in worker_pids_of(cluster)   # killed, not left stopped

        slave = next(w for w in v["workers"] if w["role"] == "slave")
        os.kill(slave["pid"], signal.SIGSTOP)
        # a slave gets REREGISTER_GRACE (10 s) to come back with a new session, then is replaced
        wait_for(lambda: slave["pid"] not in orch.pids(), 30, 0.2, what="the hung slave to be replaced")
        v = orch.wait_healthy_cluster(1, timeout=30)
        assert slave["pid"] not in worker_pids_of(cluster)
        rows = db.read(ops.select("ev", order_by=["id"]), min_lsn=r.lsn).result
        assert [x["k"] for x in rows] == ["before", "after"]
    finally:
        cleanup(cluster, orch)


if __name__ == "__main__":
    pytest.main([__file__, "-v", "-s"])
