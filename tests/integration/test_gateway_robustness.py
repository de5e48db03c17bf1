"""Bad input and overload against a real gateway process: each bad request
gets a 4xx JSON answer and its connection is closed, while a well-behaved
keep-alive client on another connection keeps being served; more clients
than threads + queue get 503 at once (no hang), and the gateway recovers."""
import json
import socket
import threading
import time

from bus import metrics as bmetrics
from kits.testkit import Client, start_gateway, start_upstream, wait_healthy


def raw_exchange(port: int, payload: bytes, *, timeout: float = 5.0) -> tuple[int, dict, bool]:
    """Send raw bytes; return (status, json body, closed by the gateway)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        if payload:
            try:
                s.sendall(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass
        data = b""
        closed = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                closed = True
                break
            except socket.timeout:
                break
            if not chunk:
                closed = True
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1]) if head.startswith(b"HTTP/1.1 ") else 0
        return status, (json.loads(body) if body else {}), closed
    finally:
        s.close()


BAD = [
    ("malformed request line", b"GARBAGE\r\n\r\n", 400),
    ("request line with spaces", b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("not HTTP", b"GET / FTP/1.0\r\n\r\n", 400),
    ("HTTP/2 line", b"GET / HTTP/2.0\r\n\r\n", 505),
    ("garbage bytes", bytes(range(256)) * 4, 400),
    ("binary junk then newline", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
    ("header without colon", b"GET /health HTTP/1.1\r\nHost x\r\n\r\n", 400),
    ("huge header", b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431),
    ("endless head", b"GET /health HTTP/1.1\r\n" + b"X-A: b\r\n" * 5000, 431),
    ("huge body", b"POST /api/v1/rides HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n" + b"x" * 1000, 413),
    ("bad content-length", b"POST /api/v1/rides HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400),
    ("conflicting content-length", b"POST /api/v1/rides HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
    ("content-length and chunked", b"POST /api/v1/rides HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n", 400),
    ("unicode digits in content-length", b"POST /api/v1/rides HTTP/1.1\r\nContent-Length: \xb2\r\n\r\nab", 400),
    ("dot segments", b"GET /api/v1/users/../db/clear HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 400),
    ("encoded dot segments", b"GET /api/v1/users/%2e%2e/db/clear HTTP/1.1\r\nConnection: close\r\n\r\n", 400),
]


def test_bad_input_gets_4xx_and_closed_while_others_are_served(cluster):
    start_upstream(cluster, "up0", "rides")
    gw = start_gateway(cluster, read_timeout=1.5)
    wait_healthy(gw, "rides", 1)
    good = Client(gw)
    assert good.get("/api/v1/rides/1")[0] == 200

    for what, payload, expected in BAD:
        status, body, closed = raw_exchange(gw, payload)
        assert (status, closed) == (expected, True), (what, status, body, closed)
        assert isinstance(body.get("error"), str), (what, body)
        # the well-behaved keep-alive client is still served, on the same connection
        status, body, _ = good.get("/api/v1/rides/2")
        assert status == 200, (what, status, body)

    # A client that sends half a request and stops is timed out (408) and closed.
    t0 = time.monotonic()
    status, body, closed = raw_exchange(gw, b"GET /health HTTP/1.1\r\nHost: x\r\n", timeout=10)
    assert (status, closed) == (408, True) and time.monotonic() - t0 < 5, (status, body)
    # A slowloris trickling one header byte at a time cannot outlast the head deadline.
    s = socket.create_connection(("127.0.0.1", gw), timeout=10)
    t0 = time.monotonic()
    s.sendall(b"GET /health HTTP/1.1\r\n")
    got = b""
    try:
        while time.monotonic() - t0 < 6:
            s.sendall(b"X")
            time.sleep(0.2)
    except OSError:
        pass
    try:
        got = s.recv(65536)
    except OSError:
        pass
    s.close()
    assert time.monotonic() - t0 < 6 and (got.startswith(b"HTTP/1.1 408") or got == b""), got
    # A client that connects and says nothing is dropped without an answer.
    status, body, closed = raw_exchange(gw, b"", timeout=10)
    assert closed and status == 0
    # Empty lines before a request are tolerated; pipelined requests are answered in order.
    s = socket.create_connection(("127.0.0.1", gw), timeout=5)
    s.sendall(b"\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /api/v1/rides/7 HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while data.count(b"HTTP/1.1 200") < 2:
        chunk = s.recv(65536)
        assert chunk
        data += chunk
    s.close()
    assert good.get("/health")[0] == 200
    # /metrics counts the refusals.
    status, text, _ = good.get("/metrics")
    got = bmetrics.parse(text)
    assert bmetrics.value(got, "stratus_gateway_bad_requests_total", status=431) >= 1
    assert bmetrics.value(got, "stratus_gateway_requests_total", route="rides", method="GET", status=200) >= 1


def test_overload_answers_503_without_hanging_and_recovers(cluster):
    start_upstream(cluster, "up0", "rides")
    gw = start_gateway(cluster, threads=4, queue=2)
    wait_healthy(gw, "rides", 1)
    results: list = []
    lock = threading.Lock()

    def slow_client():
        t0 = time.monotonic()
        try:
            c = Client(gw, timeout=15)
            status = c.get("/api/v1/rides/_sleep?s=2")[0]
        except Exception as exc:  # a reset is not a hang, but count it
            status = type(exc).__name__
        with lock:
            results.append((status, time.monotonic() - t0))

    threads = [threading.Thread(target=slow_client) for _ in range(12)]
    for t in threads:
        t.start()
        time.sleep(0.02)
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads), "a client hung"
    statuses = [s for s, _ in results]
    ok, refused = statuses.count(200), statuses.count(503)
    # 4 served at once, 2 waited in the queue and were served after them; the rest were refused.
    assert ok == 6 and refused == 6, results
    assert all(dt < 1.0 for s, dt in results if s == 503), results  # refused at once
    # Recovery: once the load is gone, everyone is served again.
    c = Client(gw)
    for _ in range(20):
        assert c.get("/api/v1/rides/1")[0] == 200
    many = [Client(gw) for _ in range(4)]
    for cl in many:
        assert cl.get("/health")[0] == 200
    text = c.get("/metrics")[1]
    assert bmetrics.value(text, "stratus_gateway_rejected_connections_total") == 6, text


def test_64_keepalive_clients_are_served_concurrently(cluster):
    start_upstream(cluster, "up0", "rides")
    gw = start_gateway(cluster)  # default pool: at least 64 threads
    wait_healthy(gw, "rides", 1)
    clients = [Client(gw) for _ in range(64)]
    for c in clients:  # every connection opened and held
        assert c.get("/api/v1/rides/1")[0] == 200
    errors = []

    def run(c):
        for _ in range(10):
            status = c.get("/api/v1/rides/1")[0]
            if status != 200:
                errors.append(status)
    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)


def test_sigterm_lets_the_request_in_progress_finish(cluster):
    import signal
    start_upstream(cluster, "up0", "rides")
    gw = start_gateway(cluster)
    wait_healthy(gw, "rides", 1)
    result = {}

    def slow():
        result["status"] = Client(gw, timeout=10).get("/api/v1/rides/_sleep?s=1.5")[0]
    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.5)
    cluster.signal("gateway", signal.SIGTERM)
    t.join(10)
    assert result.get("status") == 200
    assert cluster.procs["gateway"].wait(10) == 0
    try:
        socket.create_connection(("127.0.0.1", gw), timeout=1).close()
        refused = False
    except OSError:
        refused = True
    assert refused  # no longer listening
