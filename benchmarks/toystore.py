"""Toy store latency through the gateway: query, order and check latency
(p50, p95, p99) for order probability p in 0, 0.2, 0.4, 0.6, 0.8 with 5
clients, with the gateway's product cache on and off. A real local cluster
(a master and one slave) with catalog, order and gateway processes; the load
is `stratus load toystore` run in this process. Draws
docs/toystore-latency.png.

    .venv/bin/python benchmarks/toystore.py [--seconds 6] [--clients 5] [--json out.json]

Bounded: about 2 x 5 x seconds plus ~20 s of start-up."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, machine, record

sys.path.insert(0, str(ROOT / "tests" / "integration"))

from harness import LocalCluster  # noqa: E402
from stratus import load_toystore as lt  # noqa: E402
from test_toystore_support import start_catalog, start_gateway, start_order  # noqa: E402

PS = [0.0, 0.2, 0.4, 0.6, 0.8]
TYPES = ("query", "order", "check")


def bench(seconds: float, clients: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="toystore-bench-") as tmp:
        cluster = LocalCluster(Path(tmp))
        try:
            cluster.bootstrap(slaves=1)
            start_catalog(cluster, "catalog", STRATUS_RESTOCK_INTERVAL=1)
            start_order(cluster, "order")
            for cache in (1, 0):
                key = f"gw-cache{cache}"
                gw = start_gateway(cluster, key, STRATUS_GATEWAY_CACHE=cache)
                lt.run(gw, clients=clients, p=0.2, duration=1.5, progress=False)  # warm-up
                for p in PS:
                    s = lt.run(gw, clients=clients, p=p, duration=seconds, seed=int(p * 10), progress=False)
                    row = {"cache": bool(cache), "p": p, "orders": s["orders_placed"],
                           "refused": s["orders_refused"], "mismatches": len(s["mismatches"]),
                           **{t: s["types"][t] for t in TYPES}}
                    rows.append(row)
                    print(f"cache {'on ' if cache else 'off'} p={p:.1f}  " + "  ".join(
                        f"{t} p50 {_f(row[t]['p50_ms'])} p95 {_f(row[t]['p95_ms'])} p99 {_f(row[t]['p99_ms'])} "
                        f"({row[t]['rps']:.0f}/s, {row[t]['errors']} err)" for t in TYPES), flush=True)
                cluster.kill(key)
        finally:
            cluster.close()
    return rows


def _f(v):
    return "-" if v is None else f"{v:.1f}"


def table(rows: list[dict]) -> str:
    out = ["| cache | p | query p50/p95/p99 ms | query/s | order p50/p95/p99 ms | orders/s | "
           "check p50/p95/p99 ms | errors | mismatches |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def trio(t):
            return f"{_f(r[t]['p50_ms'])} / {_f(r[t]['p95_ms'])} / {_f(r[t]['p99_ms'])}"
        errors = sum(r[t]["errors"] for t in TYPES)
        out.append(f"| {'on' if r['cache'] else 'off'} | {r['p']:.1f} | {trio('query')} | {r['query']['rps']:.0f} | "
                   f"{trio('order')} | {r['order']['rps']:.0f} | {trio('check')} | {errors} | {r['mismatches']} |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4), sharey=False)
    for ax, t in zip(axes, TYPES):
        for cache, color in ((True, "tab:blue"), (False, "tab:orange")):
            rs = [r for r in rows if r["cache"] == cache and r[t]["p50_ms"] is not None]
            if not rs:
                continue
            ps = [r["p"] for r in rs]
            label = f"cache {'on' if cache else 'off'}"
            ax.plot(ps, [r[t]["p50_ms"] for r in rs], "o-", color=color, label=f"{label} p50")
            ax.plot(ps, [r[t]["p95_ms"] for r in rs], "s--", color=color, alpha=0.7, label=f"{label} p95")
            ax.plot(ps, [r[t]["p99_ms"] for r in rs], "^:", color=color, alpha=0.5, label=f"{label} p99")
        ax.set_title(f"{t} latency")
        ax.set_xlabel("order probability p")
        ax.set_ylabel("ms")
        ax.set_xticks(PS)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="seconds per (cache, p) run (6)")
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--png", default=str(ROOT / "docs" / "toystore-latency.png"))
    ap.add_argument("--record", action="store_true", help="append the table to docs/benchmarks.md")
    a = ap.parse_args()
    started = time.monotonic()
    rows = bench(a.seconds, a.clients)
    print()
    print(table(rows))
    print(f"\nmachine: {machine()}; {a.clients} clients, {a.seconds:g} s per run; "
          f"total {time.monotonic() - started:.0f} s")
    plot(rows, Path(a.png), f"Toy store through the gateway, {a.clients} clients, {a.seconds:g} s per point "
                            f"({time.strftime('%Y-%m-%d', time.gmtime())}; {machine()})")
    print(f"wrote {a.png}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if a.record:
        record("Toy store through the gateway (product cache on and off)",
               f"`python benchmarks/toystore.py --seconds {a.seconds:g} --clients {a.clients}`; "
               f"plot: docs/toystore-latency.png\n\n```\n{table(rows)}\n```\n")
    return 1 if any(r["mismatches"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
