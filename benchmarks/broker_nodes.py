"""Write throughput and latency with 1 and with 3 RabbitMQ nodes: what the
replication of the log (a stream with a replica on every node) and of the
request queues (quorum queues) costs (docs/cluster.md).

    .venv/bin/python benchmarks/broker_nodes.py [--seconds 8] [--rounds 2] [--slaves 1] [--record]

One node: the broker scripts/services.sh runs by default (STRATUS_AMQP_URL,
127.0.0.1:5672), classic request queues and an unreplicated stream, as `make
up` runs it. Three nodes: a RabbitMQ cluster of this run's own, started
through scripts/services.sh (STRATUS_BROKER_NODES=3, its own state directory
and free ports) and stopped at the end; STRATUS_BROKER_NODES=3 for the
workers and the client. Both use the same ZooKeeper. Each side runs a master
and --slaves slaves (local processes) and one DB client; the writes are
benchmarks/db_client.py's (single-row upserts, 1 and 8 client threads), in
alternating rounds so that the machine's other load falls on both alike.

Target: 3 nodes keep at least 60% of one node's write throughput (8 threads)."""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, record

sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from bus import ops  # noqa: E402
from db_client import run  # noqa: E402
from harness import LocalCluster  # noqa: E402
from kits.multinode import MultiNode  # noqa: E402

TARGET = 0.60
THREADS = (1, 8)


def prepare(cluster: LocalCluster, slaves: int):
    cluster.bootstrap(slaves=slaves)
    db = cluster.client(name="bench")
    db.create_table("kv", [ops.column("k", "text", nullable=False), ops.column("v", "integer")], ["k"])
    return db


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="length of one round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of each configuration, alternating")
    ap.add_argument("--slaves", type=int, default=1)
    ap.add_argument("--record", action="store_true", help="append the figures to docs/benchmarks.md")
    args = ap.parse_args()
    rows: dict[tuple[int, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("starting a RabbitMQ cluster of 3 nodes (scripts/services.sh) ...", flush=True)
        with MultiNode(tmp / "services", brokers=3, zks=1) as mn:
            e = mn.env
            one = LocalCluster(tmp / "one", name=f"bench1n{int(time.time())}")
            three = LocalCluster(tmp / "three", name=f"bench3n{int(time.time())}", amqp_url=e["STRATUS_AMQP_URL"],
                                 amqp_management_url=e["STRATUS_AMQP_MANAGEMENT_URL"], broker_nodes=3)
            try:
                dbs = {1: prepare(one, args.slaves), 3: prepare(three, args.slaves)}
                for rnd in range(args.rounds):
                    for nodes in (1, 3) if rnd % 2 == 0 else (3, 1):
                        for threads in THREADS:
                            r = run(dbs[nodes], "write", threads, args.seconds)
                            rows.setdefault((nodes, threads), []).append(r)
                            print(f"round {rnd + 1}: {nodes} node(s), {threads} thread(s): {r['per_s']:7.0f} writes/s  "
                                  f"p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  ({r['errors']} errors)",
                                  flush=True)
            finally:
                one.close()
                three.close()
    summary = {}
    for key, rs in rows.items():
        # Rounds of equal length: the mean rate; the worst round's p99 (no
        # latency is averaged away).
        summary[key] = {"per_s": sum(r["per_s"] for r in rs) / len(rs),
                        "p50_ms": sorted(r["p50_ms"] for r in rs)[len(rs) // 2],
                        "p99_ms": max(r["p99_ms"] for r in rs), "errors": sum(r["errors"] for r in rs),
                        "ops": sum(r["ops"] for r in rs)}
    table = ["| broker nodes | client threads | writes/s | p50 (ms) | p99 (ms) | writes | errors |",
             "|---|---|---|---|---|---|---|"]
    for (nodes, threads), s in sorted(summary.items()):
        table.append(f"| {nodes} | {threads} | {s['per_s']:.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
                     f"{s['ops']} | {s['errors']} |")
    ratios = {t: summary[(3, t)]["per_s"] / summary[(1, t)]["per_s"] for t in THREADS if summary[(1, t)]["per_s"]}
    verdict = "met" if ratios.get(8, 0) >= TARGET else "NOT met"
    text = (f"`benchmarks/broker_nodes.py --seconds {args.seconds:g} --rounds {args.rounds} --slaves {args.slaves}`: "
            f"one DB client writing single-row upserts through a master with {args.slaves} slave(s), on the "
            "single RabbitMQ node services.sh runs by default (classic request queues, unreplicated stream) and on a "
            "3-node cluster started by services.sh (STRATUS_BROKER_NODES=3: quorum request queues, the stream "
            "replicated on every node), in alternating rounds; same ZooKeeper, same machine, every server on "
            "loopback. Rates are the mean of the rounds, p99 the worst round's.\n\n" + "\n".join(table) +
            "\n\n" + "; ".join(f"{t} thread(s): 3 nodes keep {ratios[t] * 100:.0f}% of one node's writes/s"
                               for t in THREADS if t in ratios) +
            f". Target: at least {TARGET * 100:.0f}% with 8 threads: {verdict}.")
    print("\n" + text)
    if args.record:
        record("Write throughput with 1 and 3 broker nodes", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
