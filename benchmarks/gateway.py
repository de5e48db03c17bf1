"""Gateway overhead: the same read load sent straight to a service and
through the gateway, both with keep-alive and 16 clients; then the
gateway's throughput proxying to a trivial upstream.

The 16 clients run closed loop first (each sends its next request as soon
as it has an answer). That saturates the 2 cores, so latency there measures
the throughput a proxy's CPU takes from the service, not its cost per
request. Then paced: the same offered load each way, at 25%, 50% and 75%
of what the service sustains directly, in alternating rounds; that
measures the latency a proxy hop adds. Last, one client.

When haproxy is installed (`make bench` installs it), the same users runs
also go through a one-thread HAProxy with keep-alive both ways: a
reference for what any proxy hop costs on the same machine.

A real local cluster (a master and one slave), the real users service
(GET /api/v1/users: a read through the bus), a trivial registered upstream
(tests/kits/trivial_upstream.py) and a gateway process, all on loopback. The
load runs in 4 processes x 4 threads with a lean keep-alive client, so the
load generator is not the bottleneck it would be in one Python process.

    .venv/bin/python benchmarks/gateway.py [--seconds 5] [--clients 16] [--rounds 3] [--json out.json] [--record]

Bounded: about 40 runs of up to `seconds` each, plus ~20 s of start-up
(about 5 minutes with the defaults)."""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import ROOT, machine, pct, record

sys.path.insert(0, str(ROOT))

from kits.testkit import Client, free_port, start_gateway, start_upstream, wait_healthy, wait_until  # noqa: E402
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
            "p50_ms": pct(lat, 50) * 1000, "p99_ms": pct(lat, 99) * 1000, "lat": lat}


def pooled(runs: list[dict]) -> dict:
    """Several runs of one kind as one sample."""
    lat = sorted(x for r in runs for x in r["lat"])
    secs = sum(r["requests"] / r["rps"] for r in runs if r["rps"])
    return {"requests": len(lat), "errors": sum(r["errors"] for r in runs), "rps": len(lat) / secs if secs else 0.0,
            "p50_ms": pct(lat, 50) * 1000, "p99_ms": pct(lat, 99) * 1000, "lat": lat,
            "round_p50_ms": [round(r["p50_ms"], 2) for r in runs]}


def fmt(name: str, r: dict) -> str:
    return (f"{name:<34} p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  {r['rps']:7.0f} req/s  "
            f"({r['requests']} requests, {r['errors']} errors)")


HAPROXY_CFG = """global
    maxconn 4096
    nbthread 1
defaults
    mode http
    timeout connect 3s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
frontend bench
    bind 127.0.0.1:{port}
    default_backend users
backend users
    http-reuse always
    server users1 127.0.0.1:{upstream}
"""


