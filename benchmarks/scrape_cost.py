"""What Prometheus's scraping costs the platform: the same end-to-end read
load through the gateway (GET /api/v1/users: gateway -> users service -> bus
-> a slave) with and without every component being scraped, in alternating
rounds, pooled per way. The dashboard issue's bar: scraping costs at most 5%
of the end-to-end throughput.

A real orchestrator (which starts a master and a slave and writes the file
service discovery into a private directory), the real users service and a
gateway, all on loopback. "Scraped" rounds copy the cluster's SD file into
the directory the running Prometheus reads (scripts/services.sh starts it:
5 s interval), "not scraped" rounds remove it; Prometheus picks the change
up at once (inotify) and its own CPU counts, as it would on a real machine.
Without a Prometheus (or with --scraper builtin), a thread in this script
GETs every listed /metrics every --interval seconds instead (the targets'
cost, not Prometheus's).

Also printed: the time and size of one /metrics answer of each component
(the per-scrape cost, against the scrape interval).

    .venv/bin/python benchmarks/scrape_cost.py [--seconds 10] [--rounds 3] [--clients 16]
        [--scraper prometheus|builtin] [--interval 5] [--json out.json] [--record]

Bounded: 2 x rounds runs of `seconds` (plus a warm-up each) and ~30 s of
start-up: about 2 minutes with the defaults."""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from _common import ROOT, machine, record

sys.path.insert(0, str(ROOT))

from bus.settings import load as load_settings  # noqa: E402
from harness import LocalCluster  # noqa: E402
from kits.testkit import Client, free_port, real_orchestrator, start_gateway, wait_healthy, wait_until  # noqa: E402

_spec = importlib.util.spec_from_file_location("gateway_bench", ROOT / "benchmarks" / "gateway.py")
gateway_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gateway_bench)

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, timeout: float = 5.0) -> bytes:
    with _OPENER.open(url, timeout=timeout) as r:
        return r.read()


def prometheus_sd_dir(url: str) -> Path | None:
    """The file_sd directory of the Prometheus at `url`, None when none answers."""
    import yaml
    try:
        cfg = yaml.safe_load(json.loads(_get(f"{url}/api/v1/status/config", 3))["data"]["yaml"])
    except (OSError, ValueError, KeyError):
        return None
    for job in cfg.get("scrape_configs", []):
        for sd in job.get("file_sd_configs", []):
            for pattern in sd.get("files", []):
                return Path(pattern).parent
    return None


def targets(sd_file: Path) -> list[tuple[str, str]]:
    """(component, host:port) of every target in an SD file."""
    groups = json.loads(sd_file.read_text())
    return [(g["labels"]["component"], t) for g in groups for t in g["targets"]]


class BuiltinScraper:
    """GET every target's /metrics every `interval` s, as Prometheus would."""

    def __init__(self, sd_file: Path, interval: float):
        self.sd_file, self.interval = sd_file, interval
        self.on = threading.Event()
        self.stop = threading.Event()
        self.scrapes = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.stop.is_set():
            if self.on.is_set():
                for _, t in targets(self.sd_file):
                    try:
                        _get(f"http://{t}/metrics")
                        self.scrapes += 1
                    except OSError:
                        pass
            self.stop.wait(self.interval)


