"""A small real HTTP service for tests and benchmarks of the gateway: the
standard library's threading HTTP server, registered in the ZooKeeper
service registry under any service name, exactly as tenant services are.

    python tests/kits/trivial_upstream.py --service rides [--port 0] [--bus]

Routes (every answer is JSON and names the instance that gave it):
  GET  /health                 200 {"status": "ok"}  (503 after POST /_sick)
  POST /_sick, POST /_well     fail / pass the health check from now on
  GET  /_stats                 {"instance", "requests": N, "seen": [last request ids]}
  any  /_drop                  counts the request, then closes without answering
  any  /_sleep?s=SECONDS       answers after sleeping
  any  path?lsn=N              also answers X-Stratus-LSN: N (a stand-in for a write)
  GET  /products/{name}        {"data": {"name", "price", "quantity", "instance"}}, 404 for "missing"
  any  other path              200 {"instance", "method", "path", "headers"}
With --bus, a key-value store through the Stratus bus (read-your-writes):
  PUT  /kv/{key}   body {"v": ...}  201, X-Stratus-LSN: the write's LSN
  GET  /kv/{key}                    200 {"v": ...} or 404; honours X-Stratus-Min-LSN
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from bus import registry, zk as bzk
from bus.settings import load


class State:
    def __init__(self, name: str):
        self.name = name
        self.requests = 0
        self.sick = False
        self.seen: list[str] = []
        self.product_reads = 0
        self.lock = threading.Lock()
        self.db = None


def _query(target: str) -> dict:
    from urllib.parse import parse_qsl
    return dict(parse_qsl(target.partition("?")[2]))


def make_handler(state: State):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "trivial-upstream"
        disable_nagle_algorithm = True  # headers and body go out in two writes

        def log_message(self, fmt, *args):  # quiet: the gateway logs requests
            pass

        def _send(self, status: int, obj, headers: dict | None = None) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _count(self) -> None:
            if self.path.startswith(("/health", "/_stats")):
                return
            with state.lock:
                state.requests += 1
                state.seen.append(self.headers.get("X-Request-Id", ""))
                del state.seen[:-50]

        def _route(self) -> None:
            body = self._body()
            self._count()
            path = self.path.split("?", 1)[0]
            m = self.command
            if path == "/health":
                return self._send(503 if state.sick else 200, {"status": "sick" if state.sick else "ok"})
            if path in ("/_sick", "/_well") and m == "POST":
                state.sick = path == "/_sick"
                return self._send(200, {})
            if path.endswith("/_drop"):
                self.close_connection = True
                return
            if path.endswith("/_sleep"):
                time.sleep(float(_query(self.path).get("s", "1")))
            if path == "/_stats":
                with state.lock:
                    return self._send(200, {"instance": state.name, "requests": state.requests,
                                            "product_reads": state.product_reads, "seen": list(state.seen)})
            if path.startswith("/products/") and m == "GET":
                name = path.split("/")[2]
                if name == "missing":
                    return self._send(404, {"error": {"code": 404, "message": "product not found"}})
                with state.lock:
                    state.product_reads += 1
                    n = state.product_reads
                return self._send(200, {"data": {"name": name, "price": 15.99, "quantity": 100,
                                                 "instance": state.name, "read": n}},
                                  {"X-Seen-Min-LSN": self.headers.get("X-Stratus-Min-LSN", "")})
            if path.startswith("/kv/") and state.db is not None:
                return self._kv(m, path.split("/", 2)[2], body)
            extra = {"X-Stratus-LSN": _query(self.path)["lsn"]} if "lsn" in _query(self.path) else None
            return self._send(200, {"instance": state.name, "method": m, "path": self.path,
                                    "headers": dict(self.headers.items()), "body": body.decode("utf-8", "replace")},
                              extra)

        def _kv(self, method: str, key: str, body: bytes) -> None:
            from bus import ops
            from bus.errors import DBError
            try:
                if method == "PUT":
                    v = json.loads(body or b"{}").get("v")
                    w = state.db.write([ops.upsert("kv", {"k": key, "v": json.dumps(v)})])
                    return self._send(201, {}, {"X-Stratus-LSN": str(w.lsn)})
                if method == "GET":
                    raw = self.headers.get("X-Stratus-Min-LSN")
                    r = state.db.read(ops.select("kv", [ops.eq("k", key)]), min_lsn=int(raw) if raw else None)
                    if not r.result:
                        return self._send(404, {"error": "no such key"})
                    return self._send(200, {"v": json.loads(r.result[0]["v"]), "worker": r.worker},
                                      {"X-Stratus-LSN": str(r.lsn)})
            except DBError as exc:
                return self._send(exc.status, {"error": exc.message})
            return self._send(405, {"error": "method not allowed"})

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _route

    return Handler


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="trivial_upstream.py")
    ap.add_argument("--service", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--bus", action="store_true", help="serve /kv/{key} through the Stratus bus")
    ap.add_argument("--no-register", action="store_true")
    args = ap.parse_args(argv)
    settings = load()
    ThreadingHTTPServer.request_queue_size = 256  # the listen backlog (5 by default)
    server = ThreadingHTTPServer((settings.bind_host, args.port), None)
    server.daemon_threads = True
    port = server.server_address[1]
    state = State(f"{args.service}@{port}")
    server.RequestHandlerClass = make_handler(state)
    if args.bus:
        from bus import ops
        from bus.client import DBClient
        state.db = DBClient(settings, name="trivial-upstream")
        try:
            state.db.create_table("kv", [ops.column("k", "text", nullable=False), ops.column("v", "text")], ["k"])
        except Exception as exc:  # already there
            print(f"kv table: {exc}", file=sys.stderr)
    zk = reg = None
    if not args.no_register:
        zk = bzk.connect(settings, timeout=max(settings.zk_timeout, 1.0))
        reg = registry.register(zk, settings, args.service, port)
    print(f"{args.service} listening on http://{settings.bind_host}:{port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    if reg:
        reg.close()
    if zk:
        zk.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
