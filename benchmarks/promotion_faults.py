"""How long writes pause when a promotion meets a fault (issue #13, section
2): the fault tests of tests/integration/test_worker_faults.py, run N times
against the real broker and ZooKeeper, each printing one recovery time.

    .venv/bin/python benchmarks/promotion_faults.py [--runs 5] [--record]

  connection-dropped-after-barrier  kill -9 of the master; the new one's AMQP
                                    connection drops between its barrier's
                                    publish and read-back: from the kill to
                                    the first acknowledged write
  deliveries-in-flight-at-cancel    a flood of log records while the new
                                    master cancels its stream consumer: from
                                    the end of the flood to the first ack
  broker-restart-mid-promotion      RabbitMQ restarted (stop_app/start_app)
                                    while the new master promotes: from the
                                    broker being back to the first ack

Target: writes acknowledged again within the failover target, median <= 2 s."""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

from _common import ROOT, record

TESTS = ("test_promotion_finishes_after_its_connection_drops_between_barrier_and_read_back or "
         "test_promotion_finishes_with_deliveries_in_flight_on_its_stream_consumer or "
         "test_promotion_finishes_across_a_broker_restart")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    times: dict[str, list[float]] = {}
    for i in range(args.runs):
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                              "tests/integration/test_worker_faults.py", "-k", TESTS],
                             cwd=ROOT, capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            print(out.stdout[-3000:])
            raise SystemExit(f"run {i + 1}: the fault tests failed")
        for line in out.stdout.splitlines():
            if line.startswith("RECOVERY "):
                _, name, secs = line.split()
                times.setdefault(name, []).append(float(secs))
        print(f"run {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in sorted(times.items())), flush=True)
    rows = ["| fault during promotion | runs | median (s) | max (s) |", "|---|---|---|---|"]
    ok = True
    for name, v in sorted(times.items()):
        ok &= statistics.median(v) <= 2.0
        rows.append(f"| {name} | {len(v)} | {statistics.median(v):.2f} | {max(v):.2f} |")
    text = (f"`benchmarks/promotion_faults.py --runs {args.runs}`: the promotion fault tests of "
            "tests/integration/test_worker_faults.py (STRATUS_FAULTS injects each fault at its point), a "
            "master and one slave, local processes.\n\n" + "\n".join(rows) +
            f"\n\nTarget: median <= 2 s for each: {'met' if ok else 'NOT met'}.")
    print("\n" + text)
    if args.record:
        record("Writes acknowledged again after a fault during promotion", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
