"""Failover benchmark: kill -9 the master (POST /api/v1/crash/master) while
writers keep writing, and measure the time from the crash call to the first
write acknowledged by the new master. Ten trials; prints the median and the
maximum (targets: median <= 2 s, max <= 5 s).

    .venv/bin/python benchmarks/failover.py [--trials 10] [--writers 4]

It runs its own orchestrator (process runtime) in a fresh cluster namespace
on the local RabbitMQ and ZooKeeper, and removes everything it made."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pika  # noqa: E402

from bus import ops  # noqa: E402
from bus import zk as bzk  # noqa: E402
from bus.client import DBClient, connection_params  # noqa: E402
from bus.errors import DBError  # noqa: E402
from bus.names import Names, Paths  # noqa: E402
from bus.ports import free_port  # noqa: E402
from bus.settings import load, secrets_dir  # noqa: E402
from bus.topology import delete_cluster  # noqa: E402
from stratus.measure import wait_for as _wait_for  # noqa: E402

from _common import pct, record  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def http(port: int, method: str, path: str):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def wait_for(pred, timeout: float, what: str):
    return _wait_for(pred, timeout, 0.05, what, errors=(OSError,))


def healthy(port: int, max_lag: int | None = None):
    """The cluster view when it has a master and one ready slave (with at
    most `max_lag` entries of lag, when given)."""
    v = http(port, "GET", "/api/v1/cluster")
    ws = v["workers"]
    m = [w for w in ws if w["role"] == "master" and w["state"] == "master" and w["id"] == v["leader"]]
    s = [w for w in ws if w["role"] == "slave" and w["ready"]]
    if max_lag is not None and s and (s[0]["lag"] is None or s[0]["lag"] > max_lag):
        return None
    return len(m) == 1 and len(s) == 1 and len(ws) == 2 and v


class Writers:
    def __init__(self, db: DBClient, n: int, rate: float):
        self.db, self.stop = db, threading.Event()
        self.pause = 1.0 / rate if rate > 0 else 0.0
        self.acks: list[tuple[float, str]] = []   # (time of the reply, worker that answered)
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(n)]

    def run(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            if self.pause:
                self.stop.wait(self.pause)
            try:
                r = self.db.write([ops.insert("ev", {"id": ops.seq("ev"), "k": f"{i}-{n}"})], timeout=15)
            except DBError:
                time.sleep(0.01)
                continue
            with self.lock:
                self.acks.append((time.monotonic(), r.worker))

    def first_ack_after(self, t0: float, not_from: str):
        with self.lock:
            later = [t for t, w in self.acks if t >= t0 and w != not_from]
        return min(later) if later else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--rate", type=float, default=25.0,
                    help="writes per second per writer (0: as fast as possible; the log then grows so fast "
                         "that each replacement slave, which replays it from the start, takes ever longer)")
    ap.add_argument("--max-lag", type=int, default=50,
                    help="before each crash, wait until the slave is at most this many entries behind "
                         "(a new slave is 'ready' once it has replayed up to the probe it published at "
                         "start, which under write load can still be far behind the master)")
    ap.add_argument("--record", action="store_true", help="append the figures to docs/benchmarks.md")
    a = ap.parse_args()

    cluster = f"bench{uuid.uuid4().hex[:8]}"
    state = tempfile.mkdtemp(prefix="stratus-bench-")
    settings = dataclasses.replace(load(), cluster=cluster, state_dir=state)
    port = free_port()
    env = {**os.environ, "STRATUS_CLUSTER": cluster, "STRATUS_STATE_DIR": state,
           "STRATUS_SECRETS_DIR": str(secrets_dir().resolve()),   # the machine's broker accounts
           "STRATUS_ORCHESTRATOR_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    log = open(Path(state) / "orchestrator.log", "ab")
    orch = subprocess.Popen([sys.executable, "-m", "orchestrator"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    db = None
    times: list[float] = []
    try:
        wait_for(lambda: healthy(port), 60, "a master and a ready slave")
        db = DBClient(settings, name="bench")
        db.write([ops.create_table("ev", [ops.column("id", "integer", nullable=False),
                                          ops.column("k", "text", nullable=False)], ["id"])])
        w = Writers(db, a.writers, a.rate)
        for t in w.threads:
            t.start()
        for trial in range(1, a.trials + 1):
            wait_for(lambda: healthy(port), 180, "a master and a ready slave")
            time.sleep(0.5)   # writes flowing on this master
            v = wait_for(lambda: healthy(port, a.max_lag), 180, f"the slave within {a.max_lag} entries of the master")
            master = next(x for x in v["workers"] if x["role"] == "master")
            lag = next(x for x in v["workers"] if x["role"] == "slave")["lag"]
            t0 = time.monotonic()
            pid = http(port, "POST", "/api/v1/crash/master")
            assert pid == [str(master["pid"])], pid
            first = wait_for(lambda: w.first_ack_after(t0, master["id"]), 30, "a write acknowledged after the crash")
            times.append(first - t0)
            print(f"trial {trial:2d}: killed {master['id']} (pid {master['pid']}, slave lag {lag} entries); "
                  f"first acknowledged write after {times[-1] * 1000:.0f} ms", flush=True)
        w.stop.set()
        for t in w.threads:
            t.join(20)
        print(f"failover over {len(times)} trials: median {statistics.median(times):.3f} s, "
              f"max {max(times):.3f} s ({len(w.acks)} writes acknowledged, {a.writers} writers at "
              f"{f'{a.rate:g}/s each' if a.rate > 0 else 'full speed'})")
        ok = statistics.median(times) <= 2.0 and max(times) <= 5.0
        print("targets (median <= 2 s, max <= 5 s):", "met" if ok else "NOT met")
        if a.record:
            record("Failover (kill -9 the master to the first acknowledged write)",
                   f"`python benchmarks/failover.py --trials {a.trials} --writers {a.writers} --rate {a.rate:g}`\n\n"
                   f"| trials | median | p90 | max | writes acknowledged | target (median <= 2 s, max <= 5 s) |\n"
                   f"|---|---|---|---|---|---|\n"
                   f"| {len(times)} | {statistics.median(times) * 1000:.0f} ms | "
                   f"{pct(sorted(times), 90) * 1000:.0f} ms | {max(times) * 1000:.0f} ms | {len(w.acks)} | "
                   f"{'met' if ok else 'NOT met'} |\n")
        return 0 if ok else 1
    finally:
        if db is not None:
            db.close()
        if orch.poll() is None:
            os.killpg(orch.pid, signal.SIGTERM)   # a clean stop: it stops its workers
            try:
                orch.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(orch.pid, signal.SIGKILL)
        try:
            zk = bzk.connect(settings)
            zk.delete(Paths(cluster).root, recursive=True)
            zk.stop()
            conn = pika.BlockingConnection(connection_params(settings.amqp_url))
            delete_cluster(conn.channel(), Names(cluster))
            conn.close()
        except Exception as exc:
            print(f"cleanup: {exc!r}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
