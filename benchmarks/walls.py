"""The walls under attack (issue 22): another tenant's latency while a
hostile app attacks from inside its instance, on the process runtime.

The platform of tests/kits/escapekit.py (a real orchestrator, gateway and
dashboard; tenant `victim` running the example app, tenant `mallory` the
hostile app of tests/data/apps/hostile). Each round measures the victim's
GET /shop through the gateway, one request after another on one keep-alive
connection: 200 requests before (after 20 of warm-up), then without pause
while the hostile app runs every attempt of the escape suite (secrets, other
processes, the broker, ZooKeeper, the platform's ports, a fork bomb, a memory
hog, a disk filler, 4 CPU burners for 3 s); the hostile instance may be killed
and restarted between rounds.

    .venv/bin/python benchmarks/walls.py [--rounds 5] [--record]

Target (issue 22, Acceptance): the victim's p99 during the attack within 2x
of its p99 before, every answer 200, and nothing reached."""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from _common import record

from kits import escapekit


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--record", action="store_true")
    opts = ap.parse_args()
    rows = []
    with escapekit.escape_platform(Path(tempfile.mkdtemp(prefix="stratus-bench-walls-"))) as p:
        for n in range(1, opts.rounds + 1):
            r = escapekit.attack(p)
            before, during = r["before"], r["during"]
            reached = sorted(k for k, v in r["report"].items() if v.get("reached") is not False)
            failed = len(during.samples) - during.statuses().get(200, 0)
            row = {"round": n, "before": before.p99() * 1000, "during": during.p99() * 1000,
                   "median_before": before.median() * 1000, "median_during": during.median() * 1000,
                   "requests": len(during.samples), "failed": failed, "probe": r["took"], "reached": reached}
            row["ratio"] = row["during"] / row["before"]
            rows.append(row)
            print(f"round {n}: p99 {row['before']:.1f} ms before, {row['during']:.1f} ms during "
                  f"({row['ratio']:.2f}x; medians {row['median_before']:.1f} / {row['median_during']:.1f} ms), "
                  f"{row['requests']} requests during, {failed} not 200, probe {r['took']:.1f}s, "
                  f"reached: {reached or 'nothing'}", flush=True)
            p.wait_hostile()      # restarted, if the platform killed it
    ratios = [r["ratio"] for r in rows]
    lines = ["| round | p99 before ms | p99 during ms | ratio | median before / during ms | requests during "
             "| not 200 | probe s | reached |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['round']} | {r['before']:.1f} | {r['during']:.1f} | {r['ratio']:.2f} "
                     f"| {r['median_before']:.1f} / {r['median_during']:.1f} | {r['requests']} | {r['failed']} "
                     f"| {r['probe']:.1f} | {', '.join(r['reached']) or 'nothing'} |")
    summary = (f"p99 ratio during/before: median {statistics.median(ratios):.2f}x, worst {max(ratios):.2f}x "
               f"(target <= 2x); not 200: {sum(r['failed'] for r in rows)}; rounds with anything reached: "
               f"{sum(bool(r['reached']) for r in rows)} of {len(rows)}")
    table = "\n".join(lines) + "\n\n" + summary
    print(table)
    if opts.record:
        record("Walls: another tenant's latency under a hostile app (benchmarks/walls.py)",
               "Process runtime; victim = the example app (2 web instances) through a real gateway, one request "
               "after another; the hostile app runs the escape suite's attempts (tests/data/apps/hostile) during "
               "the second measurement. Target: p99 during within 2x of before, all 200, nothing reached.\n\n"
               + table)
    ok = max(ratios) <= 2.0 and not any(r["failed"] or r["reached"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
