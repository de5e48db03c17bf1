"""The orchestrator's HTTP API (rideshare.md "The database, seen from
outside", platform.md admin routes, paas.md Accounts and Data isolation).
Every error is a JSON body {"error": "..."}. Database routes go through one
shared bus client: the orchestrator never touches a database itself.

Identity: the gateway forwards a request with the identity of its token in
X-Stratus-Role, X-Stratus-Subject and X-Stratus-Tenant (and drops any such
header a client sent). A request without X-Stratus-Role came to the
orchestrator's own port, which listens on loopback (or the stack's private
network) only: it acts as the admin.

    accounts routes (/api/v1/tenants, /api/v1/developers)   admin only (403)
    db routes (/api/v1/db/read|write|clear)                  admin or tenant (403)

The db routes take an optional "tenant" in the body. A tenant owner acts
for its own tenant only (another name: 403); the admin names any known
tenant (unknown: 404) and, without the field, acts for rideshare. The
platform's own tables (accounts) are not reachable through these routes."""
from __future__ import annotations

import logging
import threading

from dataclasses import dataclass

from flask import Flask, jsonify, request
from kazoo.exceptions import KazooException
from prometheus_client.metrics_core import Metric

from bus import accounts, tenancy, web
from bus.client import DBClient
from bus.errors import DBError
from bus.service import base_app, json_error
from bus.settings import Settings, load

from . import logs, openapi
from .apps import routes as apps_routes
from .apps.routes import delete_app
from .control import ControlError
from .tenants import BUILT_IN, DEFAULT_DB_TENANT, Failed, NotFound, Tenants

log = logging.getLogger("stratus.orchestrator.api")


class Holder:
    """What the routes need, filled in once the gunicorn worker has started
    (the controller and the bus client are made after the fork)."""

    def __init__(self, settings: Settings, controller=None, db: DBClient | None = None):
        self.settings = settings
        self.controller = controller
        self._db = db
        self._db_lock = threading.Lock()
        self._tenants: Tenants | None = None
        self._apps_api = None
        self._creds: dict[str, dict] = {}

    def credentials(self, tenant: str) -> dict:
        """What a tenant's instance needs to reach the bus as that tenant:
        its own broker account (never the platform's). Cached; a tenant's
        deletion forgets it."""
        env = self._creds.get(tenant)
        if env is None:
            acct = accounts.get(self.db, tenant)
            if acct is None or acct.get("kind") != "tenant" or not acct.get("broker_password"):
                raise LookupError(f"tenant {tenant!r} has no broker account")
            env = {"STRATUS_AMQP_URL": accounts.tenant_amqp_url(self.settings.amqp_url, self.settings.cluster,
                                                                 tenant, acct["broker_password"])}
            # A tenant made by an older release may lack a permission added since.
            from bus.broker_admin import BrokerAdmin, BrokerAdminError
            from bus.names import Names
            try:
                BrokerAdmin(self.settings).set_permissions(tenancy.broker_user(self.settings.cluster, tenant),
                                                           **tenancy.permissions(Names(self.settings.cluster), tenant))
            except BrokerAdminError as exc:
                log.warning("the broker permissions of %s could not be refreshed: %s", tenant, exc)
            self._creds[tenant] = env
        return dict(env)

    @property
    def apps(self):
        """The apps routes' AppsApi, on the controller's ZooKeeper session."""
        if self.controller is None:
            raise ControlError(503, "the orchestrator is starting")
        if self._apps_api is None:
            from bus.names import Paths
            from .apps.desired import Desired
            from .apps.events import Events
            from .apps.packages import Packages
            from .apps.routes import AppsApi
            zk = self.controller.zk
            self._apps_api = AppsApi(Desired(zk, self.settings.cluster, quota=self.settings.tenant_instances),
                                     Events(zk, self.settings.cluster), Packages(self.settings.state_path),
                                     lambda: self.controller.apps, self.tenants.known, zk,
                                     Paths(self.settings.cluster), quota=self.settings.tenant_instances)
        return self._apps_api

    @property
    def db(self) -> DBClient:
        with self._db_lock:
            if self._db is None:
                self._db = DBClient(self.settings, name="orchestrator")
            return self._db

    def bus_connected(self) -> bool:
        """Is the db routes' bus client connected now? Never blocks: False
        while it is still being made (Controller publishes this)."""
        db = self._db
        return db is not None and db.connected

    @property
    def tenants(self) -> Tenants:
        """The accounts logic, on the controller's ZooKeeper session."""
        if self.controller is None:
            raise ControlError(503, "the orchestrator is starting")
        if self._tenants is None:
            self._tenants = Tenants(self.settings, self.db, self.controller.zk)
        return self._tenants

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