def start_haproxy(tmp: str, upstream: int):
    """HAProxy, one thread, keep-alive both ways, in front of the users service:
    a reference for what any proxy hop costs on this machine. None when
    haproxy is not installed (`make bench` installs it)."""
    exe = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if exe is None:
        return None, None
    port = free_port()
    cfg = Path(tmp) / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(port=port, upstream=upstream))
    proc = subprocess.Popen([exe, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: Client(port, timeout=2).get("/health")[0] == 200, 10, what="haproxy to listen")
    return proc, port


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--paced", type=float, nargs="*", default=[0.25, 0.5, 0.75],
                    help="paced runs at these fractions of the direct closed-loop throughput")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per paced rate")
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--record", action="store_true", help="append the figures to docs/benchmarks.md")
    args = ap.parse_args()
    rows: dict[str, dict] = {}
    cpu_us: dict[str, float] = {}     # CPU per request of the proxy process, by run
    paced: dict[float, str] = {}      # fraction of the direct throughput -> its rows' key suffix
    haproxy = None
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
            haproxy, hp_port = start_haproxy(tmp, users_port)
            time.sleep(0.5)
            print(f"machine: {machine()}", flush=True)
            if haproxy is None:
                print("haproxy is not installed: no reference proxy rows", flush=True)
            warm = min(1.0, args.seconds / 4)
            proxies = {gw: cluster.procs["gateway"].pid}
            users = [("users service, direct", users_port), ("users service, through the gateway", gw)]
            if haproxy is not None:
                users.append(("users service, through haproxy (reference)", hp_port))
                proxies[hp_port] = haproxy.pid
            plan = [(name, port, "/api/v1/users") for name, port in users] + [
                ("trivial upstream, direct", trivial, "/api/v1/rides/1"),
                ("trivial upstream, through the gateway", gw, "/api/v1/rides/1")]
            for name, port, path in plan:
                load(port, path, clients=args.clients, seconds=warm)
                before = cpu_seconds(proxies[port]) if port in proxies else 0.0
                rows[name] = r = load(port, path, clients=args.clients, seconds=args.seconds)
                extra = ""
                if port in proxies and r["requests"]:
                    cpu_us[name] = (cpu_seconds(proxies[port]) - before) / r["requests"] * 1e6
                    extra = f"  proxy CPU {cpu_us[name]:.0f} us/request"
                print(fmt(name, r) + extra, flush=True)
            # The same offered load each way, paced at fractions of what the
            # service sustains directly: latency then shows what a proxy hop
            # adds to a request, not the CPU it takes from a saturated 2-core
            # machine (the closed loop above). A bus read's latency drifts
            # over seconds, so the ways alternate, round after round, and each
            # way's rounds are pooled.
            direct_rps = rows["users service, direct"]["rps"]
            for frac in args.paced:
                rate = round(direct_rps * frac, -1)
                paced[frac] = suffix = f", paced at {rate:.0f} req/s ({frac:.0%})"
                runs: dict[str, list] = {name: [] for name, _ in users}
                for _ in range(args.rounds):
                    for name, port in users:
                        load(port, "/api/v1/users", clients=args.clients, seconds=warm, rate=rate)
                        runs[name].append(load(port, "/api/v1/users", clients=args.clients, seconds=args.seconds,
                                               rate=rate))
                for name, rs in runs.items():
                    key = name + suffix
                    rows[key] = r = pooled(rs)
                    print(fmt(key, r) + f"  round p50s {r['round_p50_ms']}", flush=True)
            # One client: a proxy's own added latency, without queueing for the CPU.
            for name, port, path in plan:
                key = name + ", 1 client"
                rows[key] = r = load(port, path, clients=1, seconds=min(args.seconds, 3.0))
                print(fmt(key, r), flush=True)
        finally:
            if haproxy is not None:
                haproxy.kill()
                haproxy.wait(10)
            cluster.close()

    def added(way: str, suffix: str = "", upstream: str = "users service") -> str:
        d, g = rows[f"{upstream}, direct{suffix}"], rows[f"{upstream}, {way}{suffix}"]
        return f"p50 {g['p50_ms'] - d['p50_ms']:+.2f} ms, p99 {g['p99_ms'] - d['p99_ms']:+.2f} ms"

    ways = ["through the gateway"] + (["through haproxy (reference)"] if haproxy is not None else [])
    trivial_rps = rows["trivial upstream, through the gateway"]["rps"]
    lines = [f"closed loop, {args.clients} clients (CPU saturated): "
             + "; ".join(f"{w}: users read {added(w)}" for w in ways)
             + f"; trivial upstream through the gateway: {trivial_rps:.0f} req/s, "
             + added("through the gateway", upstream="trivial upstream")]
    for frac, suffix in paced.items():
        lines.append(f"paced, {args.clients} clients at {rows['users service, direct' + suffix]['rps']:.0f} req/s "
                     f"({frac:.0%} of direct): " + "; ".join(f"{w}: users read {added(w, suffix)}" for w in ways))
    lines.append("1 client: " + "; ".join(f"{w}: users read {added(w, ', 1 client')}" for w in ways)
                 + "; trivial upstream through the gateway: "
                 + added("through the gateway", ", 1 client", upstream="trivial upstream"))
    if cpu_us:
        lines.append("proxy CPU per request (utime + stime), closed loop: "
                     + "; ".join(f"{k}: {v:.0f} us" for k, v in cpu_us.items()))
    summary = "\n".join(lines)
    print(summary, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({k: {f: v for f, v in r.items() if f != "lat"} for k, r in rows.items()},
                                              indent=2))
    if args.record:
        table = ["| run | p50 | p99 | req/s | requests | errors |", "|---|---|---|---|---|---|"]
        table += [f"| {k} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | {r['rps']:.0f} | {r['requests']} | "
                  f"{r['errors']} |" for k, r in rows.items()]
        record("Gateway overhead",
               f"`python benchmarks/gateway.py --seconds {args.seconds:g} --clients {args.clients} "
               f"--rounds {args.rounds}`\n\n" + "\n".join(table) + "\n\n"
               + "\n".join(f"- {line}" for line in lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
