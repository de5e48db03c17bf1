"""`stratus load toystore`: the toy store's load client.

Each simulated client is a thread with ONE keep-alive HTTP connection
(http.client) that carries all of its requests. It queries a random toy
(GET /products/{name}); if the quantity is above 0 it orders that toy with
probability p (POST /orders, 1 to 3 units, never more than it saw). At the end
it fetches every order it placed (GET /orders/{n}) and checks that the name
and quantity match what it ordered. Prints a live progress line, then latency
per request type (query, order, check: p50, p95, p99), throughput and errors.
Exit status: 0 when every order matched, 1 on any mismatch (or when no query
succeeded at all), 2 on bad arguments.

    stratus load toystore --clients 5 --p 0.5 --duration 30
    python -m stratus.load_toystore --url http://127.0.0.1:8080 --requests 200 --json out.json
"""
from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import threading
import time
from urllib.parse import quote, urlsplit
from .measure import percentile

# The toys of catalog/products.csv (a unit test keeps the two in step; the
# client talks HTTP only and imports no component).
DEFAULT_TOYS = ["Tux", "Fox", "Python", "Whale", "Elephant", "Dolphin", "Lego", "Yoyo", "Frisbee", "Marbles",
                "Kite", "Robot"]
TYPES = ("query", "order", "check")
MAX_UNITS = 3
CHECK_ATTEMPTS = 5


