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
    assert rd.wait_readable(0.3) is False          # idle: no request within the wait
    assert 0.2 < time.monotonic() - t0 < 1.0
    b.sendall(b"GET / HTTP/1.1\r\n")               # half a head, then silence
    assert rd.wait_readable(0.3) is True
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