def prometheus_pids() -> list[int]:
    """Every process named prometheus on this machine (its CPU is part of the cost)."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and (d / "comm").read_text().strip() == "prometheus":
                out.append(int(d.name))
        except OSError:
            continue
    return out


def cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += gateway_bench.cpu_seconds(pid)
        except OSError:
            pass
    return total


def scrape_sizes(sd_file: Path, n: int = 20) -> dict[str, tuple[float, int]]:
    """Per component: (mean ms of one GET /metrics, bytes)."""
    out = {}
    for component, t in targets(sd_file):
        key = f"{component} {t}"
        body = b""
        t0 = time.perf_counter()
        for _ in range(n):
            body = _get(f"http://{t}/metrics")
        out[key] = ((time.perf_counter() - t0) / n * 1000, len(body))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--scraper", choices=("prometheus", "builtin"), default=None,
                    help="default: the running Prometheus when one answers, else builtin")
    ap.add_argument("--interval", type=float, default=5.0, help="the builtin scraper's interval (s)")
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--record", action="store_true", help="append the figures to docs/benchmarks.md")
    args = ap.parse_args()
    prom_url = load_settings().prometheus_url.rstrip("/")
    prom_dir = prometheus_sd_dir(prom_url) if args.scraper != "builtin" else None
    if args.scraper == "prometheus" and prom_dir is None:
        print(f"no Prometheus with file SD answers at {prom_url} (scripts/services.sh start)", file=sys.stderr)
        return 2
    mode = "prometheus" if prom_dir is not None else "builtin"
    runs: dict[str, list[dict]] = {"not scraped": [], "scraped": []}
    cpu_ms: dict[str, dict[str, list[float]]] = {w: {"gateway": [], "prometheus": []} for w in runs}
    with tempfile.TemporaryDirectory(prefix="scrape-bench-") as tmp:
        cluster = LocalCluster(Path(tmp))
        private = Path(tmp) / "sd"
        sd_file = private / f"{cluster.name}.json"
        shown = prom_dir / sd_file.name if prom_dir is not None else None
        scraper = None
        try:
            with real_orchestrator(cluster, STRATUS_PROMETHEUS_SD_DIR=str(private), STRATUS_LOG_LEVEL="WARNING"):
                users_port = free_port()
                cluster.spawn("users", ["-m", "users"], STRATUS_USERS_PORT=users_port, STRATUS_LOG_LEVEL="WARNING")
                gw = start_gateway(cluster, STRATUS_GATEWAY_ACCESS_LOG="0", STRATUS_LOG_LEVEL="WARNING")
                wait_healthy(gw, "users", 1, timeout=60)
                c = Client(users_port)
                wait_until(lambda: c.get("/api/v1/users")[0] in (200, 204), 60, what="users tables")
                for i in range(20):
                    c.request("PUT", "/api/v1/users", {"username": f"bench{i}", "password": "a" * 40})

                def listed():
                    try:
                        comps = {comp for comp, _ in targets(sd_file)}
                    except (OSError, ValueError):
                        return False
                    return {"gateway", "orchestrator", "worker", "service"} <= comps
                wait_until(listed, 60, what="the SD file to list every component")
                print(f"machine: {machine()}", flush=True)
                print(f"scraper: {mode}" + (f" ({prom_url}, its SD directory {prom_dir})" if prom_dir else
                                            f" (every {args.interval:g} s)"), flush=True)
                sizes = scrape_sizes(sd_file)
                for key, (ms, size) in sizes.items():
                    print(f"GET /metrics of {key}: {ms:.2f} ms, {size} bytes", flush=True)
                if mode == "builtin":
                    scraper = BuiltinScraper(sd_file, args.interval)
                warm = min(2.0, args.seconds / 4)
                for rnd in range(args.rounds):
                    for way in ("not scraped", "scraped") if rnd % 2 == 0 else ("scraped", "not scraped"):
                        if way == "scraped":
                            if shown is not None:
                                shutil.copyfile(sd_file, shown)
                            else:
                                scraper.on.set()
                        else:
                            if shown is not None:
                                shown.unlink(missing_ok=True)
                            elif scraper is not None:
                                scraper.on.clear()
                        time.sleep(1.0)   # Prometheus takes the file up (or drops it)
                        gateway_bench.load(gw, "/api/v1/users", clients=args.clients, seconds=warm)
                        gw_pid, prom = [cluster.procs["gateway"].pid], prometheus_pids()
                        before, t0 = (cpu(gw_pid), cpu(prom)), time.monotonic()
                        r = gateway_bench.load(gw, "/api/v1/users", clients=args.clients, seconds=args.seconds)
                        took = time.monotonic() - t0
                        used = {"gateway": (cpu(gw_pid) - before[0]) / took * 1000,
                                "prometheus": (cpu(prom) - before[1]) / took * 1000}
                        runs[way].append(r)
                        for k, v in used.items():
                            cpu_ms[way][k].append(v)
                        print(f"round {rnd + 1}, {way:<12} " + gateway_bench.fmt("", r).strip()
                              + f"  CPU ms/s: gateway {used['gateway']:.0f}, prometheus {used['prometheus']:.1f}",
                              flush=True)
                if shown is not None:
                    scraped_up = json.loads(_get(f"{prom_url}/api/v1/targets?state=active"))["data"]["activeTargets"]
                    ours = [t for t in scraped_up if t["labels"].get("cluster") == cluster.name]
                    print(f"Prometheus's targets of the cluster at the end: {len(ours)} "
                          f"({sum(t['health'] == 'up' for t in ours)} up)", flush=True)
        finally:
            if shown is not None:
                shown.unlink(missing_ok=True)
            if scraper is not None:
                scraper.stop.set()
            cluster.close()
    rows = {way: gateway_bench.pooled(rs) for way, rs in runs.items()}
    off, on = rows["not scraped"], rows["scraped"]
    cost = (off["rps"] - on["rps"]) / off["rps"] * 100 if off["rps"] else float("nan")
    lines = [gateway_bench.fmt(f"e2e users read, {way}", r) for way, r in rows.items()]
    lines.append(f"throughput cost of scraping ({mode}): {cost:+.1f}% (bar: at most 5%); "
                 f"p50 {on['p50_ms'] - off['p50_ms']:+.2f} ms, p99 {on['p99_ms'] - off['p99_ms']:+.2f} ms")
    for way, used in cpu_ms.items():
        lines.append(f"CPU while {way}: gateway {sum(used['gateway']) / len(used['gateway']):.0f} ms/s, "
                     f"Prometheus {sum(used['prometheus']) / len(used['prometheus']):.1f} ms/s "
                     "(of the 2,000 ms/s of 2 cores)")
    lines.append("per-round req/s: " + "; ".join(f"{way} {[round(r['rps']) for r in rs]}" for way, rs in runs.items()))
    print("\n".join(lines), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"mode": mode, "cost_pct": cost, "sizes": sizes,
                                               **{k: {f: v for f, v in r.items() if f != "lat"}
                                                  for k, r in rows.items()}}, indent=2))
    if args.record:
        record("Prometheus scraping cost",
               f"`python benchmarks/scrape_cost.py --seconds {args.seconds:g} --rounds {args.rounds} "
               f"--clients {args.clients} --scraper {mode}`\n\n"
               + "\n".join(f"- GET /metrics of {k}: {ms:.2f} ms, {size} bytes" for k, (ms, size) in sizes.items())
               + "\n" + "\n".join(f"- {line}" for line in lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