@dataclass(frozen=True)
class Identity:
    role: str
    subject: str | None = None
    tenant: str | None = None


def identity() -> Identity:
    """Who sent the request (see the module docstring)."""
    role = request.headers.get("X-Stratus-Role")
    if role is None:
        return Identity("admin")   # the orchestrator's own port
    return Identity(role.strip(), request.headers.get("X-Stratus-Subject"),
                    request.headers.get("X-Stratus-Tenant") or None)


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def require_admin() -> None:
    if identity().role != "admin":
        raise Refused(403, "this route is for the admin only")


def db_tenant(body: dict, holder: "Holder") -> str:
    """The tenant a db request acts for; pops the optional "tenant" field."""
    ident = identity()
    asked = body.pop("tenant", None)
    if ident.role == "tenant":
        if not ident.tenant:
            raise Refused(403, "a tenant identity without its tenant")
        if asked is not None and asked != ident.tenant:
            raise Refused(403, "a tenant's token reaches its own tenant's database only")
        name = ident.tenant
    elif ident.role == "admin":
        if asked is not None and not isinstance(asked, str):
            raise Refused(400, "tenant must be a tenant's name (a string)")
        name = DEFAULT_DB_TENANT if asked is None else asked
    else:
        raise Refused(403, "the database routes are for the admin and tenant owners")
    if name == tenancy.PLATFORM:
        raise Refused(403, "the platform's own tables are not reachable through the API")
    if name not in BUILT_IN and not holder.tenants.known(name):
        raise Refused(404, f"no such tenant: {name[:64]!r}")
    return name


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

    @app.errorhandler(Refused)
    def _refused(exc: Refused):
        return json_error(exc.status, exc.message)

    @app.errorhandler(tenancy.InvalidName)
    def _invalid_name(exc: tenancy.InvalidName):
        return json_error(400, str(exc))

    @app.errorhandler(accounts.Exists)
    def _exists(exc: accounts.Exists):
        return json_error(409, f"{exc.args[0]!r} exists")

    @app.errorhandler(NotFound)
    def _not_found(exc: NotFound):
        return json_error(404, f"no such tenant: {exc.args[0][:64]!r}")

    @app.errorhandler(Failed)
    def _failed(exc: Failed):
        log.warning("account change failed: %s", exc)
        return json_error(503, str(exc))

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
        tenant = db_tenant(query, holder)
        min_lsn = query.pop("min_lsn", None)
        if min_lsn is not None and (not isinstance(min_lsn, int) or isinstance(min_lsn, bool) or min_lsn < 0):
            return json_error(400, "min_lsn must be a non-negative integer")
        if "op" not in query:
            return json_error(400, "a read needs an 'op' (select or count)")
        # Read-your-writes through the gateway: it names the client's last
        # write's LSN in X-Stratus-Min-LSN (gateway/lsn.py); the read waits for it.
        seen = request.headers.get("X-Stratus-Min-LSN", "")
        if seen.isascii() and seen.isdigit() and len(seen) < 20:
            min_lsn = max(min_lsn or 0, int(seen)) or None
        reply = holder.db.read(query, min_lsn=min_lsn, tenant=tenant)
        resp = jsonify(reply.result)
        resp.headers["X-Stratus-LSN"] = str(reply.lsn)
        return resp

    @app.post("/api/v1/db/write")
    def db_write():
        body, err = _json_body()
        if err:
            return err
        tenant = db_tenant(dict(body), holder)
        ops = body.get("ops")
        if not isinstance(ops, list) or not ops or not all(isinstance(o, dict) for o in ops):
            return json_error(400, "a write needs 'ops': a non-empty list of operations")
        # The bus request id carries the HTTP request's X-Request-Id, so the
        # worker's log line for this write can be found by it.
        reply = holder.db.write(ops, tenant=tenant, request_id=web.write_id(ops))
        resp = jsonify({"results": reply.result, "lsn": reply.lsn})
        resp.headers["X-Stratus-LSN"] = str(reply.lsn)
        return resp

    @app.post("/api/v1/db/clear")
    def db_clear():
        body, err = _json_body(required=False)
        if err:
            return err
        reply = holder.db.clear(tenant=db_tenant(body, holder))
        resp = jsonify({})
        resp.headers["X-Stratus-LSN"] = str(reply.lsn)
        return resp

    # --- accounts (admin only) --------------------------------------------------------
    @app.post("/api/v1/tenants")
    def tenant_create():
        require_admin()
        body, err = _json_body()
        if err:
            return err
        name = body.get("name")
        password = holder.tenants.create_tenant(name)
        return jsonify({"name": name, "password": password}), 201

    @app.get("/api/v1/tenants")
    def tenant_list():
        require_admin()
        rows = holder.tenants.list_tenants()
        apps = holder.apps
        for row in rows:
            mine = apps.desired.list(row["name"])
            row["apps"] = len(mine)
            row["instances"] = sum(a.manifest.instances for a in mine)
        return jsonify(rows)

    @app.delete("/api/v1/tenants/<name>")
    def tenant_delete(name: str):
        require_admin()
        if not holder.tenants.known(name) or name == tenancy.PLATFORM:
            raise NotFound(name)
        apps = holder.apps
        for a in apps.desired.list(name):     # its apps stop first (paas.md)
            delete_app(apps, name, a.name)
        holder.tenants.delete_tenant(name)
        holder._creds.pop(name, None)
        apps.events.drop(name)
        try:
            apps.packages.delete_tenant(name)
        except Exception:
            log.warning("the packages of %s stay on disk", name)
        return jsonify({})

    @app.post("/api/v1/developers")
    def developer_create():
        require_admin()
        body, err = _json_body()
        if err:
            return err
        username = body.get("username")
        password = holder.tenants.create_developer(username)
        return jsonify({"username": username, "password": password}), 201

    apps_routes.register(app, lambda: holder.apps, identity, Refused)
    logs.register(app, holder.settings, identity)
    openapi.register(app)

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

    # GET /metrics is base_app's (bus/service.py): the DB cluster's figures join its registry.
    app.extensions["stratus_metrics"].registry.register(ClusterMetrics(holder))

    return app


