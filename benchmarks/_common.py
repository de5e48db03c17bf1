"""Shared by the benchmark scripts: percentiles, the machine's description,
and recording figures in docs/benchmarks.md."""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

from stratus.measure import percentile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the LocalCluster harness


def pct(sorted_values: list[float], p: float) -> float:
    """stratus.measure.percentile, NaN when there is nothing to measure."""
    v = percentile(sorted_values, p)
    return float("nan") if v is None else v


def machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def record(title: str, body: str) -> None:
    """Append a dated section to docs/benchmarks.md."""
    path = ROOT / "docs" / "benchmarks.md"
    if not path.exists():
        path.write_text("# Benchmarks\n\nFigures measured by the scripts in benchmarks/, newest last.\n")
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with path.open("a") as f:
        f.write(f"\n## {title} — {stamp}\n\nMachine: {machine()}\n\n{body.rstrip()}\n")
