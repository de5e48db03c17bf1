"""The app controller's path for a runtime that runs each role as ONE
replicated service (STRATUS_RUNTIME=swarm: orchestrator/runtimes/swarm.py,
`SwarmRoles`). There the runtime, not the controller, owns the instances:
it places them, restarts one that exits, rolls a new config out (new task
first) and removes tasks when scaled down. The controller declares and
observes.

Per tick (at most every LOOK seconds):
  declare   for each role of each app: apply_role(spec, instances, config)
            when (config, instances) differs from what was last applied;
            a role that cannot be declared (a package that does not build,
            no image) backs off 1, 2, 4 ... 60 s, with a start_failed event.
  remove    a role service that no app's manifest names any more (a deleted
            app, a role dropped by a new manifest) is removed; a deleted app's
            routes go first.
  observe   tasks() -> one Inst per running task: id = the task's id, slot =
            its slot, host = its address, port = the role's. A new task is
            `starting` (web: until the first good probe puts it in the
            registry) or `running` (worker roles); on taking the lead, a task
            keeps the state and restart count the last leader published; a task that is gone leaves
            the registry and, when its slot is still wanted with the same
            config, counts as an exit (event `exited` with the container's
            exit code; the next task in that slot is a `restarted`). A task
            retired by a scale-down or a rolling update is `exited` with
            `retired`.
  unhealthy 3 failed probes: out of the registry at once, and the task's
            container is killed (kill_task): Swarm starts another in its slot.

Known limits (docs/apps.md): the runtime stops a retired task before the
controller sees it go, so the gateway can pick it for up to LOOK seconds
after (a connection refused, which the gateway retries on another instance
for idempotent requests); restarts follow Swarm's fixed 1 s delay, not the
1 ... 60 s backoff of the other runtimes."""
from __future__ import annotations

import hashlib
import logging
import time

from . import AppError
from .desired import App
from .manifest import Role

log = logging.getLogger("stratus.orchestrator.apps")

LOOK = 0.5               # seconds between looks at the runtime's tasks
ROLE_PORT = 8000         # a web role's port in its tasks (each task has its own address)


def role_unit_id(tenant: str, app: str, role: str) -> str:
    """The unit id of a role's service: r-<12 hex of tenant/app/role>."""
    return "r-" + hashlib.sha256(f"{tenant}/{app}/{role}".encode()).hexdigest()[:12]


