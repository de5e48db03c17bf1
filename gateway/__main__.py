"""`python -m gateway`: serve the public front until SIGTERM or Ctrl-C.

Once listening, the gateway registers itself in the ZooKeeper service
registry as the service "gateway" ({host, port, health: /health}: the
address it advertises, bus/registry.py), so that the orchestrator's
Prometheus discovery finds its /metrics; the znode is ephemeral and deleted
on a clean stop. Nothing routes requests to it through the registry."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading

from bus import registry
from bus.settings import set_component
from bus import zk as bzk

from .app import Gateway
from .config import load_config
from .server import Server


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s gateway %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("pika", "kazoo"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    set_component("gateway")   # its own broker account (bus/broker_accounts.py)
    ap = argparse.ArgumentParser(prog="python -m gateway", description="the Stratus gateway")
    ap.add_argument("--port", type=int, default=None, help="listen port (default STRATUS_GATEWAY_PORT, 8080)")
    ap.add_argument("--host", default=None, help="bind address (default STRATUS_BIND_HOST)")
    args = ap.parse_args(argv)
    cfg = load_config(port=args.port)
    setup_logging(cfg.base.log_level)
    log = logging.getLogger("stratus.gateway")
    zk = bzk.connect(cfg.base, timeout=max(cfg.base.zk_timeout, 2.0))
    gateway = Gateway(cfg, zk=zk)
    server = Server(gateway, cfg, host=args.host)
    server.start()
    host, port = server.address
    # The registry entry advertises the address it listens on (a wildcard: the host's name).
    reg = registry.register(zk, dataclasses.replace(cfg.base, bind_host=host), "gateway", port)
    log.info("gateway listening on %s:%d (cluster %s, %d threads, queue %d)", host, port, cfg.base.cluster,
             cfg.threads, cfg.queue)
    print(f"gateway listening on http://{host}:{port}", flush=True)

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    log.info("gateway stopping")
    reg.close()
    server.stop()
    gateway.close()
    try:
        zk.stop()
        zk.close()
    except Exception:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
