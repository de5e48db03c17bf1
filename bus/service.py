"""What every tenant service shares: a Flask app with JSON errors, a 64 KiB
body limit, request ids in every log line, GET /health and GET /metrics, and
a runner that serves it with gunicorn threads. Started by hand (tests, a
component outside the platform), the runner registers the instance in the
ZooKeeper service registry; run by the platform as an app instance
(STRATUS_INSTANCE set), it never connects to ZooKeeper: the orchestrator
registers it, and an instance reaches nothing but the broker and the gateway.

/metrics: the Prometheus text (bus/metrics.py) of the app's own registry,
app.extensions["stratus_metrics"] (a bus.metrics.HttpMetrics): every request
counted by URL rule, method and status with its latency, plus the process's
figures. A component adds its own collectors to that registry (the
orchestrator's DB cluster figures). Scrapes of /metrics are counted but not
written to the access log.

    app = base_app("users", error_body=lambda status, msg: {"error": msg})
    ...routes...
    serve(lambda: create_app(), "users", settings.users_port)
"""
from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from typing import Callable

from flask import Flask, Response, abort, g, jsonify, request
from werkzeug.exceptions import HTTPException

from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, HttpMetrics
from .settings import Settings, load

MAX_BODY = 64 * 1024
log = logging.getLogger("stratus.service")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            record.request_id = g.get("request_id", "-")
        except RuntimeError:  # outside a request
            record.request_id = "-"
        return True


def setup_logging(name: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {name} %(levelname)s [%(request_id)s] %(message)s"))
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("pika", "kazoo", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def default_error_body(status: int, message: str) -> dict:
    return {"error": message}


def allow_large_bodies(app: Flask, endpoint: str, limit: int) -> None:
    """Let one endpoint take bodies up to `limit` bytes (others: MAX_BODY).
    The endpoint then reads request.stream itself, in chunks."""
    app.config.setdefault("STRATUS_BODY_LIMITS", {})[endpoint] = limit


def body_limit(app: Flask) -> int:
    return app.config.get("STRATUS_BODY_LIMITS", {}).get(request.endpoint, MAX_BODY)


def base_app(name: str, *, error_body: Callable[[int, str], dict] = default_error_body) -> Flask:
    """A Flask app whose every error, 404/405/413 included, is a JSON body."""
    app = Flask(name)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.json.sort_keys = False
    app.extensions["stratus_error_body"] = error_body
    metrics = app.extensions["stratus_metrics"] = HttpMetrics(name)
    access = logging.getLogger(f"stratus.{name}.access")

    @app.before_request
    def _start():
        g.request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        g.started = time.monotonic()
        limit = body_limit(app)
        if limit != MAX_BODY:
            request.max_content_length = limit
        if request.content_length is not None and request.content_length > limit:
            _drain(request.content_length)
            abort(413)

    @app.after_request
    def _finish(resp):
        resp.headers["X-Request-Id"] = g.get("request_id", "")
        seconds = time.monotonic() - g.get("started", time.monotonic())
        rule = request.url_rule
        metrics.observe(rule.rule if rule is not None else "unmatched", request.method, resp.status_code, seconds)
        if rule is None or rule.endpoint != "_metrics":
            access.info("%s %s %s %.1fms", request.method, request.full_path.rstrip("?"), resp.status_code,
                        seconds * 1000)
        return resp

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        messages = {404: "not found", 405: "method not allowed", 413: f"body larger than {body_limit(app)} bytes"}
        msg = messages.get(exc.code, exc.description or exc.name)
        resp = jsonify(error_body(exc.code or 500, msg))
        if exc.code == 405 and getattr(exc, "valid_methods", None):
            resp.headers["Allow"] = ", ".join(exc.valid_methods)
        return resp, exc.code

    @app.get("/health")
    def _health():
        return jsonify({"status": "ok", "service": name})

    @app.get("/metrics")
    def _metrics():
        return Response(metrics.render(), content_type=METRICS_CONTENT_TYPE)

    return app


DRAIN_MAX = 1024 * 1024


def _drain(length: int) -> None:
    """Read and drop an oversized body (up to DRAIN_MAX) before answering 413:
    gunicorn drains at most 64 KiB itself and otherwise closes a keep-alive
    connection right after the response, which breaks the client's next
    request on it."""
    if length > DRAIN_MAX:
        return
    stream = request.environ.get("wsgi.input")
    left = length
    try:
        while left > 0 and stream is not None:
            chunk = stream.read(min(65536, left))
            if not chunk:
                break
            left -= len(chunk)
    except Exception:  # the client went away: nothing to answer on
        pass


def json_error(status: int, message: str):
    """An error response in the app's own error shape."""
    from flask import current_app
    return jsonify(current_app.extensions["stratus_error_body"](status, message)), status


def serve(app_factory: Callable[[], Flask], service: str, port: int, *, threads: int = 16,
          settings: Settings | None = None, on_worker_start: Callable[[], None] | None = None) -> None:
    """Serve with gunicorn: one process (so per-instance counters are exact),
    `threads` threads. The instance registers itself (host:port, /health) as
    an ephemeral znode once it listens; port 0 takes any free port. Started
    by the platform as an app instance (STRATUS_INSTANCE set), it serves on
    $PORT, leaves registering to the orchestrator and opens no ZooKeeper
    session at all."""
    from gunicorn.app.base import BaseApplication

    from . import registry

    settings = settings or load()
    setup_logging(service, settings.log_level)
    state: dict = {}
    # Run by the platform as an app instance (paas.md, Apps): serve on PORT;
    # the orchestrator, which probes the instance, registers it itself.
    instance = os.environ.get("STRATUS_INSTANCE")
    if os.environ.get("PORT"):
        port = int(os.environ["PORT"])

    def post_worker_init(worker):
        setup_logging(service, settings.log_level)
        bound = worker.sockets[0].sock.getsockname()[1] if hasattr(worker.sockets[0], "sock") else \
            worker.sockets[0].getsockname()[1]
        if on_worker_start:
            on_worker_start()
        if not instance:
            from . import zk as bzk
            state["zk"] = bzk.connect(settings, timeout=max(settings.zk_timeout, 2.0))
            state["reg"] = registry.register(state["zk"], settings, service, bound)
        log.info("%s listening on %s:%d (cluster %s)", service, settings.bind_host, bound, settings.cluster)
        print(f"{service} listening on http://{registry.advertise_host(settings)}:{bound}", flush=True)

    def worker_exit(server, worker):
        reg, zk = state.get("reg"), state.get("zk")
        if reg:
            reg.close()
        if zk:
            zk.stop()
            zk.close()

    class App(BaseApplication):
        def load_config(self):
            cfg = {"limit_request_line": 0, "limit_request_field_size": 16384,  # the gateway bounds heads (16 KiB): no HTML 414/431 from gunicorn
                   "bind": f"{settings.bind_host}:{port}", "workers": 1, "worker_class": "gthread",
                   "threads": threads, "timeout": 60, "graceful_timeout": 10, "keepalive": 30,
                   "accesslog": None, "errorlog": "-", "loglevel": "warning",
                   "post_worker_init": post_worker_init, "worker_exit": worker_exit}
            for k, v in cfg.items():
                self.cfg.set(k, v)

        def load(self):
            return app_factory()

    App().run()