class ReplicatedRoles:
    def __init__(self, controller):
        self.c = controller
        self.applied: dict[str, tuple[str, int]] = {}     # role unit id -> (config, replicas) applied
        self.not_before: dict[str, float] = {}
        self.failures: dict[str, int] = {}
        self._looked = 0.0
        self._first = True          # the first look after taking the lead: tasks found are adopted, no events

    def reset(self) -> None:
        self.applied.clear()
        self.not_before.clear()
        self.failures.clear()
        self._looked = 0.0
        self._first = True

    def reconcile(self, apps: dict) -> list[str]:
        now = time.time()
        if now - self._looked < LOOK:
            return []
        self._looked = now
        c = self.c
        from .controller import backoff_delay, role_config
        want: dict[str, tuple[App, str, Role, str]] = {}
        for app in apps.values():
            for name, role in app.manifest.roles.items():
                want[role_unit_id(app.tenant, app.name, name)] = (app, name, role, role_config(app, role))
        out: list[str] = []
        gone_apps = {(i.tenant, i.app) for i in c.insts.values()} - set(apps)
        for t, a in sorted(gone_apps):
            c._remove_route(t, a)
            for inst in [i for i in c.insts.values() if (i.tenant, i.app) == (t, a)]:
                inst.retiring = True
                c._unregister(inst)
            out.append(f"{t}/{a}: deleted, its roles go")

        tasks = c.runtime.tasks()
        for rid in set(self.applied) - set(tasks):
            self.applied.pop(rid, None)          # its service went: declare it again
        for rid, (app, name, role, cfg) in want.items():
            if self.applied.get(rid) == (cfg, role.instances) or now < self.not_before.get(rid, 0.0):
                continue
            try:
                spec = c._spec(app, name, role, 0, cfg, rid, 0)
                did = c.runtime.apply_role(spec, role.instances, cfg)
            except Exception as exc:
                why = exc.message if isinstance(exc, AppError) else f"{type(exc).__name__}: {exc}"
                n = self.failures[rid] = self.failures.get(rid, 0) + 1
                delay = backoff_delay(n)
                self.not_before[rid] = now + delay
                log.warning("%s/%s/%s could not be declared: %s (next try in %gs)", app.tenant, app.name, name, why,
                            delay)
                c.events.add(app.tenant, "start_failed", app=app.name, role=name, why=why[:300], retry_in=delay)
                continue
            self.failures.pop(rid, None)
            self.applied[rid] = (cfg, role.instances)
            if did:
                out.append(f"{app.tenant}/{app.name}/{name}: service {did} ({role.instances} replicas)")
        for rid in set(tasks) - set(want):
            if c.runtime.remove_role(rid):
                out.append(f"role service {rid} removed (no app names it)")
        if out:
            tasks = c.runtime.tasks()      # what was just declared, as it stands now
        out += self._observe(want, tasks)
        self._first = False
        return out

    def _observe(self, want: dict, tasks: dict) -> list[str]:
        from .controller import EXITED, RUNNING, UNHEALTHY, Inst, Slot
        c = self.c
        out: list[str] = []
        live: set[str] = set()
        # Taking the lead: a task the last leader saw running keeps its state
        # (and stays in the registry) rather than starting over as `starting`.
        observed = c._observed_records() if self._first else {}
        for rid, ts in tasks.items():
            if rid not in want:
                continue
            app, name, role, cfg = want[rid]
            for t in ts:
                if role.kind == "web" and not t.host:
                    continue       # no address on the network yet
                live.add(t.id)
                if t.id in c.insts:
                    continue
                inst = Inst(id=t.id, tenant=app.tenant, app=app.name, role=name, kind=role.kind, slot=t.slot,
                            config=t.labels.get("config", ""), host=t.host or "", port=t.port, pid=t.pid,
                            started=t.started, health=role.health)
                if role.kind == "worker":
                    inst.state = RUNNING
                rec = observed.get(t.id)
                if rec and rec.get("state") in (RUNNING, UNHEALTHY):
                    inst.state = rec["state"]
                st = c.slots.setdefault((app.tenant, app.name, name, t.slot), Slot())
                if rec:
                    st.restarts = max(st.restarts, int(rec.get("restarts", 0)))
                if st.pending_restart:
                    st.restarts += 1
                    st.pending_restart = False
                    c.events.add(app.tenant, "restarted", app=app.name, role=name, instance=t.id,
                                 restarts=st.restarts)
                elif not self._first:
                    c.events.add(app.tenant, "started", app=app.name, role=name, instance=t.id, port=t.port)
                inst.restarts = st.restarts
                c.insts[t.id] = inst
                out.append(f"{app.tenant}/{app.name}/{name}: task {t.id[:12]} in slot {t.slot}")
                c.monitor.wake()
        for iid, inst in list(c.insts.items()):
            if iid in live:
                continue
            c.insts.pop(iid, None)
            c._unregister(inst)
            rid = role_unit_id(inst.tenant, inst.app, inst.role)
            wanted = want.get(rid)
            unasked = (wanted is not None and not inst.retiring and inst.slot < wanted[2].instances
                       and inst.config == wanted[3])
            code = c.runtime.task_exit(iid)
            inst.state = EXITED
            c.events.add(inst.tenant, "exited", app=inst.app, role=inst.role, instance=iid, code=code,
                         **({} if unasked else {"retired": True}))
            if unasked or inst.retiring and wanted is not None:
                st = c.slots.setdefault((inst.tenant, inst.app, inst.role, inst.slot), Slot())
                st.pending_restart = True
            out.append(f"{inst.tenant}/{inst.app}/{inst.role}: task {iid[:12]} gone ({code})")
        return out
