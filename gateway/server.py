"""The HTTP/1.1 server on the standard library: one selector thread and a
bounded pool of request threads.

The selector thread owns the listening socket and every connection that is
not being served: new ones, idle keep-alive ones, and ones whose request is
still arriving. It reads their bytes without blocking, and hands a
connection to the pool once a complete request (head and body) has arrived,
so a slow or idle client holds no thread. It also keeps their time limits:
the first request must begin within the read timeout of the connect and an
idle keep-alive connection within the idle timeout (else it is closed
without an answer), and a request must be complete within the read timeout
of its first byte (else 408), however slowly its bytes trickle in.

A pool thread answers the request, then keeps the connection while the
client stays active: it serves requests already buffered (pipelining) and,
unless other requests wait for a thread, waits up to KEEP for the next one,
so a busy keep-alive client does not go through the selector per request. When the connection falls idle, or a
request arrives too slowly, the connection goes back to the selector.

Admission: at most STRATUS_GATEWAY_MAX_CONN_PER_IP open connections from one
client address (loopback included) and STRATUS_GATEWAY_MAX_CONNECTIONS in
all; past either, the connection is answered 429 / 503 at once and closed.
Complete requests wait in a queue of STRATUS_GATEWAY_QUEUE for a thread; when
every thread is busy and the queue is full, the request is answered 503.
Every refusal and bad request gets its JSON answer, then the selector drains
what the client still sends for a moment before closing, so the client reads
the answer rather than a reset."""
from __future__ import annotations

import collections
import logging
import queue
import resource
import selectors
import socket
import threading
import time

from .app import ClientConn, Gateway
from . import router
from .config import GatewayConfig
from .http11 import RECV_SLICE, ClientGone, HttpError, Reader, error_response, render

log = logging.getLogger("stratus.gateway.server")

KEEP = RECV_SLICE      # how long a pool thread waits for a connection's next request before giving it back
TICK = 0.1             # how often the selector looks at the connections' deadlines
LINGER = 0.5           # how long a refused connection is drained before it is closed
MAX_LINGERING = 256    # refused connections drained at once; past that they are closed at once


class Conn:
    """One client connection, in the selector or on a pool thread (never both)."""

    __slots__ = ("sock", "ip", "port", "reader", "client", "counted", "request", "idle_since", "first",
                 "linger_until", "registered", "closed")

    def __init__(self, sock: socket.socket, addr, counted: bool):
        self.sock = sock
        self.ip, self.port = addr[0], addr[1]
        self.counted = counted          # counts towards the open-connection caps
        self.reader: Reader | None = None
        self.client: ClientConn | None = None
        self.request = None             # a complete request, for the pool thread
        self.idle_since = time.monotonic()
        self.first = True               # no request yet: the first must begin within the read timeout
        self.linger_until = 0.0         # > 0: refused, drained until then
        self.registered = False
        self.closed = False


