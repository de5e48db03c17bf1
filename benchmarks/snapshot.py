"""Time until a new slave is ready: from a snapshot plus the log's tail, and
from replaying the log alone, at 100,000 and 1,000,000 rows.

    .venv/bin/python benchmarks/snapshot.py [--rows 100000 1000000] [--record]

For each size: a master and one slave (local processes, RabbitMQ and ZooKeeper
on loopback) are filled with bulk inserts (1,000 rows per op, several ops per
write, a few writers). Then three new slaves are started one after another,
each timed from its start to `ready` in its membership (it has applied the log
and its probe came back fast), and stopped again:

  snapshot (made on demand)  the ready slave makes a snapshot for the request;
  snapshot + tail            a further 1% of rows is written first; the slave
                             serves the snapshot it just made, and the new one
                             replays the tail from the log;
  log replay alone           STRATUS_SNAPSHOT_FETCH=0: the whole log.

Target: 1,000,000 rows ready in under 30 s on this machine."""
from __future__ import annotations

import argparse
import json
import signal
import tempfile
import threading
import time
from pathlib import Path

from _common import record

from bus import ops
from harness import LocalCluster, wait_for

ROWS_PER_OP = 1000
OPS_PER_WRITE = 5
WRITERS = 3
PAD = "stratus-benchmark-row-" * 3


def fill(db, start: int, rows: int) -> int:
    """Insert rows [start, start+rows) in bulk writes from a few threads; the last LSN."""
    per_write = ROWS_PER_OP * OPS_PER_WRITE
    starts = list(range(start, start + rows, per_write))
    lock = threading.Lock()
    top = [0]
    errors: list[Exception] = []

    def work():
        while True:
            with lock:
                if not starts or errors:
                    return
                s = starts.pop(0)
            end = min(s + per_write, start + rows)
            ops_ = [ops.insert_many("kv", [{"k": k, "v": k * 7, "pad": PAD} for k in range(a, min(a + ROWS_PER_OP, end))])
                    for a in range(s, end, ROWS_PER_OP)]
            try:
                lsn = db.write(ops_, timeout=120).lsn
            except Exception as exc:
                with lock:
                    errors.append(exc)
                return
            with lock:
                top[0] = max(top[0], lsn)

    ts = [threading.Thread(target=work) for _ in range(WRITERS)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise SystemExit(f"filling failed: {errors[0]!r}")
    return top[0]


def time_to_ready(cluster: LocalCluster, worker_id: str, lsn: int, timeout: float, **env) -> float:
    """Seconds from starting a new worker to its membership saying ready (at `lsn` or later)."""
    t0 = time.monotonic()
    cluster.start_worker(worker_id, **env)
    wait_for(lambda: (w := cluster.workers().get(worker_id)) and w.get("ready") and w.get("applied_lsn", 0) >= lsn,
             timeout, interval=0.02, what=f"{worker_id} ready")
    took = time.monotonic() - t0
    cluster.signal(worker_id, signal.SIGTERM)
    cluster.procs[worker_id].wait(30)
    return took


def fetched_line(cluster: LocalCluster, worker_id: str) -> str:
    for line in cluster.log(worker_id).splitlines():
        if "fetched the snapshot" in line:
            return line.split("stratus.snapshot: ", 1)[-1]
    return "(no snapshot fetched)"


def measure(rows: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cluster = LocalCluster(Path(tmp), name=f"benchsnap{int(time.time())}")
        try:
            cluster.bootstrap(slaves=1)
            db = cluster.client(name="bench")
            db.create_table("kv", [ops.column("k", "integer", nullable=False), ops.column("v", "integer"),
                                   ops.column("pad", "text")], ["k"])
            t0 = time.monotonic()
            lsn = fill(db, 0, rows)
            fill_s = time.monotonic() - t0
            wait_for(lambda: cluster.workers()["s1"].get("applied_lsn", 0) >= lsn, timeout, what="s1 to catch up")
            print(f"{rows:,} rows: filled in {fill_s:.1f}s (LSN {lsn})", flush=True)
            r = {"rows": rows, "fill_s": fill_s}
            r["snap"] = time_to_ready(cluster, "n1", lsn, timeout)
            snap = json.loads((cluster.db_path("s1").parent / "snapshots" / "latest.json").read_text())
            r["size_mib"] = snap["size"] / 2**20
            print(f"  snapshot (made on demand): {r['snap']:.2f}s  [{fetched_line(cluster, 'n1')}]", flush=True)
            tail = max(ROWS_PER_OP, rows // 100)
            lsn = fill(db, rows, tail)
            r["snap_tail"] = time_to_ready(cluster, "n2", lsn, timeout)
            print(f"  snapshot + tail of {tail:,} rows: {r['snap_tail']:.2f}s  [{fetched_line(cluster, 'n2')}]",
                  flush=True)
            r["replay"] = time_to_ready(cluster, "n3", lsn, timeout, STRATUS_SNAPSHOT_FETCH="0")
            print(f"  log replay alone: {r['replay']:.2f}s", flush=True)
            r["same"] = cluster.checksum("n2") == cluster.checksum("n3") == cluster.checksum("w1")
            print(f"  n2, n3 and the master have the same checksum: {r['same']}", flush=True)
            return r
        finally:
            cluster.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--timeout", type=float, default=600.0, help="longest wait for one new slave (s)")
    ap.add_argument("--record", action="store_true", help="append the figures to docs/benchmarks.md")
    args = ap.parse_args()
    results = [measure(n, args.timeout) for n in args.rows]
    table = ["| rows | snapshot (MiB) | snapshot, made on demand (s) | snapshot + 1% tail (s) | log replay alone (s) |",
             "|---|---|---|---|---|"]
    table += [f"| {r['rows']:,} | {r['size_mib']:.0f} | {r['snap']:.2f} | {r['snap_tail']:.2f} | {r['replay']:.2f} |"
              for r in results]
    met = [r for r in results if r["rows"] >= 1_000_000]
    verdict = ("not measured at 1,000,000 rows" if not met else
               "met" if max(met[0]["snap"], met[0]["snap_tail"]) < 30 else "not met")
    text = (f"`benchmarks/snapshot.py --rows {' '.join(str(n) for n in args.rows)}`: time from starting a new "
            "slave to `ready` in its membership, with a master and one ready slave (local processes), the table "
            f"filled by bulk inserts ({ROWS_PER_OP} rows per op, {OPS_PER_WRITE} ops per write). *Snapshot, made on "
            "demand*: the ready slave makes the snapshot for the request (SQLite backup), sends it in 1 MiB "
            "checksummed chunks, the new slave verifies, installs and resumes the log after it. *Snapshot + "
            "tail*: 1% more rows written first; the slave serves the snapshot it just made and the new one "
            "replays the tail. *Log replay alone*: STRATUS_SNAPSHOT_FETCH=0.\n\n" + "\n".join(table) +
            f"\n\nTarget: 1,000,000 rows ready in under 30 s: {verdict}. Every new slave converged to the master's "
            f"checksum: {all(r['same'] for r in results)}.")
    print("\n" + text)
    if args.record:
        record("New slave ready: snapshot and log replay", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