class ClusterMetrics:
    """The DB cluster as this orchestrator sees it, read when /metrics is
    scraped (a prometheus_client collector over Controller.cluster_view and
    its counters; cluster_families holds the mapping). Before the controller
    exists, or when ZooKeeper cannot be read, only stratus_orchestrator_leader
    is given (and the HTTP and process figures of base_app)."""

    def __init__(self, holder: Holder):
        self.holder = holder

    def describe(self):
        return []

    def collect(self):
        c = self.holder.controller
        if c is None:
            yield _gauge("stratus_orchestrator_leader", "1 when this orchestrator leads.", [({}, 0)])
            return
        try:
            view = c.cluster_view()
        except Exception as exc:   # ZooKeeper away: /metrics still answers
            log.warning("metrics: the cluster view could not be read: %r", exc)
            yield _gauge("stratus_orchestrator_leader", "1 when this orchestrator leads.", [({}, 1 if c.leading else 0)])
            return
        yield from cluster_families(view, dict(c.counters))


def _gauge(name: str, help_: str, samples) -> Metric:
    return _family(name, "gauge", help_, samples)


def _counter(name: str, help_: str, samples) -> Metric:
    """name without _total."""
    return _family(name, "counter", help_, samples)


def _family(name: str, kind: str, help_: str, samples) -> Metric:
    m = Metric(name, help_, kind)
    for labels, value in samples:
        m.add_sample(name + ("_total" if kind == "counter" else ""), {k: str(v) for k, v in labels.items()},
                     float(value))
    return m


