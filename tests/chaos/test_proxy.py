"""The fault-injection proxy (stratus/chaos/proxy.py) on real sockets: an echo
server behind it, clients in this process and in a child process (so a fault
can name one client's pid and spare the others)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from stratus.chaos.proxy import ProxyHub, client_pid


@pytest.fixture
def echo():
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    stop = threading.Event()

    def serve(c):
        with c:
            while not stop.is_set():
                try:
                    data = c.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                c.sendall(data)

    def accept():
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(c,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()
    yield srv.getsockname()
    stop.set()
    srv.close()


@pytest.fixture
def hub():
    h = ProxyHub()
    yield h
    h.close()


def roundtrip(sock: socket.socket, payload: bytes = b"ping", timeout: float = 2.0) -> bytes:
    sock.settimeout(timeout)
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        got += chunk
    return got


def test_passes_bytes_both_ways_and_knows_the_client(echo, hub):
    p = hub.add("link", echo)
    with socket.create_connection(("127.0.0.1", p.port), timeout=2) as s:
        big = os.urandom(300_000)
        s.sendall(big)
        got = b""
        s.settimeout(5)
        while len(got) < len(big):
            got += s.recv(65536)
        assert got == big
        assert p.connections() == [os.getpid()]
    assert p.stats.bytes_up == p.stats.bytes_down == len(big)


def test_client_pid_from_proc(echo):
    with socket.create_connection(echo, timeout=2) as s:
        assert client_pid(s.getsockname(), echo) == os.getpid()
    assert client_pid(("127.0.0.1", 1), echo) is None


def test_cut_refuses_new_connections_and_drops_open_ones_then_heals(echo, hub):
    p = hub.add("link", echo)
    s = socket.create_connection(("127.0.0.1", p.port), timeout=2)
    assert roundtrip(s) == b"ping"
    rule = p.cut()
    with pytest.raises(OSError):
        roundtrip(s)   # the open connection was reset
    s.close()
    with pytest.raises(OSError):
        with socket.create_connection(("127.0.0.1", p.port), timeout=2) as s2:
            roundtrip(s2)   # a new one is closed at once
    assert p.stats.refused >= 1 and p.stats.aborted == 1
    p.heal(rule)
    with socket.create_connection(("127.0.0.1", p.port), timeout=2) as s3:
        assert roundtrip(s3) == b"ping"


CHILD = """
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=3)
print("connected", flush=True)
for line in sys.stdin:
    try:
        s.settimeout(1.5)
        s.sendall(b"x")
        print("ok" if s.recv(10) == b"x" else "closed", flush=True)
    except OSError as exc:
        print("error", type(exc).__name__, flush=True)
"""


def test_a_cut_naming_a_pid_spares_every_other_client(echo, hub):
    p = hub.add("link", echo)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(p.port)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "connected"
        mine = socket.create_connection(("127.0.0.1", p.port), timeout=2)
        deadline = time.monotonic() + 5
        while sorted(p.connections(), key=str) != sorted([child.pid, os.getpid()], key=str):
            assert time.monotonic() < deadline, p.connections()
            time.sleep(0.05)
        p.cut(pids=[child.pid])
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().split()[0] in ("error", "closed")
        assert roundtrip(mine) == b"ping"   # this process's connection is untouched
        mine.close()
    finally:
        child.kill()
        child.wait(5)


def test_delay_adds_latency_in_order(echo, hub):
    p = hub.add("link", echo)
    with socket.create_connection(("127.0.0.1", p.port), timeout=3) as s:
        t0 = time.monotonic()
        roundtrip(s)
        fast = time.monotonic() - t0
        p.delay(150)
        t0 = time.monotonic()
        assert roundtrip(s, b"".join(b"%d," % i for i in range(1000))) == b"".join(b"%d," % i for i in range(1000))
        slow = time.monotonic() - t0
    assert slow >= 0.3 > fast   # 150 ms each way


def test_swallow_keeps_the_connection_open_and_forwards_nothing(echo, hub):
    p = hub.add("link", echo)
    s = socket.create_connection(("127.0.0.1", p.port), timeout=2)
    assert roundtrip(s) == b"ping"
    rule = p.swallow()
    with pytest.raises(socket.timeout):
        roundtrip(s, timeout=0.5)
    with socket.create_connection(("127.0.0.1", p.port), timeout=2) as s2:   # still accepted
        with pytest.raises(socket.timeout):
            roundtrip(s2, timeout=0.5)
    p.heal(rule)
    # A connection whose bytes were dropped is broken for good: it is closed.
    with pytest.raises(OSError):
        roundtrip(s)
    s.close()
    with socket.create_connection(("127.0.0.1", p.port), timeout=2) as s3:
        assert roundtrip(s3) == b"ping"


def test_an_upstream_that_is_down_closes_the_client(hub):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    addr = dead.getsockname()
    dead.close()
    p = hub.add("link", addr)
    with pytest.raises(OSError):
        with socket.create_connection(("127.0.0.1", p.port), timeout=2) as s:
            roundtrip(s)
    assert p.stats.upstream_failed == 1