class Stats:
    """Latencies and outcomes per request type, shared by the client threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.lat = {t: [] for t in TYPES}
        self.errors = {t: 0 for t in TYPES}
        self.window = {t: [None, None] for t in TYPES}  # first start, last end
        self.refused = 0          # orders refused for stock (400): a normal outcome
        self.reconnects = 0
        self.error_samples: list[str] = []

    def record(self, kind: str, start: float, end: float, ok: bool, note: str = "") -> None:
        with self.lock:
            if ok:
                self.lat[kind].append(end - start)
            else:
                self.errors[kind] += 1
                if len(self.error_samples) < 20:
                    self.error_samples.append(f"{kind}: {note}")
            w = self.window[kind]
            w[0] = start if w[0] is None else min(w[0], start)
            w[1] = end if w[1] is None else max(w[1], end)

    def counts(self) -> dict:
        with self.lock:
            return {t: len(self.lat[t]) + self.errors[t] for t in TYPES} | {"errors": sum(self.errors.values())}


class Connection:
    """One keep-alive connection; reopened only when the server closed it."""

    def __init__(self, url: str, timeout: float, stats: Stats):
        u = urlsplit(url)
        if u.scheme not in ("http", "") or not u.hostname:
            raise ValueError(f"--url must be http://host:port, got {url!r}")
        self.host, self.port, self.prefix = u.hostname, u.port or 80, u.path.rstrip("/")
        self.timeout, self.stats = timeout, stats
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: dict | None = None, headers: dict | None = None):
        """(status, parsed JSON or None, lower-cased headers). A GET is retried
        once on a fresh connection if the kept-alive one turned out closed; a
        POST never is (it may have been applied)."""
        data = json.dumps(body).encode() if body is not None else None
        h = {"Content-Type": "application/json"} if data is not None else {}
        h.update(headers or {})
        attempts = 2 if method == "GET" else 1
        for attempt in range(attempts):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request(method, self.prefix + path, body=data, headers=h)
                resp = self.conn.getresponse()
                raw = resp.read()
                if resp.will_close:
                    self.close()
                try:
                    parsed = json.loads(raw) if raw else None
                except ValueError:
                    parsed = None
                return resp.status, parsed, {k.lower(): v for k, v in resp.getheaders()}
            except (http.client.HTTPException, OSError):
                self.close()
                with self.stats.lock:
                    self.stats.reconnects += 1
                if attempt + 1 == attempts:
                    raise

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class SimClient(threading.Thread):
    def __init__(self, idx: int, url: str, p: float, toys: list[str], stats: Stats, *, stop_at: float | None,
                 iterations: int | None, seed: int | None, timeout: float, stop: threading.Event,
                 orders_url: str | None = None):
        super().__init__(name=f"toystore-client-{idx}", daemon=True)
        self.idx, self.p, self.toys, self.stats = idx, p, toys, stats
        self.stop_at, self.iterations, self.stop = stop_at, iterations, stop
        self.rng = random.Random(None if seed is None else seed * 1000 + idx)
        self.http = Connection(url, timeout, stats)
        # Only for a run against the services themselves, without the gateway:
        # orders then go over a second connection, to the order service.
        self.http_orders = Connection(orders_url, timeout, stats) if orders_url and orders_url != url else self.http
        self.placed: list[dict] = []      # {"number", "name", "quantity"} as the service confirmed
        self.mismatches: list[dict] = []
        self.max_lsn = 0

    def _timed(self, kind: str, method: str, path: str, body=None, headers=None, ok_status=(200,)):
        conn = self.http if kind == "query" else self.http_orders
        start = time.monotonic()
        try:
            status, data, hdrs = conn.request(method, path, body, headers)
        except Exception as exc:  # connection refused, reset, timeout
            self.stats.record(kind, start, time.monotonic(), False, f"{type(exc).__name__}: {exc}")
            return None, None, {}
        end = time.monotonic()
        self.stats.record(kind, start, end, status in ok_status, f"HTTP {status} {data}")
        lsn = hdrs.get("x-stratus-lsn", "")
        if lsn.isdigit():
            self.max_lsn = max(self.max_lsn, int(lsn))
        return status, data, hdrs

    def run(self) -> None:
        try:
            done = 0
            while not self.stop.is_set():
                if self.iterations is not None and done >= self.iterations:
                    break
                if self.stop_at is not None and time.monotonic() >= self.stop_at:
                    break
                done += 1
                self.step()
            self.check_all()
        finally:
            self.http.close()
            self.http_orders.close()

    def step(self) -> None:
        toy = self.rng.choice(self.toys)
        status, data, _ = self._timed("query", "GET", f"/products/{quote(toy, safe='')}")
        if status != 200:
            return
        try:
            have = int(data["data"]["quantity"])
        except (TypeError, KeyError, ValueError):
            self.stats.record("query", time.monotonic(), time.monotonic(), False, f"bad body {data!r:.80}")
            return
        if have <= 0 or self.rng.random() >= self.p:
            return
        units = self.rng.randint(1, min(MAX_UNITS, have))
        status, data, _ = self._timed("order", "POST", "/orders", {"name": toy, "quantity": units},
                                      ok_status=(200, 400))
        if status == 200:
            try:
                number = data["data"]["order_number"]
            except (TypeError, KeyError):
                self.mismatches.append({"order": None, "why": f"200 without an order number: {data!r:.80}"})
                return
            self.placed.append({"number": number, "name": toy, "quantity": units})
        elif status == 400:
            with self.stats.lock:
                self.stats.refused += 1  # sold out meanwhile: nothing was sold

    def check_all(self) -> None:
        headers = {"X-Stratus-Min-LSN": str(self.max_lsn)} if self.max_lsn else {}
        for o in self.placed:
            got = None
            for attempt in range(CHECK_ATTEMPTS):
                status, data, _ = self._timed("check", "GET", f"/orders/{o['number']}", headers=headers)
                if status in (200, 404):
                    got = (status, data)
                    break
                time.sleep(0.2 * (attempt + 1))
            if got is None:
                self.mismatches.append({"order": o, "why": "could not be fetched"})
            elif got[0] == 404:
                self.mismatches.append({"order": o, "why": "not found (404)"})
            elif (got[1] or {}).get("data") != o:
                self.mismatches.append({"order": o, "why": f"service has {(got[1] or {}).get('data')}"})


def run(url: str, *, clients: int = 5, p: float = 0.5, duration: float | None = None,
        requests: int | None = None, seed: int | None = None, toys: list[str] | None = None,
        timeout: float = 30.0, progress: bool = True, out=sys.stderr, orders_url: str | None = None) -> dict:
    """Run the load; returns the summary (what --json writes)."""
    if duration is None and requests is None:
        duration = 10.0
    stats, stop = Stats(), threading.Event()
    t0 = time.monotonic()
    stop_at = t0 + duration if duration is not None else None
    sims = [SimClient(i, url, p, list(toys or DEFAULT_TOYS), stats, stop_at=stop_at, iterations=requests,
                      seed=seed, timeout=timeout, stop=stop, orders_url=orders_url) for i in range(clients)]
    for s in sims:
        s.start()
    tty = progress and hasattr(out, "isatty") and out.isatty()
    last_line = 0.0
    try:
        while alive := [s for s in sims if s.is_alive()]:
            alive[0].join(0.2)
            now = time.monotonic()
            if progress and now - last_line >= (1.0 if tty else 2.0):
                c = stats.counts()
                line = (f"[{now - t0:6.1f}s] queries {c['query']}  orders {c['order']}  "
                        f"checks {c['check']}  errors {c['errors']}")
                print(line, end="\r" if tty else "\n", file=out, flush=True)
                last_line = now
    except KeyboardInterrupt:
        stop.set()
        for s in sims:
            s.join(timeout + 5)
    elapsed = time.monotonic() - t0
    if tty:
        print(file=out)
    return summarize(url, clients, p, elapsed, stats, sims)


def summarize(url, clients, p, elapsed, stats: Stats, sims: list[SimClient]) -> dict:
    types = {}
    for t in TYPES:
        lat = sorted(stats.lat[t])
        w0, w1 = stats.window[t]
        span = (w1 - w0) if w0 is not None and w1 is not None and w1 > w0 else 0.0
        types[t] = {
            "count": len(lat) + stats.errors[t], "ok": len(lat), "errors": stats.errors[t],
            "p50_ms": _ms(percentile(lat, 50)), "p95_ms": _ms(percentile(lat, 95)), "p99_ms": _ms(percentile(lat, 99)),
            "mean_ms": _ms(sum(lat) / len(lat)) if lat else None,
            "rps": round(len(lat) / span, 1) if span else 0.0,
        }
    orders = [o for s in sims for o in s.placed]
    mismatches = [m for s in sims for m in s.mismatches]
    return {"url": url, "clients": clients, "p": p, "elapsed_s": round(elapsed, 2), "types": types,
            "orders_placed": len(orders), "orders_refused": stats.refused, "reconnects": stats.reconnects,
            "orders": orders, "mismatches": mismatches, "error_samples": stats.error_samples}


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 2)


def format_table(summary: dict) -> str:
    def cell(v):
        return "-" if v is None else f"{v:.1f}"
    lines = [f"toy store load: {summary['clients']} clients, p={summary['p']}, {summary['elapsed_s']}s "
             f"against {summary['url']}",
             f"{'type':<7}{'count':>8}{'errors':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'req/s':>9}"]
    for t in TYPES:
        r = summary["types"][t]
        lines.append(f"{t:<7}{r['count']:>8}{r['errors']:>8}{cell(r['p50_ms']):>9}{cell(r['p95_ms']):>9}"
                     f"{cell(r['p99_ms']):>9}{r['rps']:>9.1f}")
    lines.append(f"orders placed {summary['orders_placed']}, refused for stock {summary['orders_refused']}, "
                 f"checked {summary['types']['check']['ok']}, mismatches {len(summary['mismatches'])}")
    for m in summary["mismatches"][:20]:
        lines.append(f"  MISMATCH {m['order']}: {m['why']}")
    if summary["error_samples"]:
        lines.append("first errors:")
        lines += [f"  {e[:160]}" for e in summary["error_samples"][:5]]
    return "\n".join(lines)


def parse_args(args: list[str]) -> argparse.Namespace:
    from bus.settings import load
    ap = argparse.ArgumentParser(prog="stratus load toystore", description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="the gateway (default: settings.gateway_base_url())")
    ap.add_argument("--clients", type=int, default=5, help="simulated clients, one connection each (5)")
    ap.add_argument("--p", type=float, default=0.5, help="probability of ordering a toy in stock (0.5)")
    ap.add_argument("--duration", type=float, default=None, help="seconds to run (10 when --requests is unset)")
    ap.add_argument("--requests", type=int, default=None, help="queries per client (bounded run)")
    ap.add_argument("--seed", type=int, default=None, help="random seed, for a repeatable run")
    ap.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout per request, seconds (30)")
    ap.add_argument("--toys", default=None, help="comma-separated toy names (default: the shipped catalog)")
    ap.add_argument("--orders-url", default=None,
                    help="send /orders here instead of --url (only to test without the gateway)")
    ap.add_argument("--json", dest="json_path", default=None, help="also write the summary as JSON to this file")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    ns = ap.parse_args(args)
    if ns.clients < 1:
        ap.error("--clients must be at least 1")
    if not 0.0 <= ns.p <= 1.0:
        ap.error("--p must be between 0 and 1")
    if ns.duration is not None and ns.duration <= 0:
        ap.error("--duration must be positive")
    if ns.requests is not None and ns.requests < 1:
        ap.error("--requests must be at least 1")
    ns.url = (ns.url or load().gateway_base_url()).rstrip("/")
    ns.toys = [t for t in (ns.toys.split(",") if ns.toys else DEFAULT_TOYS) if t]
    return ns


def main(args: list[str]) -> int:
    try:
        ns = parse_args(list(args))
    except SystemExit as exc:  # argparse: --help is 0, errors are 2
        return int(exc.code or 0)
    summary = run(ns.url, clients=ns.clients, p=ns.p, duration=ns.duration, requests=ns.requests, seed=ns.seed,
                  toys=ns.toys, timeout=ns.timeout, progress=not ns.quiet, orders_url=ns.orders_url)
    print(format_table(summary), flush=True)
    if ns.json_path:
        with open(ns.json_path, "w") as f:
            json.dump(summary, f, indent=1)
    if summary["mismatches"]:
        return 1
    if summary["types"]["query"]["ok"] == 0:
        print("no query succeeded: is the toy store reachable at " + ns.url + "?", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
