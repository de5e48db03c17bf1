#!/opt/stratus/bin/python
"""Container health checks for the Stratus images (HEALTHCHECK CMD).

  stratus-healthcheck http PORT_VARIABLE DEFAULT_PORT [PATH]
      healthy when GET http://127.0.0.1:<port><PATH> (default /health) answers
      200; the port is read from PORT_VARIABLE when set (so a changed port
      setting keeps the check right).
  stratus-healthcheck worker
      healthy when this container's worker holds its ephemeral znode in
      ZooKeeper (it is registered, so its session is alive), or, while ZooKeeper
      cannot be asked, when PID 1 is still the worker.
Exit 0 healthy, 1 unhealthy. Every wait is bounded by a few seconds."""
from __future__ import annotations

import os
import sys
import urllib.request


def check_http(var: str, default: str, path: str = "/health") -> int:
    port = os.environ.get(var) or default
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as resp:
            ok = resp.status == 200
    except Exception as exc:  # connection refused, HTTP error, timeout
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


def check_worker() -> int:
    worker_id = os.environ.get("STRATUS_WORKER_ID", "")
    try:
        cmdline = open("/proc/1/cmdline", "rb").read().split(b"\0")
    except OSError:
        cmdline = []
    if b"worker" not in cmdline:
        print("unhealthy: PID 1 is not a worker", file=sys.stderr)
        return 1
    if not worker_id:
        return 0
    try:
        from bus import zk as bzk
        from bus.names import Paths
        from bus.settings import load
    except ImportError:
        return 0
    try:
        # the platform's identity, as the worker itself connects (bus/zk.py)
        zk = bzk.connect(load(), timeout=3, start_timeout=3, secure=False)
    except Exception as exc:
        # ZooKeeper itself is unreachable: that is not this worker's fault.
        print(f"zookeeper unreachable ({exc}); worker process alive", file=sys.stderr)
        return 0
    try:
        path = Paths(os.environ.get("STRATUS_CLUSTER", "default")).worker(worker_id)
        if zk.exists(path):
            return 0
        print(f"unhealthy: {path} does not exist", file=sys.stderr)
        return 1
    finally:
        zk.stop()
        zk.close()


def main(argv: list[str]) -> int:
    if argv[:1] == ["http"] and len(argv) >= 3:
        return check_http(*argv[1:4])
    if argv[:1] == ["worker"]:
        return check_worker()
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
