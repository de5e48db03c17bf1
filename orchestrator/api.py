"""The orchestrator's HTTP API (rideshare.md "The database, seen from
outside", platform.md admin routes). Every error is a JSON body
{"error": "..."}. Database routes go through one shared bus client: the
orchestrator never touches a database itself."""
from __future__ import annotations

import logging
import threading

from flask import Flask, Response, jsonify, request
from kazoo.exceptions import KazooException

from bus.client import DBClient
from bus.errors import DBError
from bus.service import base_app, json_error
from bus.settings import Settings, load

from .control import ControlError

log = logging.getLogger("stratus.orchestrator.api")


class Holder:
    """What the routes need, filled in once the gunicorn worker has started
    (the controller and the bus client are made after the fork)."""

    def __init__(self, settings: Settings, controller=None, db: DBClient | None = None):
        self.settings = settings
        self.controller = controller
        self._db = db
        self._db_lock = threading.Lock()

    @property
    def db(self) -> DBClient:
        with self._db_lock:
            if self._db is None:
                self._db = DBClient(self.settings, name="orchestrator")
            return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


def _json_body(*, required: bool = True):
    """The request's JSON body, or an error response."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        if required:
            return None, json_error(400, "the request body must be a JSON object")
        return {}, None
    data = request.get_json(force=True, silent=True)
    if data is None:
        return None, json_error(400, "the request body is not valid JSON")
    if not isinstance(data, dict):
        return None, json_error(400, "the request body must be a JSON object")
    return data, None


def _db_error(exc: DBError):
    status = exc.status if 400 <= exc.status < 600 else 500
    resp = jsonify({"error": exc.message, "code": exc.code, **({"op": exc.op} if exc.op is not None else {}),
                    **({"tag": exc.tag} if exc.tag is not None else {})})
    return resp, status


def create_app(holder: Holder | None = None) -> Flask:
    holder = holder or Holder(load())
    app = base_app("orchestrator")
    app.extensions["stratus_holder"] = holder

    def controller():
        c = holder.controller
        if c is None:
            raise ControlError(503, "the orchestrator is starting")
        return c

    @app.errorhandler(ControlError)
    def _control_error(exc: ControlError):
        return json_error(exc.status, exc.message)

    @app.errorhandler(DBError)
    def _dberror(exc: DBError):
        return _db_error(exc)

    @app.errorhandler(KazooException)
    def _zk_error(exc: KazooException):
        log.warning("ZooKeeper error: %r", exc)
        return json_error(503, f"ZooKeeper is not reachable now ({type(exc).__name__})")

    # --- the database ------------------------------------------------------------
    @app.post("/api/v1/db/read")
    def db_read():
        body, err = _json_body()
        if err:
            return err
        query = dict(body)
        min_lsn = query.pop("min_lsn", None)
        if min_lsn is not None and (not isinstance(min_lsn, int) or isinstance(min_lsn, bool) or min_lsn < 0):
            return json_error(400, "min_lsn must be a non-negative integer")
        if "op" not in query:
            return json_error(400, "a read needs an 'op' (select or count)")
        reply = holder.db.read(query, min_lsn=min_lsn)
        resp = jsonify(reply.result)
        resp.headers["X-Stratus-LSN"] = str(reply.lsn)
        return resp

    @app.post("/api/v1/db/write")
    def db_write():
        body, err = _json_body()
        if err:
            return err
        ops = body.get("ops")
        if not isinstance(ops, list) or not ops or not all(isinstance(o, dict) for o in ops):
            return json_error(400, "a write needs 'ops': a non-empty list of operations")
        reply = holder.db.write(ops)
        resp = jsonify({"results": reply.result, "lsn": reply.lsn})
        resp.headers["X-Stratus-LSN"] = str(reply.lsn)
        return resp

    @app.post("/api/v1/db/clear")
    def db_clear():
        reply = holder.db.clear()
        resp = jsonify({})
        resp.headers["X-Stratus-LSN"] = str(reply.lsn)
        return resp

    # --- failures, on demand --------------------------------------------------------
    @app.post("/api/v1/crash/master")
    def crash_master():
        return jsonify([str(controller().crash_master())])

    @app.post("/api/v1/crash/slave")
    def crash_slave():
        return jsonify([str(controller().crash_slave())])

    @app.post("/api/v1/switchover")
    def switchover():
        body, err = _json_body(required=False)
        if err:
            return err
        candidate = body.get("candidate")
        if candidate is not None and not isinstance(candidate, str):
            return json_error(400, "candidate must be a worker id (a string)")
        return jsonify(controller().switchover(candidate))

    # --- views ----------------------------------------------------------------------
    @app.get("/api/v1/worker/list")
    def worker_list():
        return jsonify(controller().worker_pids())

    @app.get("/api/v1/cluster")
    def cluster():
        return jsonify(controller().cluster_view())

    @app.get("/metrics")
    def metrics():
        return Response(render_metrics(controller()), mimetype="text/plain; version=0.0.4")

    return app


def render_metrics(c) -> str:
    view = c.cluster_view()
    roles = {"master": 0, "slave": 0}
    ready = 0
    for w in view["workers"]:
        roles[w["role"] if w["role"] in roles else "slave"] += 1
        ready += 1 if w["ready"] else 0
    lines = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]):
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value}")

    metric("stratus_workers", "gauge", "Live workers by role.",
           [(f'{{role="{r}"}}', n) for r, n in roles.items()])
    metric("stratus_workers_ready", "gauge", "Workers that have caught up with the log.", [("", ready)])
    metric("stratus_term", "gauge", "The current leader term.", [("", view["term"])])
    metric("stratus_reads_in_window", "gauge", "Reads counted in the current scaling window.",
           [("", view["reads_in_window"])])
    metric("stratus_slave_target", "gauge", "The number of slaves the scaling rule asks for.",
           [("", view["slave_target"])])
    metric("stratus_elections_total", "counter", "Elections recorded in this cluster's history.",
           [("", len(view["elections"]))])
    metric("stratus_scaling_decisions_total", "counter", "Scaling windows ended.",
           [("", view["decisions_total"])])
    metric("stratus_crash_calls_total", "counter", "crash/master and crash/slave calls that killed a worker.",
           [('{kind="master"}', c.counters["crash_master"]), ('{kind="slave"}', c.counters["crash_slave"])])
    metric("stratus_switchovers_total", "counter", "Planned switchovers.", [("", c.counters["switchovers"])])
    metric("stratus_workers_started_total", "counter", "Workers started by this orchestrator.",
           [("", c.counters["workers_started"])])
    metric("stratus_workers_drained_total", "counter", "Slaves drained by scaling down.",
           [("", c.counters["workers_drained"])])
    metric("stratus_orchestrator_leader", "gauge", "1 when this orchestrator leads.",
           [("", 1 if view["orchestrator"]["leading"] else 0)])
    return "\n".join(lines) + "\n"
