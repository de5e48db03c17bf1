"""The gateway's socket timeouts (kept by the kernel, see http11.kernel_timeouts)
and its forwarding over pooled connections, against real loopback sockets."""
import socket
import threading
import time

import pytest

from gateway.balancer import ServicePool
from gateway.config import load_config
from gateway.http11 import HttpError, Reader
from gateway.proxy import forward
from gateway.upstream_conn import UpstreamConn


def _reader(read_timeout: float):
    a, b = socket.socketpair()
    return Reader(a, max_header_bytes=1024, max_body_bytes=100, read_timeout=read_timeout), (a, b)


def test_idle_silent_and_trickling_clients_time_out():
    rd, (a, b) = _reader(0.6)
    t0 = time.monotonic()
    assert rd.next_request(time.monotonic() + 0.3, lambda: None) is None   # idle: no request within the wait
    assert 0.2 < time.monotonic() - t0 < 1.0 and not rd.rb.started
    b.sendall(b"GET / HTTP/1.1\r\n")               # half a head, then silence
    assert rd.next_request(time.monotonic() + 0.3, lambda: None) is None and rd.rb.started
    t0 = time.monotonic()
    with pytest.raises(HttpError) as e:
        rd.read_request(lambda: None)
    assert e.value.status == 408 and time.monotonic() - t0 < 1.2
    a.close(), b.close()

    # A byte every 0.1 s never lets a single recv time out; the head deadline still holds.
    rd, (a, b) = _reader(0.6)
    stop = threading.Event()

    def trickle():
        b.sendall(b"GET / HTTP/1.1\r\n")
        while not stop.wait(0.1):
            try:
                b.sendall(b"X")
            except OSError:
                return
    threading.Thread(target=trickle, daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(HttpError) as e:
        rd.read_request(lambda: None)
    stop.set()
    assert e.value.status == 408 and time.monotonic() - t0 < 1.2
    a.close(), b.close()


def test_an_upstream_that_never_answers_is_a_timeout():
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    c = UpstreamConn("127.0.0.1", port)
    c.connect(2, 0.4)
    t0 = time.monotonic()
    with pytest.raises(socket.timeout):
        c.request("GET", "/", [], b"")
    assert time.monotonic() - t0 < 1.5
    c.close()
    srv.close()


def one_answer_per_connection():
    """An upstream that answers one request per connection with keep-alive,
    then closes it: every pooled connection it leaves is stale. Returns
    (port, connections accepted)."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    accepted = []

    def run():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            accepted.append(conn)
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                buf += chunk
            head = buf.split(b"\r\n\r\n")[0]
            n = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")), 0)
            rest = buf.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in buf else b""
            while len(rest) < n:
                rest += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            conn.close()
    threading.Thread(target=run, daemon=True).start()
    return srv, port, accepted


@pytest.mark.parametrize("method", ["GET", "PUT", "POST"])
def test_a_stale_pooled_connection_is_not_an_error(method):
    """GETs reuse a connection given back under a second ago without probing
    it; when the upstream had closed it, the request is retried on a new
    connection, even with one instance. POSTs probe first, so they never
    send on it."""
    srv, port, accepted = one_answer_per_connection()
    cfg = load_config(health_interval=3600)
    pool = ServicePool("svc", cfg)
    pool._on_change({"only": {"host": "127.0.0.1", "port": port}})
    try:
        for i in range(3):
            up = forward(pool, cfg, method, f"/x/{i}", [("Host", "t")], b"{}" if method != "GET" else b"")
            assert (up.status, up.body, up.error) == (200, b"ok", None), (i, up)
            time.sleep(0.05)  # the upstream's close reaches the pooled connection
        assert len(accepted) == 3
        assert pool.instances["only"].healthy
    finally:
        srv.close()
        pool.close()


def test_a_retried_request_carries_the_same_request_id():
    """The upstream reads a PUT on a reused pooled connection and closes it
    without answering: the gateway retries it on a new connection, and the
    retry carries the first attempt's X-Request-Id (the services make it the
    bus request id of the write, so the retry gets the first one's result)."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    seen: list[tuple[str, str]] = []
    dropped = threading.Event()

    def serve(conn):
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                h = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
                n = int(h.get("content-length", "0"))
                while len(buf) < n:
                    buf += conn.recv(65536)
                buf = buf[n:]
                seen.append((lines[0].split(" ")[1], h.get("x-request-id", "")))
                if lines[0].startswith("PUT") and not dropped.is_set():
                    dropped.set()
                    return  # read it, then close without an answer
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def run():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()
    threading.Thread(target=run, daemon=True).start()
    cfg = load_config(health_interval=3600)
    pool = ServicePool("svc", cfg)
    pool._on_change({"only": {"host": "127.0.0.1", "port": port}})
    retries = []
    try:
        up = forward(pool, cfg, "GET", "/warm", [("Host", "t"), ("X-Request-Id", "rid-1")], b"")
        assert up.status == 200
        up = forward(pool, cfg, "PUT", "/kv/a", [("Host", "t"), ("X-Request-Id", "rid-2")], b"{}",
                     on_retry=lambda: retries.append(1))
        assert (up.status, up.body, up.attempts, len(retries)) == (200, b"ok", 2, 1), up
        assert seen == [("/warm", "rid-1"), ("/kv/a", "rid-2"), ("/kv/a", "rid-2")], seen
    finally:
        srv.close()
        pool.close()
