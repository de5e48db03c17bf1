"""The example tenant app's web role, written against paas.md only: it
serves HTTP on $PORT, answers its health path, and hands tasks to its
worker role `jobs` through the platform's bus kit.

    GET  /health              200 {"ok": true}, or 503 once /shop/sick was posted
    GET  /shop                {"instance", "greeting", "app"}
    GET  /shop/slow?s=N       answers after N seconds (at most 10)
    POST /shop/sick           this instance's health starts failing
    POST /shop/tasks          body: a JSON object, handed to `jobs` -> 202 {"task": id}
SIGTERM: stop taking connections, finish the requests in flight, exit 0."""
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

SICK = threading.Event()
QUEUE = {}


def tasks():
    if "q" not in QUEUE:
        from bus.tasks import TaskQueue
        QUEUE["q"] = TaskQueue(None, None, os.environ["STRATUS_APP"], "jobs")
    return QUEUE["q"]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):
        rid = self.headers.get("X-Request-Id", "-") if self.headers else "-"
        sys.stderr.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} shop.web [{rid}] {fmt % args}\n")

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/health":
            return self._send(503, {"ok": False}) if SICK.is_set() else self._send(200, {"ok": True})
        if url.path == "/shop":
            return self._send(200, {"instance": os.environ.get("STRATUS_INSTANCE"),
                                    "greeting": os.environ.get("GREETING"), "app": os.environ.get("STRATUS_APP")})
        if url.path == "/shop/slow":
            s = min(10.0, float(parse_qs(url.query).get("s", ["1"])[0]))
            time.sleep(s)
            return self._send(200, {"instance": os.environ.get("STRATUS_INSTANCE"), "slept": s})
        self._send(404, {"error": "not found"})

    def do_POST(self):
        url = urlparse(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if url.path == "/shop/sick":
            SICK.set()
            return self._send(200, {"sick": True})
        if url.path == "/shop/tasks":
            try:
                payload = json.loads(raw or b"{}")
            except ValueError:
                return self._send(400, {"error": "body is not JSON"})
            if not isinstance(payload, dict):
                return self._send(400, {"error": "body must be a JSON object"})
            try:
                task = tasks().submit(payload)
            except Exception as exc:
                return self._send(503, {"error": f"task not taken: {exc}"})
            return self._send(202, {"task": task})
        self._send(404, {"error": "not found"})


def main():
    # PORT from the platform; the address too (loopback on the process
    # runtime, every interface in a container), all interfaces without it.
    server = ThreadingHTTPServer((os.environ.get("STRATUS_BIND_HOST", "0.0.0.0"), int(os.environ["PORT"])), Handler)
    server.daemon_threads = False       # server_close() waits for requests in flight
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"shop.web {os.environ.get('STRATUS_INSTANCE')} listening on {os.environ['PORT']}", flush=True)
    stop.wait()
    server.shutdown()
    server.server_close()
    print("shop.web stopped", flush=True)


if __name__ == "__main__":
    main()
