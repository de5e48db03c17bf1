"""The HTTP/1.1 server on the standard library: one accept thread, a
bounded pool of connection threads, and a bounded queue between them.

A connection is served from start to end by one pool thread (keep-alive,
pipelining). When every thread is busy, new connections wait in the queue;
when the queue is full too, the connection is answered 503 at once and
closed. Slow or idle clients are timed out, and an idle keep-alive
connection gives its thread up quickly when others are waiting."""
from __future__ import annotations

import logging
import queue
import socket
import threading
import time

from .app import ClientConn, Gateway
from .config import GatewayConfig
from .http11 import RECV_SLICE, ClientGone, HttpError, Reader, error_response, render

log = logging.getLogger("stratus.gateway.server")

# How often an idle keep-alive connection looks at the queue: a blocked read
# returns no sooner than the Reader's kernel receive timeout.
IDLE_SLICE = RECV_SLICE
IDLE_GRACE = 0.5       # idle time a connection keeps its thread while others wait


def _linger_close(sock: socket.socket) -> None:
    """Close after an error answer without resetting the connection under
    the client's feet: stop sending, drain what it already sent, close."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(0.2)
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                break
    except OSError:
        pass
    finally:
        try:
            sock.close()
        except OSError:
            pass


class Server:
    def __init__(self, gateway: Gateway, cfg: GatewayConfig, host: str | None = None, port: int | None = None):
        self.gateway = gateway
        self.cfg = cfg
        host = cfg.base.bind_host if host is None else host
        port = cfg.listen_port if port is None else port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, port), family=family, backlog=1024,
                                         dualstack_ipv6=family == socket.AF_INET6 and socket.has_dualstack_ipv6())
        self.address = self.sock.getsockname()[:2]
        # Connections admitted = being served + waiting; at most threads + queue.
        self.queue: queue.Queue = queue.Queue()
        self._queue_cap = max(0, cfg.queue)
        self._capacity = max(1, cfg.threads) + self._queue_cap
        self._admitted = 0
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._stop = threading.Event()
        self._lingering = threading.BoundedSemaphore(32)
        self._threads: list[threading.Thread] = []
        gateway.server = self
        m = gateway.metrics
        m.gauge("stratus_gateway_threads", "Connection threads: total and busy.",
                lambda: [({"state": "total"}, self.cfg.threads), ({"state": "busy"}, self._busy)])
        m.gauge("stratus_gateway_queue", "Connections waiting for a thread, and the cap.",
                lambda: [({"state": "waiting"}, self.queue.qsize()), ({"state": "capacity"}, self._queue_cap)])

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        for i in range(max(1, self.cfg.threads)):
            t = threading.Thread(target=self._worker, name=f"conn-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._accept_loop, name="accept", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self, drain: float = 5.0) -> None:
        """Stop accepting; let requests in progress finish (idle keep-alive
        connections close within a quarter second), for at most `drain` s."""
        self._stop.set()
        try:
            self.sock.close()
        except OSError:
            pass
        deadline = time.monotonic() + drain
        while time.monotonic() < deadline:
            with self._busy_lock:
                if self._busy == 0:
                    break
            time.sleep(0.05)
        for _ in range(len(self._threads)):
            self.queue.put_nowait(None)

    # -- accepting ----------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, addr = self.sock.accept()
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.01)
                continue
            self.gateway.metrics.connection()
            with self._busy_lock:
                admit = self._admitted < self._capacity
                if admit:
                    self._admitted += 1
            if admit:
                self.queue.put_nowait((sock, addr, time.monotonic()))
            else:
                self._reject(sock, addr)

    def _reject(self, sock: socket.socket, addr) -> None:
        self.gateway.metrics.rejected()
        log.warning("%s:%d refused: all %d threads busy and %d connections queued", addr[0], addr[1],
                    self.cfg.threads, self.queue.qsize())
        try:
            sock.settimeout(0.5)
            sock.sendall(error_response(503, "gateway overloaded: try again shortly"))
        except OSError:
            pass
        # Drain and close off the accept thread, with a bounded number of
        # helpers; past that, close at once.
        if self._lingering.acquire(blocking=False):
            def run():
                try:
                    _linger_close(sock)
                finally:
                    self._lingering.release()
            threading.Thread(target=run, daemon=True).start()
        else:
            try:
                sock.close()
            except OSError:
                pass

    # -- serving a connection -----------------------------------------------------
    def _worker(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            sock, addr, queued_at = item
            with self._busy_lock:
                self._busy += 1
            try:
                self._serve(sock, addr)
            except Exception:
                log.exception("connection from %s failed", addr)
                try:
                    sock.close()
                except OSError:
                    pass
            finally:
                with self._busy_lock:
                    self._busy -= 1
                    self._admitted -= 1

    def _wait_next(self, reader: Reader, first: bool) -> bool:
        """True when the next request has started to arrive; False when the
        connection should end (idle too long, or others need the thread)."""
        if first:
            return reader.wait_readable(self.cfg.read_timeout)
        idle_since = time.monotonic()
        deadline = idle_since + self.cfg.idle_timeout
        while True:
            now = time.monotonic()
            if now >= deadline:
                return False
            if not self.queue.empty() and now - idle_since >= IDLE_GRACE:
                return False
            if reader.wait_readable(min(IDLE_SLICE, deadline - now)):
                return True
            if self._stop.is_set():
                return False

    def _serve(self, sock: socket.socket, addr) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ip, port = addr[0], addr[1]
        conn = ClientConn(ip=ip, port=port, base_lsn=self.gateway.lsns.get(f"a:{ip}"))
        reader = Reader(sock, max_header_bytes=self.cfg.max_header_bytes, max_body_bytes=self.cfg.max_body_bytes,
                        read_timeout=self.cfg.read_timeout)

        def send_continue() -> None:
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

        first = True
        try:
            while not self._stop.is_set():
                if not self._wait_next(reader, first):
                    break
                first = False
                try:
                    req = reader.read_request(send_continue)
                except HttpError as exc:
                    self.gateway.metrics.bad_request(exc.status)
                    log.info("%s:%d refused: %d %s", ip, port, exc.status, exc.message)
                    sock.settimeout(2.0)
                    sock.sendall(error_response(exc.status, exc.message))
                    _linger_close(sock)
                    return
                ans, _rid = self.gateway.handle(req, conn)
                keep = req.keep_alive and not ans.close and not self._stop.is_set()
                data = render(ans.status, ans.headers, ans.body, keep_alive=keep, head_only=req.method == "HEAD")
                sock.sendall(data)  # bounded by the kernel send timeout the Reader set
                if not keep:
                    break
        except (ClientGone, OSError):
            pass
        try:
            sock.close()
        except OSError:
            pass
