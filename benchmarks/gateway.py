"""Gateway overhead: the same read load sent straight to a service and
through the gateway, both with keep-alive and 16 clients; then the
gateway's throughput proxying to a trivial upstream.

The 16 clients run twice: closed loop (each sends its next request as soon
as it has an answer), which saturates the 2 cores, so that latency there
measures the throughput the gateway's CPU takes from the service rather
than its cost per request; then paced, the same offered load (half of what
the service sustains directly) both ways, which measures the added latency.

A real local cluster (a master and one slave), the real users service
(GET /api/v1/users: a read through the bus), a trivial registered upstream
(gateway/trivial_upstream.py) and a gateway process, all on loopback. The
load runs in 4 processes x 4 threads with a lean keep-alive client, so the
load generator is not the bottleneck it would be in one Python process.

    .venv/bin/python benchmarks/gateway.py [--seconds 5] [--clients 16] [--json out.json]

Bounded: 10 runs of up to `seconds` each, plus ~20 s of start-up."""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import ROOT, machine, pct, record

sys.path.insert(0, str(ROOT))

from gateway.testkit import Client, free_port, start_gateway, start_upstream, wait_healthy, wait_until  # noqa: E402
from harness import LocalCluster  # noqa: E402


def _one_client(port: int, path: str, deadline: float, max_requests: int, out: list,
                interval: float = 0.0, offset: float = 0.0) -> None:
    """Closed loop (interval 0: the next request as soon as the answer is in),
    or paced: one request every `interval` seconds, starting at `offset`."""
    req = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b""
    lat, errors = [], 0
    n = 0
    due = time.monotonic() + offset
    while n < max_requests and time.monotonic() < deadline:
        if interval:
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            due += interval
        t0 = time.perf_counter()
        s.sendall(req)
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
        while len(buf) < length:
            buf += s.recv(65536)
        buf = buf[length:]
        lat.append(time.perf_counter() - t0)
        if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.1 204", b"HTTP/1.0 200")):
            errors += 1
        n += 1
    s.close()
    out.append((lat, errors))


