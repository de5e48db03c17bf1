"""What tenancy costs the DB client (issue #14): operations per second on the
read and write paths, before tenancy and after it, in alternating rounds on
the same machine.

    .venv/bin/python benchmarks/tenancy.py [--rounds 3] [--seconds 6] [--base REV] [--record]

"Before" runs benchmarks/db_client.py as it stood at REV (by default the
commit just before tenancy reached the DB client: the parent of the first
commit whose bus/client.py imports bus.tenancy), from a temporary git
worktree, as the platform. "After" runs today's db_client.py with --tenant, the client on the
tenant's own broker account: every request carries a validated user_id, goes
through the request exchange, and is resolved in the tenant's namespace.
Target: after >= 90% of before, for reads and writes with 8 client threads."""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

from _common import ROOT, record

LINE = re.compile(r"^(read|write)\s+threads=(\d+):\s+(\d+)/s\s+p50\s+([\d.]+) ms\s+p99\s+([\d.]+) ms")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def run(tree: str, seconds: float, extra: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": tree}
    out = subprocess.run([sys.executable, "benchmarks/db_client.py", "--seconds", str(seconds), *extra],
                         cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"db_client.py failed in {tree}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    figures = {}
    for line in out.stdout.splitlines():
        m = LINE.match(line.strip())
        if m:
            figures[(m[1], int(m[2]))] = (float(m[3]), float(m[4]), float(m[5]))
    return figures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--base", help="the revision before tenancy")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    # Before tenancy: the parent of the first commit whose DB client speaks for a tenant.
    base = args.base or git("rev-parse", git("log", "--format=%H", "-S", "from . import tenancy", "--",
                                             "bus/client.py").splitlines()[-1] + "^")
    results: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        tree = os.path.join(tmp, "base")
        git("worktree", "add", "--detach", tree, base)
        try:
            for i in range(args.rounds):
                for name in ("before", "after") if i % 2 == 0 else ("after", "before"):
                    figs = run(tree, args.seconds, []) if name == "before" else \
                        run(str(ROOT), args.seconds, ["--tenant", "bench"])
                    results[name].append(figs)
                    print(f"round {i + 1} {name:6}: " + ", ".join(
                        f"{k}x{t} {v[0]:.0f}/s" for (k, t), v in sorted(figs.items())), flush=True)
        finally:
            git("worktree", "remove", "--force", tree)
    rows = ["| path | client threads | before (ops/s) | after, as a tenant (ops/s) | after / before | "
            "p99 before → after (ms) |", "|---|---|---|---|---|---|"]
    ok = True
    for key in sorted(results["before"][0]):
        b = statistics.median(r[key][0] for r in results["before"])
        a = statistics.median(r[key][0] for r in results["after"])
        pb = statistics.median(r[key][2] for r in results["before"])
        pa = statistics.median(r[key][2] for r in results["after"])
        if key[1] == 8:
            ok &= a >= 0.9 * b
        rows.append(f"| {key[0]} | {key[1]} | {b:.0f} | {a:.0f} | {a / b:.0%} | {pb:.2f} → {pa:.2f} |")
    text = (f"`benchmarks/tenancy.py --rounds {args.rounds} --seconds {args.seconds:g}`: medians of "
            f"{args.rounds} alternating rounds. Before: db_client.py at {base[:10]} (no tenancy), as the "
            "platform. After: today's, the client on a tenant's own broker account (validated user_id, the "
            "request exchange, names resolved in the tenant's namespace). A master and 2 slaves, local "
            "processes.\n\n" + "\n".join(rows) +
            f"\n\nTarget (8 threads): after >= 90% of before: {'met' if ok else 'NOT met'}.")
    print("\n" + text)
    if args.record:
        record("Tenancy's cost on the DB client", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