class Server:
    def __init__(self, gateway: Gateway, cfg: GatewayConfig, host: str | None = None, port: int | None = None):
        self.gateway = gateway
        self.cfg = cfg
        host = cfg.base.bind_host if host is None else host
        port = cfg.listen_port if port is None else port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, port), family=family, backlog=1024,
                                         dualstack_ipv6=family == socket.AF_INET6 and socket.has_dualstack_ipv6())
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()[:2]
        self.max_connections = _connection_limit(cfg)
        self.work: queue.Queue = queue.Queue()      # Conns with a complete request, for the pool
        self._queue_cap = max(0, cfg.queue)
        self._capacity = max(1, cfg.threads) + self._queue_cap
        self._inflight = 0      # connections queued for or held by a pool thread
        self._open = 0
        self._per_ip: dict[str, int] = {}
        self._lock = threading.Lock()
        self._sel = selectors.DefaultSelector()
        self._waiting: set[Conn] = set()            # the selector's connections
        self._lingering = 0
        self._handback: collections.deque = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        gateway.server = self
        m = gateway.metrics
        m.gauge("stratus_gateway_threads", "Request threads: total and busy.",
                lambda: [({"state": "total"}, self.cfg.threads),
                         ({"state": "busy"}, max(0, self._inflight - self.work.qsize()))])
        m.gauge("stratus_gateway_queue", "Complete requests waiting for a thread, and the cap.",
                lambda: [({"state": "waiting"}, self.work.qsize()), ({"state": "capacity"}, self._queue_cap)])
        m.gauge("stratus_gateway_open_connections", "Open client connections: all, and those held by the selector.",
                lambda: [({"state": "open"}, self._open), ({"state": "selector"}, len(self._waiting))])

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        for i in range(max(1, self.cfg.threads)):
            t = threading.Thread(target=self._worker, name=f"conn-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._loop, name="selector", daemon=True)
        t.start()
        self._selector_thread = t

    def stop(self, drain: float = 5.0) -> None:
        """Stop accepting and close the waiting connections; let requests in
        progress finish (each answered with Connection: close), for at most
        `drain` s."""
        self._stop.set()
        self._wake()
        self._selector_thread.join(2.0)
        deadline = time.monotonic() + drain
        while time.monotonic() < deadline:
            with self._lock:
                if self._inflight == 0:
                    break
            time.sleep(0.05)
        for _ in self._threads:
            self.work.put_nowait(None)
        while self._handback:
            self._close(self._handback.popleft())

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:  # full: a wake-up is pending anyway
            pass

    # -- the selector thread --------------------------------------------------------------
    def _loop(self) -> None:
        sel = self._sel
        sel.register(self.sock, selectors.EVENT_READ, "listener")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        accepting = True
        next_sweep = time.monotonic() + TICK
        while not self._stop.is_set():
            for key, _ in sel.select(TICK):
                if key.data == "listener":
                    if not self._accept():
                        sel.unregister(self.sock)  # out of file descriptors: pause until the next sweep
                        accepting = False
                elif key.data == "wake":
                    try:
                        self._wake_r.recv(4096)
                    except OSError:
                        pass
                else:
                    self._readable(key.data)
            while self._handback:
                self._adopt(self._handback.popleft())
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + TICK
                self._sweep(now)
                if not accepting:
                    sel.register(self.sock, selectors.EVENT_READ, "listener")
                    accepting = True
        for c in list(self._waiting):
            self._close(c)
        sel.close()
        try:
            self.sock.close()
        except OSError:
            pass

    def _accept(self) -> bool:
        """Accept what is pending. False when out of file descriptors."""
        for _ in range(64):
            try:
                sock, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return False
            self.gateway.metrics.connection()
            ip = addr[0]
            with self._lock:
                n = self._per_ip.get(ip, 0)
                refusal = (f"too many connections from your address (at most {self.cfg.max_conn_per_ip})"
                           if n >= self.cfg.max_conn_per_ip else
                           "gateway overloaded: try again shortly" if self._open >= self.max_connections else None)
                if refusal is None:
                    self._per_ip[ip] = n + 1
                    self._open += 1
            c = Conn(sock, addr, counted=refusal is None)
            if refusal is not None:
                self.gateway.metrics.rejected()
                log.warning("%s:%d refused: %s", ip, addr[1], refusal)
                sock.setblocking(False)
                self._refuse(c, HttpError(429 if n >= self.cfg.max_conn_per_ip else 503, refusal), in_selector=True)
                continue
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                c.reader = Reader(sock, max_header_bytes=self.cfg.max_header_bytes,
                                  max_body_bytes=self.cfg.max_body_bytes, read_timeout=self.cfg.read_timeout,
                                  body_limit=self._body_limit)
                sock.setblocking(False)  # the kernel timeouts stay for when a pool thread serves it
            except OSError:
                self._close(c)
                continue
            c.client = ClientConn(ip=ip, port=addr[1], base_lsn=self.gateway.lsns.get(f"a:{ip}"))
            self._register(c)
        return True

    def _register(self, c: Conn) -> None:
        try:
            self._sel.register(c.sock, selectors.EVENT_READ, c)
        except (OSError, ValueError):
            self._close(c)
            return
        c.registered = True
        self._waiting.add(c)
        if c.linger_until:
            self._lingering += 1

    def _unregister(self, c: Conn) -> None:
        if c.registered:
            c.registered = False
            self._waiting.discard(c)
            if c.linger_until:
                self._lingering -= 1
            try:
                self._sel.unregister(c.sock)
            except (KeyError, ValueError, OSError):
                pass

    def _adopt(self, c: Conn) -> None:
        """A connection given back by a pool thread."""
        if self._stop.is_set() or c.closed:
            self._close(c)
            return
        try:
            c.sock.setblocking(False)
        except OSError:
            self._close(c)
            return
        self._register(c)

    def _readable(self, c: Conn) -> None:
        try:
            data = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(c)
            return
        if c.linger_until:  # refused: drain until the client closes
            if not data:
                self._close(c)
            return
        rb = c.reader.rb
        if not data:
            if rb.started:
                self._refuse(c, rb.closed_error(), in_selector=True)
            else:
                self._close(c)
            return
        rb.feed(data)
        try:
            req = rb.take()
        except HttpError as exc:
            self._refuse(c, exc, in_selector=True)
            return
        if req is None:
            if rb.wants_continue:
                rb.continued = True
                try:
                    c.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                except OSError:
                    pass
            return
        c.request = req
        c.first = False
        self._unregister(c)
        with self._lock:
            admit = self._inflight < self._capacity
            if admit:
                self._inflight += 1
        if admit:
            self.work.put_nowait(c)
        else:
            self.gateway.metrics.rejected()
            log.warning("%s:%d refused: all %d threads busy and %d requests queued", c.ip, c.port,
                        self.cfg.threads, self.work.qsize())
            self._refuse(c, HttpError(503, "gateway overloaded: try again shortly"), in_selector=True)

    def _sweep(self, now: float) -> None:
        """Time limits of the connections the selector holds."""
        cfg = self.cfg
        for c in list(self._waiting):
            if c.linger_until:
                if now >= c.linger_until:
                    self._close(c)
            elif c.reader.rb.started:
                if now >= c.reader.rb.since + cfg.read_timeout:
                    self._refuse(c, c.reader.rb.timeout_error(), in_selector=True)
            elif now >= c.idle_since + (cfg.read_timeout if c.first else cfg.idle_timeout):
                self._close(c)

    # -- refusing and closing (both sides) ------------------------------------------------
    def _body_limit(self, req) -> int:
        """The body limit of one request: an app package upload may be up to
        max_package_bytes (paas.md); everything else max_body_bytes."""
        path = req.target.split("?", 1)[0]
        if req.method == "PUT" and router.is_package_upload(path):
            return self.cfg.max_package_bytes
        if req.method == "POST" and router.is_dashboard_deploy(path):
            return self.cfg.max_package_bytes + 256 * 1024   # the package and its manifest, as a form
        return self.cfg.max_body_bytes

    def _refuse(self, c: Conn, exc: HttpError, *, in_selector: bool) -> None:
        """Answer `exc` and close: stop sending, drain what the client still
        sends (in the selector, for at most LINGER s), then close."""
        if exc.status not in (429, 503):
            self.gateway.metrics.bad_request(exc.status)
            log.info("%s:%d refused: %d %s", c.ip, c.port, exc.status, exc.message)
        try:
            data = error_response(exc.status, exc.message)
            if in_selector:
                c.sock.send(data)  # non-blocking; a short answer fits an empty send buffer
            else:
                c.sock.sendall(data)  # bounded by the kernel send timeout
            c.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(c)
            return
        if self._lingering >= MAX_LINGERING:
            self._close(c)
            return
        c.linger_until = time.monotonic() + LINGER
        if in_selector:
            if c.registered:
                self._lingering += 1
            else:
                self._register(c)
        else:
            self._give_back(c)

    def _give_back(self, c: Conn) -> None:
        """A pool thread hands a connection back to the selector."""
        self._handback.append(c)
        self._wake()

    def _close(self, c: Conn) -> None:
        """Close a connection, once (the selector's, or one a pool thread holds)."""
        if c.closed:
            return
        c.closed = True
        self._unregister(c)
        try:
            c.sock.close()
        except OSError:
            pass
        if c.counted:
            with self._lock:
                self._open -= 1
                n = self._per_ip.get(c.ip, 0) - 1
                if n > 0:
                    self._per_ip[c.ip] = n
                else:
                    self._per_ip.pop(c.ip, None)

    # -- the pool threads -----------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            c = self.work.get()
            if c is None:
                return
            try:
                self._serve(c)
            except Exception:
                log.exception("connection from %s:%d failed", c.ip, c.port)
                self._close(c)
            finally:
                with self._lock:
                    self._inflight -= 1

    def _serve(self, c: Conn) -> None:
        """Answer the connection's request, and the next ones while the
        client stays active; then give the connection back or close it."""
        sock, reader = c.sock, c.reader
        req, c.request = c.request, None

        def send_continue() -> None:
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

        try:
            sock.setblocking(True)  # with the kernel timeouts the Reader set
            while True:
                ans, _rid = self.gateway.handle(req, c.client)
                keep = req.keep_alive and not ans.close and not self._stop.is_set()
                sock.sendall(render(ans.status, ans.headers, ans.body, keep_alive=keep,
                                    head_only=req.method == "HEAD"))
                if not keep:
                    break
                # Wait for the next request only while no other request waits for a thread.
                req = reader.next_request(time.monotonic() + (KEEP if self.work.empty() else 0.0), send_continue)
                if req is None:  # idle, or the next request arrives slowly: the selector waits for it
                    if self._stop.is_set():
                        break
                    c.idle_since = time.monotonic()
                    self._give_back(c)
                    return
        except HttpError as exc:
            self._refuse(c, exc, in_selector=False)
            return
        except (ClientGone, OSError):
            pass
        self._close(c)


def _connection_limit(cfg: GatewayConfig) -> int:
    """cfg.max_connections, kept under the process's file limit (raised to
    its hard limit first), with room for upstream connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = cfg.max_connections + 2 * cfg.threads + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return cfg.max_connections
    limit = max(16, min(cfg.max_connections, soft - 2 * cfg.threads - 256))
    if limit < cfg.max_connections:
        log.warning("at most %d client connections (the file limit is %d)", limit, soft)
    return limit