def _proc(port, path, threads, deadline, max_requests, q, interval=0.0, first=0, clients=1):
    out: list = []
    ts = [threading.Thread(target=_one_client, args=(port, path, deadline, max_requests, out, interval,
                                                     interval * (first + i) / clients)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    lat = [x for l, _ in out for x in l]
    q.put((lat, sum(e for _, e in out)))


def load(port: int, path: str, *, clients: int, seconds: float, max_requests: int = 200_000,
         rate: float = 0.0) -> dict:
    """`clients` keep-alive clients for `seconds`: closed loop, or paced to
    `rate` requests/s in all (spread evenly over the clients and in time)."""
    procs_n = 4 if clients % 4 == 0 else 1
    per = clients // procs_n
    interval = clients / rate if rate else 0.0
    q: mp.Queue = mp.Queue()
    start = time.monotonic()
    deadline = start + seconds
    procs = [mp.Process(target=_proc, args=(port, path, per, deadline, max_requests // clients, q,
                                            interval, k * per, clients))
             for k in range(procs_n)]
    for p in procs:
        p.start()
    results = [q.get(timeout=seconds + 60) for _ in procs]
    for p in procs:
        p.join(10)
    elapsed = time.monotonic() - start
    lat = sorted(x for l, _ in results for x in l)
    return {"requests": len(lat), "errors": sum(e for _, e in results), "rps": len(lat) / elapsed,
            "p50_ms": pct(lat, 50) * 1000, "p99_ms": pct(lat, 99) * 1000}


def fmt(name: str, r: dict) -> str:
    return (f"{name:<34} p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  {r['rps']:7.0f} req/s  "
            f"({r['requests']} requests, {r['errors']} errors)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--record", action="store_true", help="append the figures to docs/benchmarks.md")
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        cluster = LocalCluster(Path(tmp))
        try:
            cluster.bootstrap(slaves=1)
            users_port = free_port()
            cluster.spawn("users", ["-m", "users"], STRATUS_USERS_PORT=users_port)
            trivial = start_upstream(cluster, "trivial", "rides")
            gw = start_gateway(cluster, STRATUS_GATEWAY_ACCESS_LOG="0", STRATUS_LOG_LEVEL="WARNING")
            wait_healthy(gw, "users", 1, timeout=40)
            wait_healthy(gw, "rides", 1)
            c = Client(users_port)
            wait_until(lambda: c.get("/api/v1/users")[0] in (200, 204), 30, what="users tables")
            for i in range(20):
                c.request("PUT", "/api/v1/users", {"username": f"bench{i}", "password": "a" * 40})
            time.sleep(0.5)
            print(f"machine: {machine()}", flush=True)
            warm = min(1.0, args.seconds / 4)
            plan = [("users service, direct", users_port, "/api/v1/users"),
                    ("users service, through the gateway", gw, "/api/v1/users"),
                    ("trivial upstream, direct", trivial, "/api/v1/rides/1"),
                    ("trivial upstream, through the gateway", gw, "/api/v1/rides/1")]
            for name, port, path in plan:
                load(port, path, clients=args.clients, seconds=warm)
                rows[name] = r = load(port, path, clients=args.clients, seconds=args.seconds)
                print(fmt(name, r), flush=True)
            # The same offered load, paced at half of what the service sustains
            # directly: latency then shows the gateway's cost per request, not
            # the CPU it takes from a saturated 2-core machine (closed loop above).
            paced = round(rows["users service, direct"]["rps"] / 2, -1)
            for name, port, path in plan[:2]:
                key = f"{name}, paced at {paced:.0f} req/s"
                load(port, path, clients=args.clients, seconds=warm, rate=paced)
                rows[key] = r = load(port, path, clients=args.clients, seconds=args.seconds, rate=paced)
                print(fmt(key, r), flush=True)
            # One client: the gateway's own added latency, without queueing for the CPU.
            for name, port, path in plan:
                key = name + ", 1 client"
                rows[key] = r = load(port, path, clients=1, seconds=min(args.seconds, 3.0))
                print(fmt(key, r), flush=True)
        finally:
            cluster.close()
    d, g = rows["users service, direct"], rows["users service, through the gateway"]
    td, tg = rows["trivial upstream, direct"], rows["trivial upstream, through the gateway"]
    d1, g1 = rows["users service, direct, 1 client"], rows["users service, through the gateway, 1 client"]
    td1, tg1 = rows["trivial upstream, direct, 1 client"], rows["trivial upstream, through the gateway, 1 client"]
    pd, pg = (r for k, r in rows.items() if ", paced at " in k)
    summary = (f"gateway overhead, {args.clients} clients, closed loop (CPU saturated): users read p50 "
               f"{g['p50_ms'] - d['p50_ms']:+.2f} ms, "
               f"p99 {g['p99_ms'] - d['p99_ms']:+.2f} ms; trivial upstream p50 {tg['p50_ms'] - td['p50_ms']:+.2f} ms, "
               f"{tg['rps']:.0f} req/s proxied\n"
               f"gateway overhead, {args.clients} clients paced at {pd['rps']:.0f} req/s: users read p50 "
               f"{pg['p50_ms'] - pd['p50_ms']:+.2f} ms, p99 {pg['p99_ms'] - pd['p99_ms']:+.2f} ms\n"
               f"gateway overhead, 1 client: users read p50 {g1['p50_ms'] - d1['p50_ms']:+.2f} ms; "
               f"trivial upstream p50 {tg1['p50_ms'] - td1['p50_ms']:+.2f} ms")
    print(summary, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.record:
        lines = ["| run | p50 | p99 | req/s | requests | errors |", "|---|---|---|---|---|---|"]
        lines += [f"| {k} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | {r['rps']:.0f} | {r['requests']} | "
                  f"{r['errors']} |" for k, r in rows.items()]
        record("Gateway overhead",
               f"`python benchmarks/gateway.py --seconds {args.seconds:g} --clients {args.clients}`\n\n"
               + "\n".join(lines) + "\n\n" + summary.replace("\n", "; ") + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
