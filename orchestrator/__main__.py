"""python -m orchestrator  (also: stratus orchestrator)

Serves the API with gunicorn (one worker process, threads) on
settings.orchestrator_port; the control loop runs in that worker process,
started from post_worker_init. SIGTERM or SIGINT stop the workers it runs;
a crash (kill -9) leaves them running for a standby to adopt."""
from __future__ import annotations

import logging
import os
import sys
import threading

from bus.service import setup_logging
from bus.settings import load, set_component

log = logging.getLogger("stratus.orchestrator")


def main(argv: list[str] | None = None) -> int:
    set_component("orchestrator")   # its own broker account (bus/broker_accounts.py)
    from gunicorn.app.base import BaseApplication

    from .api import Holder, create_app
    from .control import Controller

    settings = load()
    setup_logging("orchestrator", settings.log_level)
    holder = Holder(settings)
    state: dict = {}

    def post_worker_init(worker):
        setup_logging("orchestrator", settings.log_level)
        sock = worker.sockets[0]
        port = sock.sock.getsockname()[1] if hasattr(sock, "sock") else sock.getsockname()[1]
        state["pid"] = os.getpid()
        # The db routes' bus client, made now (not on the first request) on
        # every orchestrator, standbys included: each one publishes whether it
        # is connected, and a leader cut off from the broker hands the lead to
        # a standby that is (orchestrator/decisions.py check_service_broker).
        threading.Thread(target=lambda: holder.db, name="db-client", daemon=True).start()
        holder.controller = Controller(settings, port=port, credentials=holder.credentials,
                                       bus_connected=holder.bus_connected).start()
        log.info("orchestrator listening on %s:%d (cluster %s, runtime %s)", settings.bind_host, port,
                 settings.cluster, settings.runtime)
        print(f"orchestrator listening on http://{settings.bind_host}:{port}", flush=True)

    def worker_exit(server, worker):
        if state.get("pid") != os.getpid():
            return  # called in the arbiter: the controller lives in the worker
        clean = os.getppid() == worker.ppid   # our arbiter asked us to stop (not: it died)
        if holder.controller is not None:
            holder.controller.close(remove_workers=clean)
        holder.close()

    class App(BaseApplication):
        def load_config(self):
            cfg = {"limit_request_line": 0, "limit_request_field_size": 16384,  # the gateway bounds heads (16 KiB): no HTML 414/431 from gunicorn
                   "bind": f"{settings.bind_host}:{settings.orchestrator_port}", "workers": 1,
                   "worker_class": "gthread", "threads": 16, "timeout": 60, "graceful_timeout": 30,
                   "keepalive": 30, "accesslog": None, "errorlog": "-", "loglevel": "warning",
                   "post_worker_init": post_worker_init, "worker_exit": worker_exit}
            for k, v in cfg.items():
                self.cfg.set(k, v)

        def load(self):
            return create_app(holder)

    App().run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