def cluster_families(view: dict, counters: dict) -> list[Metric]:
    """The metric families of a cluster_view() and the controller's counters.
    Per worker (label worker = its id): info{role,state,host}, applied LSN,
    lag (log entries behind the master), ready, reads taken from readQ since
    its start. stratus_db_writes_total is the master's applied LSN: every
    acknowledged write takes exactly one LSN, and LSNs only grow, failovers
    included."""
    workers = view["workers"]
    roles = {"master": 0, "slave": 0}
    for w in workers:
        roles[w["role"] if w["role"] in roles else "slave"] += 1
    master = next((w for w in workers if w["leader"]), None)
    elections = view["elections"]
    out = [
        _gauge("stratus_workers", "Live workers by role.", [({"role": r}, n) for r, n in roles.items()]),
        _gauge("stratus_workers_ready", "Workers that have caught up with the log.",
               [({}, sum(1 for w in workers if w["ready"]))]),
        _gauge("stratus_term", "The current leader term.", [({}, view["term"])]),
        _gauge("stratus_reads_in_window", "Reads counted in the current scaling window.",
               [({}, view["reads_in_window"])]),
        _gauge("stratus_slave_target", "The number of slaves the scaling rule asks for.",
               [({}, view["slave_target"])]),
        _gauge("stratus_orchestrator_leader", "1 when this orchestrator leads.",
               [({}, 1 if view["orchestrator"]["leading"] else 0)]),
        _gauge("stratus_orchestrator_candidates", "Orchestrators in the leader election (this one included).",
               [({}, view["orchestrator"]["candidates"])]),
        _counter("stratus_elections", "Elections recorded in this cluster's history.", [({}, len(elections))]),
        _gauge("stratus_db_last_election_timestamp_seconds", "When the latest election happened (Unix time).",
               [({}, elections[-1]["at"])] if elections and isinstance(elections[-1].get("at"), (int, float)) else []),
        _counter("stratus_scaling_decisions", "Scaling windows ended.", [({}, view["decisions_total"])]),
        _counter("stratus_crash_calls", "crash/master and crash/slave calls that killed a worker.",
                 [({"kind": "master"}, counters.get("crash_master", 0)),
                  ({"kind": "slave"}, counters.get("crash_slave", 0))]),
        _counter("stratus_switchovers", "Planned switchovers.", [({}, counters.get("switchovers", 0))]),
        _counter("stratus_workers_started", "Workers started by this orchestrator.",
                 [({}, counters.get("workers_started", 0))]),
        _counter("stratus_workers_drained", "Slaves drained by scaling down.", [({}, counters.get("workers_drained", 0))]),
        _gauge("stratus_db_master_lsn", "The master's applied LSN: the head of the replication log.",
               [({}, master["applied_lsn"])] if master else []),
        _counter("stratus_db_writes", "Writes acknowledged by the cluster (the master's applied LSN).",
                 [({}, master["applied_lsn"])] if master else []),
        _gauge("stratus_db_worker_info", "1 per live worker, with its role, state and host.",
               [({"worker": w["id"], "role": w["role"], "state": w["state"], "host": w["host"] or ""}, 1)
                for w in workers]),
        _gauge("stratus_db_worker_applied_lsn", "The last LSN each worker has applied.",
               [({"worker": w["id"]}, w["applied_lsn"]) for w in workers]),
        _gauge("stratus_db_worker_lag", "Log entries each worker is behind the master (replication lag).",
               [({"worker": w["id"]}, w["lag"]) for w in workers if w["lag"] is not None]),
        _gauge("stratus_db_worker_ready", "1 when the worker has caught up with the log.",
               [({"worker": w["id"]}, 1 if w["ready"] else 0) for w in workers]),
        _counter("stratus_db_worker_reads", "Reads each worker has taken from readQ since its start.",
                 [({"worker": w["id"]}, w["reads"]) for w in workers]),
    ]
    return out
