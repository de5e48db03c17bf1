"""`stratus load rides`: steady read load on the rides service.

Sends ride-list reads (GET /api/v1/rides?source=S&destination=D, random
distinct areas) at a steady rate for a bounded time, through the gateway by
default or straight at a rides instance with --url. A small pool of threads,
each with ONE keep-alive HTTP connection (http.client), sends them. Every
second it prints one line: reads sent, errors, latency p50/p95 of that second,
and how many slaves the cluster has now (from the orchestrator; "?" when it
does not answer). It is the load that drives the orchestrator's scaling rule.

    stratus load rides --rate 20 --duration 60
    stratus load rides --rate 5 --duration 10 --url http://127.0.0.1:8083

Exit status: 0 when some reads succeeded, 1 when none did, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import http.client
import json
import queue
import random
import sys
import threading
import time
from urllib.parse import urlsplit

from bus.settings import load as load_settings
from .measure import percentile

OK_STATUSES = (200, 204)


class Window:
    """Outcomes of one reporting period (and, separately, of the whole run)."""

    def __init__(self):
        self.sent = 0
        self.errors = 0
        self.lat: list[float] = []

    def add(self, ok: bool, latency: float) -> None:
        self.sent += 1
        if ok:
            self.lat.append(latency)
        else:
            self.errors += 1


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.now = Window()
        self.total = Window()
        self.samples: list[str] = []

    def add(self, ok: bool, latency: float, note: str = "") -> None:
        with self.lock:
            self.now.add(ok, latency)
            self.total.add(ok, latency)
            if not ok and note and len(self.samples) < 5:
                self.samples.append(note)

    def take(self) -> Window:
        with self.lock:
            w, self.now = self.now, Window()
            return w


class Connection:
    """One keep-alive HTTP/1.1 connection; reconnects once when the server closed it."""

    def __init__(self, url: str, timeout: float):
        u = urlsplit(url)
        if u.scheme not in ("http", "") or not u.hostname:
            raise ValueError(f"not an http URL: {url!r}")
        self.host, self.port = u.hostname, u.port or 80
        self.prefix = u.path.rstrip("/")
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def get(self, path: str) -> int:
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request("GET", self.prefix + path, headers={"Accept": "application/json"})
                resp = self.conn.getresponse()
                resp.read()
                if resp.will_close:
                    self.close()
                return resp.status
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt:
                    raise
            except Exception:
                self.close()
                raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _get_json(base: str, path: str, timeout: float):
    """GET base+path on a fresh connection: the decoded JSON body on 200, else None."""
    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    try:
        conn.request("GET", u.path.rstrip("/") + path, headers={"Accept": "application/json"})
        r = conn.getresponse()
        body = r.read()
        return json.loads(body) if r.status == 200 else None
    finally:
        conn.close()


def slave_count(orchestrator: str, timeout: float = 0.8) -> int | None:
    """Slaves in the cluster now: /api/v1/cluster (workers that are not the
    master), else /api/v1/worker/list minus the master; None when the
    orchestrator does not answer."""
    try:
        view = _get_json(orchestrator, "/api/v1/cluster", timeout)
        if isinstance(view, dict) and isinstance(view.get("workers"), list):
            return sum(1 for w in view["workers"] if isinstance(w, dict) and w.get("role") != "master")
        pids = _get_json(orchestrator, "/api/v1/worker/list", timeout)
        if isinstance(pids, list):
            return max(0, len(pids) - 1)
    except (OSError, ValueError, http.client.HTTPException):
        pass
    return None


class SlaveWatch(threading.Thread):
    """Polls the orchestrator once a second, off the reporting path."""

    def __init__(self, orchestrator: str, stop: threading.Event):
        super().__init__(name="slave-watch", daemon=True)
        self.orchestrator = orchestrator
        self.stop = stop
        self.value: int | None = None

    def run(self) -> None:
        while not self.stop.is_set():
            self.value = slave_count(self.orchestrator)
            self.stop.wait(1.0)


def _fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}ms"


def run(url: str, *, rate: float, duration: float, threads: int = 4, orchestrator: str | None = None,
        seed: int | None = None, timeout: float = 10.0, out=sys.stdout) -> dict:
    """Send `rate` reads per second for `duration` seconds; returns a summary."""
    rng = random.Random(seed)
    stats = Stats()
    stop = threading.Event()
    jobs: queue.Queue = queue.Queue()
    watch = SlaveWatch(orchestrator, stop) if orchestrator else None
    if watch:
        watch.start()

    def worker():
        conn = Connection(url, timeout)
        try:
            while True:
                path = jobs.get()
                if path is None:
                    return
                start = time.monotonic()
                try:
                    status = conn.get(path)
                    ok, note = status in OK_STATUSES, f"HTTP {status}"
                except Exception as exc:  # counted, and the run goes on
                    ok, note = False, f"{type(exc).__name__}: {exc}"
                stats.add(ok, time.monotonic() - start, note)
        finally:
            conn.close()

    pool = [threading.Thread(target=worker, name=f"load-{i}", daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    t0 = time.monotonic()
    end = t0 + duration
    interval = 1.0 / rate
    next_send, next_report, second = t0, t0 + 1.0, 0

    def report():
        nonlocal second
        second += 1
        w = stats.take()
        lat = sorted(w.lat)
        slaves = "?" if not watch or watch.value is None else str(watch.value)
        print(f"[{second:>4}s] reads {w.sent:>4}  errors {w.errors:>3}  p50 {_fmt_ms(percentile(lat, 50)):>8}  "
              f"p95 {_fmt_ms(percentile(lat, 95)):>8}  slaves {slaves}", file=out, flush=True)

    while True:
        now = time.monotonic()
        if now >= next_report:
            report()
            next_report += 1.0
            continue
        if next_send < end and now >= next_send:
            src, dst = rng.sample(range(1, 199), 2)
            jobs.put(f"/api/v1/rides?source={src}&destination={dst}")
            next_send += interval
            continue
        if next_send >= end and now >= end:
            break
        time.sleep(max(0.0, min(next_send if next_send < end else end, next_report) - now))
    for _ in pool:
        jobs.put(None)
    deadline = time.monotonic() + timeout + 1
    for t in pool:
        t.join(max(0.0, deadline - time.monotonic()))
    if stats.now.sent:
        report()
    stop.set()
    total = stats.total
    lat = sorted(total.lat)
    summary = {"url": url, "rate": rate, "duration": duration, "sent": total.sent, "errors": total.errors,
               "ok": total.sent - total.errors, "p50_ms": _ms(percentile(lat, 50)),
               "p95_ms": _ms(percentile(lat, 95)), "error_samples": stats.samples}
    print(f"total: {summary['sent']} reads, {summary['errors']} errors, p50 {_fmt_ms(percentile(lat, 50))}, "
          f"p95 {_fmt_ms(percentile(lat, 95))}", file=out, flush=True)
    for s in stats.samples:
        print(f"  error: {s}", file=out)
    return summary


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 2)


def parse_args(args: list[str]) -> argparse.Namespace:
    settings = load_settings()
    ap = argparse.ArgumentParser(prog="stratus load rides", description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=10.0, help="reads per second (default 10)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds to run (default 30)")
    ap.add_argument("--url", default=settings.gateway_base_url(),
                    help="the gateway, or a rides instance (default %(default)s)")
    ap.add_argument("--orchestrator", default=settings.orchestrator_base_url(),
                    help="where to read the number of slaves (default %(default)s)")
    ap.add_argument("--threads", type=int, default=4, help="sending threads, one connection each (default 4)")
    ap.add_argument("--seed", type=int, default=None, help="seed for the random areas")
    a = ap.parse_args(args)
    if not 0 < a.rate <= 10_000:
        ap.error("--rate must be above 0 and at most 10000")
    if not 0 < a.duration <= 86_400:
        ap.error("--duration must be above 0 and at most 86400 seconds")
    if not 1 <= a.threads <= 256:
        ap.error("--threads must be from 1 to 256")
    try:
        Connection(a.url, 1.0)
        Connection(a.orchestrator, 1.0)
    except ValueError as exc:
        ap.error(str(exc))
    return a


def main(args: list[str]) -> int:
    try:
        a = parse_args(args)
    except SystemExit as exc:  # argparse: --help is 0, errors are 2
        return int(exc.code or 0)
    try:
        summary = run(a.url, rate=a.rate, duration=a.duration, threads=a.threads,
                      orchestrator=a.orchestrator, seed=a.seed)
    except KeyboardInterrupt:
        return 130
    return 0 if summary["ok"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
