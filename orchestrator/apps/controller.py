"""The app controller: makes the running instances match every app's desired
state (desired.py), beside the DB cluster's controller (control.py), in the
same leading orchestrator.

Protocol, per leading orchestrator:
  - On taking the lead it adopts the instances the runtime finds (their
    labels say tenant, app, role, slot and config) and restores their state
    and restart counts from the observed records below: it restarts none.
  - Every tick (TICK seconds, or at once when woken by the API, an exit or a
    health change) it reads every app's desired record and, per role:
      * slot k in 0..instances-1 holds one instance with the role's current
        config (a hash of the role's manifest, the package digest and the
        app's restart counter). An empty slot is filled unless its restart
        backoff is running.
      * an instance with an old config (a new deploy, a restart) is
        replaced one slot at a time, surge first: its successor starts in the
        same slot, and the old one is retired only once the successor is
        running. So a web role with 2 or more instances always has healthy
        instances in the gateway's pool.
      * instances in slots past the count are retired.
    Retiring = leaving the registry first (the gateway stops picking it),
    RETIRE_GRACE seconds for requests in flight, then SIGTERM (kill after
    STOP_TIMEOUT).
  - An instance that exits unasked is restarted in its slot after a backoff
    that doubles from 1 s to at most 60 s while it keeps failing (an
    instance that ran STABLE seconds starts the count again).
  - The health monitor (health.py) probes web instances and watches worker
    heartbeats. The first good probe makes an instance `running` and puts it
    in the registry; 3 failed probes in a row make it `unhealthy`: it leaves
    the registry at once and is replaced.
  - It publishes, for the gateway and the API:
      Paths.service(app_service(t, a, r))/<instance id>   {host, port, health, ...}
                                                          one per running web instance
      Paths.app_route(t, a)          the app's routes (bus/routing.py)
      Paths.app_instances(t, a)      {"roles": {role: [instance records]}}
  - Every change is an event (events.py).
When the app's desired record goes, its routes go first, then its instances.
A controller that stops leading forgets its in-memory state and leaves the
instances running for the next leader.

With a runtime that runs each role as one replicated service (Swarm: its
`replicated` attribute), the slots above are the runtime's: the controller
declares each role and observes its tasks instead (replicated.py); health,
the registry, the published records and the events are the same."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kazoo.exceptions import KazooException, NoNodeError

from bus import routing
from bus import zk as bzk
from bus.names import Paths, app_service
from bus.ports import free_port
from bus.settings import Settings, env_float

from . import AppError
from .desired import App, Desired
from .events import Events
from .manifest import Role
from .packages import Packages

log = logging.getLogger("stratus.orchestrator.apps")

TICK = 0.25               # seconds between reconciles when nothing wakes the loop
RETIRE_GRACE = 0.5        # seconds between leaving the registry and SIGTERM
STOP_TIMEOUT = 10.0       # SIGTERM -> SIGKILL
STABLE = 30.0             # an instance that ran this long resets its slot's backoff
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
SWEEP_EVERY = 8           # ticks between full sweeps of the registry and the route entries

STARTING, RUNNING, UNHEALTHY, EXITED = "starting", "running", "unhealthy", "exited"

# The built-in tenants' web roles keep the ports of platform.md for their
# first instance; further instances take free ports.
BUILTIN_PORTS = {("rideshare", "users"): "users_port", ("rideshare", "rides"): "rides_port",
                 ("toystore", "catalog"): "catalog_port", ("toystore", "order"): "order_port"}
BUILTIN_TENANTS = ("rideshare", "toystore")
# Settings the built-in apps read (their own knobs), passed on when the orchestrator has them.
# Nothing that reaches ZooKeeper: a tenant's instance reaches the broker only (docs/security.md).
BUILTIN_SETTINGS = ("STRATUS_RESTOCK_INTERVAL", "STRATUS_REQUEST_TIMEOUT", "STRATUS_DEBUG")


def role_config(app: App, role: Role) -> str:
    """What an instance was started from: a change replaces it."""
    text = json.dumps({"role": role.to_dict() | {"instances": None}, "digest": app.digest,
                       "restart": app.restart}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def backoff_delay(failures: int) -> float:
    """1, 2, 4 ... 60 s for the 1st, 2nd, 3rd ... failure in a row."""
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, failures - 1))


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


@dataclass
class Inst:
    id: str
    tenant: str
    app: str
    role: str
    kind: str
    slot: int
    config: str
    host: str
    port: int | None
    pid: int
    started: float
    health: str = "/health"
    state: str = STARTING
    restarts: int = 0
    fails: int = 0
    retiring: bool = False
    registered: bool = False
    heartbeat: str | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return self.tenant, self.app, self.role

    def record(self) -> dict:
        return {"id": self.id, "host": self.host, "port": self.port, "pid": self.pid, "state": self.state,
                "restarts": self.restarts, "started": round(self.started, 3), "slot": self.slot}


@dataclass
class Slot:
    failures: int = 0
    not_before: float = 0.0
    restarts: int = 0
    pending_restart: bool = False   # an exit is waiting for its backoff: the next start is a restart
    last_delay: float = 0.0


class AppController:
    def __init__(self, settings: Settings, zk, *, runtime, credentials: Callable[[str], dict],
                 leading: Callable[[], bool], desired: Desired | None = None, events: Events | None = None,
                 packages: Packages | None = None):
        self.settings = settings
        self.zk = zk
        self.paths = Paths(settings.cluster)
        self.runtime = runtime
        self.credentials = credentials
        self.leading = leading
        self.desired = desired or Desired(zk, settings.cluster)
        self.events = events or Events(zk, settings.cluster)
        self.packages = packages or Packages(settings.state_path)
        self.unpacked = settings.cluster_state_path() / "apps"
        self.heartbeats = settings.cluster_state_path() / "heartbeats"
        self.health_interval = env_float("STRATUS_HEALTH_INTERVAL", 2.0)
        self.lock = threading.RLock()
        self.woken = threading.Event()
        self.stopping = threading.Event()
        self.active = False
        self.insts: dict[str, Inst] = {}
        self.slots: dict[tuple[str, str, str, int], Slot] = {}
        self._published: dict[str, str] = {}     # observed path -> json last written
        self._routes: dict[tuple[str, str], str] = {}   # (t, a) -> json of the routes last published
        self._thread: threading.Thread | None = None
        self._ticks = 0
        self.runtime.on_exit(self._on_exit)
        self.replicated = bool(getattr(runtime, "replicated", False))
        from .replicated import ReplicatedRoles
        self.roles = ReplicatedRoles(self)
        from .health import HealthMonitor
        self.monitor = HealthMonitor(self)

    # --- lifecycle -----------------------------------------------------------------
    def start(self) -> "AppController":
        self._thread = threading.Thread(target=self._loop, name="app-controller", daemon=True)
        self._thread.start()
        self.monitor.start()
        return self

    def wake(self) -> None:
        self.woken.set()

    def close(self, *, remove: bool = True) -> None:
        self.stopping.set()
        self.woken.set()
        self.monitor.stop()
        if self._thread is not None:
            self._thread.join(10)
        if remove and self.active:
            with self.lock:
                insts = list(self.insts.values())
            self._unregister_all(insts)
        try:
            self.runtime.close(remove=remove and self.active)
        except Exception:
            log.exception("instance runtime close failed")

    def _loop(self) -> None:
        while not self.stopping.is_set():
            self.woken.wait(TICK)
            self.woken.clear()
            if self.stopping.is_set():
                break
            try:
                if not self.leading():
                    if self.active:
                        self._step_down()
                    continue
                if not self.active:
                    self._take_over()
                self.tick()
            except Exception:
                log.exception("app controller tick failed")
                self.stopping.wait(0.5)

    def _take_over(self) -> None:
        with self.lock:
            self.insts.clear()
            self.slots.clear()
            self._published.clear()
            self._routes.clear()
            self.roles.reset()
            observed = self._observed_records()
            for h in self.runtime.adopt():
                inst = self._from_handle(h, observed.get(h.id))
                if inst is not None:
                    self.insts[inst.id] = inst
            for h in self.runtime.running().values():   # started by us before a step-down
                if h.id not in self.insts:
                    inst = self._from_handle(h, observed.get(h.id))
                    if inst is not None:
                        self.insts[inst.id] = inst
            self.active = True
            self._ticks = 0          # the first tick sweeps
            log.info("app controller leading: %d instances adopted", len(self.insts))

    def _step_down(self) -> None:
        with self.lock:
            self.active = False
            self.insts.clear()
            self.slots.clear()
        log.info("app controller no longer leading; the instances stay for the next leader")

    def _from_handle(self, h, rec: dict | None) -> Inst | None:
        lb = dict(h.labels or {})
        try:
            inst = Inst(id=h.id, tenant=lb["tenant"], app=lb["app"], role=lb["role"], kind=lb.get("kind", "web"),
                        slot=int(lb.get("slot", 0)), config=lb.get("config", ""), host=h.host, port=h.port,
                        pid=h.pid, started=h.started, health=lb.get("health", "/health"),
                        heartbeat=lb.get("heartbeat") or None)
        except (KeyError, ValueError):
            log.warning("instance %s has no app labels; stopping it", h.id)
            threading.Thread(target=self._stop, args=(h.id,), daemon=True).start()
            return None
        if rec:
            inst.restarts = int(rec.get("restarts", 0))
            if rec.get("state") in (RUNNING, UNHEALTHY):
                inst.state = rec["state"]
        slot = self.slots.setdefault((inst.tenant, inst.app, inst.role, inst.slot), Slot())
        slot.restarts = max(slot.restarts, inst.restarts)
        return inst

    def _observed_records(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        try:
            for tenant in self.zk.get_children(self.paths.instances):
                for app in self.zk.get_children(f"{self.paths.instances}/{tenant}"):
                    rec = bzk.get_json(self.zk, self.paths.app_instances(tenant, app)) or {}
                    for insts in (rec.get("roles") or {}).values():
                        for r in insts:
                            out[r.get("id")] = r
        except NoNodeError:
            pass
        return out

    # --- the tick ----------------------------------------------------------------------
    def tick(self) -> list[str]:
        """One reconcile; returns what it decided (for the log and tests)."""
        apps = {(a.tenant, a.name): a for a in self.desired.all()}
        decisions: list[str] = []
        with self.lock:
            if self.replicated:
                decisions += self.roles.reconcile(apps)
            else:
                decisions += self._remove_gone(apps)
                for app in apps.values():
                    decisions += self._reconcile(app)
        # The full sweeps (every registry entry and route entry in ZooKeeper,
        # to remove what no instance or app backs) run every SWEEP_EVERY ticks
        # and on taking the lead; between them only what changed is written.
        self._ticks += 1
        sweep = self._ticks % SWEEP_EVERY == 1
        self._sync_registry(apps, sweep=sweep)
        self._publish(apps, sweep=sweep)
        for d in decisions:
            log.info("apps: %s", d)
        return decisions

    def _remove_gone(self, apps: dict) -> list[str]:
        out = []
        gone = {(i.tenant, i.app) for i in self.insts.values()} - set(apps)
        for t, a in sorted(gone):
            self._remove_route(t, a)
            for inst in [i for i in self.insts.values() if (i.tenant, i.app) == (t, a) and not i.retiring]:
                self._retire(inst, "app deleted")
                out.append(f"{t}/{a}: retire {inst.id} (deleted)")
            for k in [k for k in self.slots if k[:2] == (t, a)]:
                del self.slots[k]
        return out

    def _reconcile(self, app: App) -> list[str]:
        out = []
        now = time.time()
        for name, role in app.manifest.roles.items():
            cfg = role_config(app, role)
            live = [i for i in self.insts.values()
                    if i.key == (app.tenant, app.name, name) and not i.retiring and i.state != EXITED]
            for i in live:
                if i.slot >= role.instances:
                    self._retire(i, "scaled down")
                    out.append(f"{app.tenant}/{app.name}/{name}: retire {i.id} (slot {i.slot} past {role.instances})")
            live = [i for i in live if not i.retiring]
            replacing = any(i.config == cfg and i.state == STARTING
                            and any(o.slot == i.slot and o.config != cfg for o in live) for i in live)
            for slot in range(role.instances):
                here = [i for i in live if i.slot == slot]
                current = [i for i in here if i.config == cfg and i.state != UNHEALTHY]
                old = [i for i in here if i not in current]
                for extra in current[1:]:
                    self._retire(extra, "duplicate")
                current = current[:1]
                if current:
                    if old and (current[0].state == RUNNING or role.kind == "worker"):
                        for o in old:
                            self._retire(o, "replaced")
                            out.append(f"{app.tenant}/{app.name}/{name}: {o.id} replaced by {current[0].id}")
                    continue
                healthy_old = [o for o in old if o.state != UNHEALTHY]
                if healthy_old and replacing:
                    continue     # one rolling replacement at a time per role
                st = self.slots.setdefault((app.tenant, app.name, name, slot), Slot())
                if now < st.not_before:
                    continue
                inst = self._start(app, name, role, slot, cfg, st)
                if inst is not None:
                    out.append(f"{app.tenant}/{app.name}/{name}: start {inst.id} in slot {slot}")
                    if healthy_old:
                        replacing = True
        return out

    # --- starting and stopping -------------------------------------------------------
    def _start(self, app: App, name: str, role: Role, slot: int, cfg: str, st: Slot) -> Inst | None:
        iid = f"i-{uuid.uuid4().hex[:8]}"
        restart = st.pending_restart
        try:
            spec = self._spec(app, name, role, slot, cfg, iid, st.restarts + (1 if restart else 0))
            h = self.runtime.start(spec)
        except Exception as exc:   # a broken package, a missing image, no credentials yet
            why = exc.message if isinstance(exc, AppError) else f"{type(exc).__name__}: {exc}"
            st.failures += 1
            st.last_delay = backoff_delay(st.failures)
            st.not_before = time.time() + st.last_delay
            log.warning("%s/%s/%s slot %d could not start: %s (next try in %gs)", app.tenant, app.name, name,
                        slot, why, st.last_delay)
            self.events.add(app.tenant, "start_failed", app=app.name, role=name, why=why[:300],
                            retry_in=st.last_delay)
            return None
        if restart:
            st.restarts += 1
            st.pending_restart = False
        inst = Inst(id=iid, tenant=app.tenant, app=app.name, role=name, kind=role.kind, slot=slot, config=cfg,
                    host=h.host, port=h.port, pid=h.pid, started=h.started or time.time(), health=role.health,
                    restarts=st.restarts, heartbeat=spec.env.get("STRATUS_HEARTBEAT_FILE"))
        if role.kind == "worker":
            inst.state = RUNNING
        self.insts[iid] = inst
        if restart:
            self.events.add(app.tenant, "restarted", app=app.name, role=name, instance=iid,
                            delay=st.last_delay, restarts=st.restarts)
        else:
            self.events.add(app.tenant, "started", app=app.name, role=name, instance=iid, port=h.port)
        self.monitor.wake()
        return inst

    def _spec(self, app: App, name: str, role: Role, slot: int, cfg: str, iid: str, restarts: int):
        from orchestrator.runtimes.base import Spec
        env = dict(role.env)
        env.update(self.credentials(app.tenant))
        env.update({"STRATUS_CLUSTER": self.settings.cluster, "STRATUS_TENANT": app.tenant,
                    "STRATUS_APP": app.name, "STRATUS_ROLE": name, "STRATUS_INSTANCE": iid,
                    "STRATUS_LOG_LEVEL": self.settings.log_level,
                    # where a web instance listens: this host's loopback, or every
                    # interface of its own container
                    "STRATUS_BIND_HOST": "127.0.0.1" if getattr(self.runtime, "name", "") == "process"
                    else "0.0.0.0"})
        if app.tenant in BUILTIN_TENANTS:
            for key in BUILTIN_SETTINGS:
                if key in os.environ:
                    env[key] = os.environ[key]
        port = None
        if role.kind == "web":
            port = self._port(app.tenant, name, slot)
            env["PORT"] = str(port)
        elif getattr(self.runtime, "name", "") == "process":
            # A heartbeat file the monitor can see: on this host. (A container
            # cannot see the host's path: under Docker, the container's life
            # alone tells.)
            # Its own directory, which the runtime lends the instance (confine.py).
            beat = self.heartbeats / iid / "beat"
            beat.parent.mkdir(parents=True, exist_ok=True)
            beat.unlink(missing_ok=True)
            env["STRATUS_HEARTBEAT_FILE"] = str(beat)
        cwd = context = None
        if app.digest:
            context = str(self._unpacked(app))
            cwd = context
        argv = tuple(role.command) if role.command else ()
        labels = {"tenant": app.tenant, "app": app.name, "role": name, "kind": role.kind, "slot": str(slot),
                  "config": cfg, "health": role.health, "digest": app.digest or "",
                  "heartbeat": env.get("STRATUS_HEARTBEAT_FILE", "")}
        return Spec(id=iid, argv=argv, cwd=cwd, env=env, image=role.image, context=context, port=port,
                    labels=labels, log=f"instances/{app.tenant}/{app.name}/{iid}.log")

    def _port(self, tenant: str, role: str, slot: int) -> int:
        setting = BUILTIN_PORTS.get((tenant, role))
        if self.replicated:   # every task of the role on one port, each at its own address
            from .replicated import ROLE_PORT
            return (getattr(self.settings, setting, 0) if setting else 0) or ROLE_PORT
        if setting and slot == 0:
            fixed = getattr(self.settings, setting, 0)
            if fixed and port_free(fixed):
                return fixed
        return free_port()

    def _unpacked(self, app: App) -> Path:
        dest = self.unpacked / app.tenant / app.name / app.digest.replace(":", "-")
        if not dest.exists():
            self.packages.unpack(app.tenant, app.name, app.digest, dest)
        return dest

    def _retire(self, inst: Inst, why: str) -> None:
        inst.retiring = True
        self._unregister(inst)
        threading.Thread(target=self._stop, args=(inst.id, RETIRE_GRACE), name=f"retire-{inst.id}",
                         daemon=True).start()

    def _stop(self, iid: str, grace: float = 0.0) -> None:
        if grace:
            time.sleep(grace)
        if self.replicated:   # an unhealthy task: the runtime starts another in its slot
            try:
                self.runtime.kill_task(iid)
            except Exception:
                log.exception("killing task %s failed", iid)
            return
        try:
            self.runtime.stop(iid, timeout=STOP_TIMEOUT)
        except KeyError:
            pass
        except Exception:
            log.exception("stopping %s failed", iid)

    def _on_exit(self, iid: str, code) -> None:
        with self.lock:
            inst = self.insts.pop(iid, None)
            if inst is None or not self.active:
                return
            inst.state = EXITED
            self._unregister(inst)
            if inst.heartbeat:
                Path(inst.heartbeat).unlink(missing_ok=True)
            why = getattr(self.runtime, "exit_reason", lambda _id: None)(iid)   # e.g. its memory limit
            self.events.add(inst.tenant, "exited", app=inst.app, role=inst.role, instance=iid, code=code,
                            **({"retired": True} if inst.retiring else {}), **({"why": why} if why else {}))
            if not inst.retiring:
                st = self.slots.setdefault((inst.tenant, inst.app, inst.role, inst.slot), Slot())
                ran = time.time() - inst.started
                st.failures = 1 if ran >= STABLE else st.failures + 1
                st.last_delay = backoff_delay(st.failures)
                st.not_before = time.time() + st.last_delay
                st.pending_restart = True
                log.warning("instance %s (%s/%s/%s) exited with %s after %.1fs; restart in %gs", iid, inst.tenant,
                            inst.app, inst.role, code, ran, st.last_delay)
        self.woken.set()

    # --- health (called by the monitor) ------------------------------------------------
    def mark(self, iid: str, ok: bool, why: str = "", *, fatal: bool = False) -> None:
        """A probe's (or heartbeat check's) outcome; `fatal`: unhealthy at once."""
        with self.lock:
            inst = self.insts.get(iid)
            if inst is None or inst.retiring or not self.active:
                return
            if ok:
                inst.fails = 0
                if inst.state == STARTING:
                    inst.state = RUNNING
                    self._register(inst)
                    self.woken.set()
                return
            inst.fails += 1
            if fatal or (inst.state == RUNNING and inst.fails >= 3):
                inst.state = UNHEALTHY
                self._unregister(inst)
                self.events.add(inst.tenant, "unhealthy", app=inst.app, role=inst.role, instance=iid,
                                why=why[:200])
                log.warning("instance %s unhealthy after %d failed probes (%s): replacing it", iid, inst.fails, why)
                self.events.add(inst.tenant, "replaced", app=inst.app, role=inst.role, instance=iid)
                inst.retiring = True
                st = self.slots.setdefault((inst.tenant, inst.app, inst.role, inst.slot), Slot())
                st.failures += 1
                st.last_delay = backoff_delay(st.failures)
                st.not_before = time.time() + st.last_delay
                st.pending_restart = True
                threading.Thread(target=self._stop, args=(iid, 0.0), daemon=True).start()
                self.woken.set()

    # --- publishing --------------------------------------------------------------------
    def _register(self, inst: Inst) -> None:
        if inst.kind != "web" or inst.port is None:
            return
        path = f"{self.paths.service(app_service(inst.tenant, inst.app, inst.role))}/{inst.id}"
        try:
            bzk.put_json(self.zk, path, {"host": inst.host, "port": inst.port, "health": inst.health,
                                         "service": app_service(inst.tenant, inst.app, inst.role),
                                         "instance": inst.id, "tenant": inst.tenant, "app": inst.app,
                                         "role": inst.role})
            inst.registered = True
        except KazooException as exc:
            log.warning("registering %s failed: %r", inst.id, exc)

    def _unregister(self, inst: Inst) -> None:
        if inst.kind != "web":
            return
        path = f"{self.paths.service(app_service(inst.tenant, inst.app, inst.role))}/{inst.id}"
        try:
            self.zk.delete(path)
        except NoNodeError:
            pass
        except KazooException as exc:
            log.warning("unregistering %s failed: %r", inst.id, exc)
        inst.registered = False

    def _unregister_all(self, insts) -> None:
        for inst in insts:
            self._unregister(inst)

    @staticmethod
    def _listed(inst: Inst | None) -> bool:
        """The registry lists it: a running web instance not being retired."""
        return inst is not None and inst.kind == "web" and inst.state == RUNNING and not inst.retiring

    def _sync_registry(self, apps: dict, *, sweep: bool = True) -> None:
        """The registry holds exactly the running web instances of each app
        (a sweep also removes what a dead leader or a lost write left)."""
        with self.lock:
            want: dict[str, set[str]] = {}
            for i in self.insts.values():
                if self._listed(i):
                    want.setdefault(app_service(i.tenant, i.app, i.role), set()).add(i.id)
                    if not i.registered:
                        self._register(i)
        if not sweep:
            return
        try:
            services = [s for s in self.zk.get_children(self.paths.services) if s.startswith("app.")]
        except NoNodeError:
            services = []
        for svc in services:
            try:
                children = self.zk.get_children(self.paths.service(svc))
            except NoNodeError:
                continue
            for child in children:
                if child in want.get(svc, ()):
                    continue
                # `want` was read before the children: an instance whose first
                # good probe registered it since is running now. Decided under
                # the lock that mark() registers under, so none slips between.
                with self.lock:
                    if self._listed(self.insts.get(child)):
                        continue
                    try:
                        self.zk.delete(f"{self.paths.service(svc)}/{child}")
                    except NoNodeError:
                        pass
            # An entry that went missing under a running instance (removed by
            # a racing sweep of an older release, or by hand) is written again.
            for iid in want.get(svc, set()) - set(children):
                with self.lock:
                    inst = self.insts.get(iid)
                    if self._listed(inst):
                        self._register(inst)

    def _publish(self, apps: dict, *, sweep: bool = True) -> None:
        with self.lock:
            by_app: dict[tuple[str, str], dict] = {k: {} for k in apps}
            for i in sorted(self.insts.values(), key=lambda i: (i.slot, i.started)):
                if (i.retiring and i.state != UNHEALTHY) or (i.tenant, i.app) not in by_app:
                    continue
                by_app[(i.tenant, i.app)].setdefault(i.role, []).append(i.record())
        for (t, a), roles in by_app.items():
            path = self.paths.app_instances(t, a)
            body = json.dumps({"roles": roles}, sort_keys=True)
            if self._published.get(path) != body:
                bzk.put_json(self.zk, path, {"roles": roles, "updated": time.time()})
                self._published[path] = body
        for path in [p for p in self._published
                     if tuple(p.rsplit("/", 2)[-2:]) not in {(t, a) for t, a in apps}]:
            try:
                self.zk.delete(path)
            except NoNodeError:
                pass
            self._published.pop(path, None)
        # Routes: one entry per app with web routes.
        for (t, a), app in apps.items():
            routes = {p: (name, app_service(t, a, name)) for name, r in app.manifest.roles.items()
                      if r.kind == "web" for p in r.routes}
            text = json.dumps(routes, sort_keys=True)
            if self._routes.get((t, a)) != text:
                if routes:
                    routing.publish(self.zk, self.paths, t, a, routes, by="orchestrator")
                else:
                    routing.remove(self.zk, self.paths, t, a)
                self._routes[(t, a)] = text
        if not sweep:
            return
        for key, entry in routing.read_all(self.zk, self.paths).items():
            if entry.get("by") == "orchestrator" and (entry.get("tenant"), entry.get("app")) not in apps:
                routing.remove(self.zk, self.paths, entry["tenant"], entry["app"])
                self._routes.pop((entry["tenant"], entry["app"]), None)

    def _remove_route(self, tenant: str, app: str) -> None:
        try:
            routing.remove(self.zk, self.paths, tenant, app)
        except KazooException as exc:
            log.warning("removing the routes of %s/%s failed: %r", tenant, app, exc)
        self._routes.pop((tenant, app), None)

    # --- views -----------------------------------------------------------------------
    def has_instances(self, tenant: str, app: str) -> bool:
        """Any instance of the app still alive here (retiring ones included)."""
        with self.lock:
            return any((i.tenant, i.app) == (tenant, app) for i in self.insts.values())

