"""What the platform gives an app instance, and what an instance gives back
(paas.md, Apps and Behaviour the platform keeps).

Environment of every instance, set by the orchestrator when it starts it:
    STRATUS_TENANT, STRATUS_APP, STRATUS_ROLE, STRATUS_INSTANCE
    STRATUS_CLUSTER, STRATUS_AMQP_URL     the bus, as the tenant's own broker account
    PORT                                  web roles: serve HTTP here, answer the health path
    STRATUS_HEARTBEAT_FILE                worker roles: touch it at least every 2 s
plus the manifest's `env`.

A worker role keeps a heartbeat: `keep_heartbeat()` starts a thread that
touches the file every `interval` seconds. Once the file exists, the
platform's health monitor marks the instance unhealthy, and replaces it,
when the file is older than three probe intervals (6 s by default)."""
from __future__ import annotations

import os
import threading
from pathlib import Path


def identity() -> dict[str, str]:
    """Who this instance is: tenant, app, role, instance (empty outside the platform)."""
    return {k: os.environ.get(f"STRATUS_{k.upper()}", "") for k in ("tenant", "app", "role", "instance")}


def heartbeat() -> None:
    """One beat (nothing outside the platform)."""
    path = os.environ.get("STRATUS_HEARTBEAT_FILE")
    if path:
        p = Path(path)
        p.touch()
        os.utime(p)


def keep_heartbeat(stop: threading.Event | None = None, interval: float = 1.0) -> threading.Event:
    """Beat every `interval` seconds on a daemon thread until `stop` is set;
    returns the stop event."""
    stop = stop or threading.Event()

    def run():
        while True:
            try:
                heartbeat()
            except OSError:
                pass
            if stop.wait(interval):
                return

    threading.Thread(target=run, name="heartbeat", daemon=True).start()
    return stop
