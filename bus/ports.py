"""A free TCP port to listen on, for tests, benchmarks and local tooling.

Binding port 0 and closing hands out a port from the kernel's ephemeral
range, the same range outgoing connections (to RabbitMQ, ZooKeeper, other
services) take their local ports from: one of them can grab it before the
listener binds ("Address already in use"). Ports below that range are only
ever taken by listeners, so the choice is made there."""
from __future__ import annotations

import random
import socket

_LOW = 10_000


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    top = _ephemeral_start()
    low = _LOW if top > _LOW + 1000 else 1024
    for _ in range(200 if top > low + 100 else 0):   # no room below the range: let the kernel choose
        port = random.randrange(low, top)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:   # a crowded or missing range below: the kernel's choice
        s.bind((host, 0))
        return s.getsockname()[1]
