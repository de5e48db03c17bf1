"""The Swarm runtime's logic without an engine: service names, labels, what a
task record says (state, exit code, address), and the app controller's
declare-and-observe rule for replicated roles (orchestrator/apps/replicated.py)
against a small in-memory runtime. The real behaviour (services, tasks,
`docker stack deploy`) is tested in the Docker stage (test_swarm_stack.py)."""
from __future__ import annotations

import threading
import time

import pytest

from orchestrator.apps.controller import EXITED, RUNNING, STARTING, AppController, Inst, Slot, role_config
from orchestrator.apps.desired import App
from orchestrator.apps.manifest import parse
from orchestrator.apps.replicated import ROLE_PORT, ReplicatedRoles, role_unit_id
from orchestrator.runtimes import Spec
from orchestrator.runtimes.swarm import (INSTANCE_TEMPLATE, Task, current_task, role_labels, role_service_name,
                                         task_address, task_container, task_exit_code, task_state)


# --- pure helpers -------------------------------------------------------------------
def test_role_service_names_fit_swarm_and_stay_distinct():
    assert role_service_name("c1", "acme", "shop", "web") == "stratus-c1-acme-shop-web"
    a = role_service_name("c1", "t" * 30, "a" * 30, "web")
    b = role_service_name("c1", "t" * 30, "a" * 30, "jobs")
    assert len(a) <= 63 and len(b) <= 63 and a != b
    assert role_service_name("c1", "acme", "shop", "my_role") == "stratus-c1-acme-shop-my-role"


def test_role_labels_carry_what_the_controller_reads_back():
    spec = Spec(id="r-0123456789ab", argv=("python", "-m", "shop.web"), port=8000,
                labels={"tenant": "acme", "app": "shop", "role": "web"})
    assert role_labels("c1", spec, "cfg1") == {
        "stratus.cluster": "c1", "stratus.kind": "role", "stratus.role_id": "r-0123456789ab",
        "stratus.config": "cfg1", "stratus.port": "8000", "stratus.label.tenant": "acme",
        "stratus.label.app": "shop", "stratus.label.role": "web"}
    assert INSTANCE_TEMPLATE == "{{.Task.ID}}"


TASK = {"ID": "t1", "Slot": 2, "DesiredState": "running", "CreatedAt": "2026-12-04T10:00:00Z",
        "Status": {"State": "running", "ContainerStatus": {"ContainerID": "c1", "PID": 42, "ExitCode": 0}},
        "NetworksAttachments": [{"Network": {"Spec": {"Name": "ingress"}}, "Addresses": ["10.255.0.5/16"]},
                                {"Network": {"Spec": {"Name": "stack-net"}}, "Addresses": ["10.0.1.7/24"]}]}


def test_a_task_record_read():
    assert task_state(TASK) == "running"
    assert task_container(TASK) == "c1"
    assert task_exit_code(TASK) == 0
    assert task_address(TASK, "stack-net") == "10.0.1.7"
    assert task_address(TASK, "other") is None
    dead = {**TASK, "Status": {"State": "failed", "ContainerStatus": {"ExitCode": 137}}}
    assert task_state(dead) == "failed" and task_exit_code(dead) == 137
    assert task_exit_code({"Status": {}}) is None


def test_current_task_prefers_the_live_one_else_the_newest():
    old = {**TASK, "ID": "old", "CreatedAt": "2026-12-04T09:00:00Z",
           "Status": {"State": "failed"}, "DesiredState": "shutdown"}
    assert current_task([old, TASK])["ID"] == "t1"
    newer_dead = {**old, "ID": "newer", "CreatedAt": "2026-12-04T11:00:00Z"}
    assert current_task([old, newer_dead])["ID"] == "newer"
    assert current_task([]) is None


# --- the controller's rule for replicated roles --------------------------------------
class FakeRoles:
    """In memory: a role's service runs `replicas` tasks at once (slots 0..n-1)."""
    name = "swarm"
    replicated = True

    def __init__(self):
        self.services: dict[str, dict] = {}
        self.exits: dict[str, int] = {}
        self.applied: list[tuple[str, int, str]] = []
        self.n = 0
        self.fail = False

    def apply_role(self, spec, replicas, config):
        if self.fail:
            raise RuntimeError("no image")
        self.applied.append((spec.id, replicas, config))
        svc = self.services.get(spec.id)
        if svc is None or svc["config"] != config:
            old = svc["tasks"] if svc else []
            self.services[spec.id] = svc = {"config": config, "port": spec.port, "tasks": [], "env": dict(spec.env)}
            for t in old:
                self.exits[t.id] = 0
            self._fill(spec.id, replicas)
            return "created" if not old else "updated"
        svc["tasks"] = [t for t in svc["tasks"] if t.slot < replicas or self.exits.setdefault(t.id, 0) is None]
        self._fill(spec.id, replicas)
        return f"scaled to {replicas}"

    def _fill(self, rid, replicas):
        svc = self.services[rid]
        have = {t.slot for t in svc["tasks"]}
        for slot in range(replicas):
            if slot not in have:
                self.n += 1
                svc["tasks"].append(Task(id=f"task{self.n}", role_id=rid, slot=slot, host=f"10.0.0.{self.n}",
                                         port=svc["port"], state="running", started=time.time(),
                                         labels={"config": svc["config"]}))

    def crash(self, task_id, code=137):
        for svc in self.services.values():
            for t in list(svc["tasks"]):
                if t.id == task_id:
                    svc["tasks"].remove(t)
                    self.exits[task_id] = code
                    return t.slot

    def restart_slot(self, rid, slot):
        svc = self.services[rid]
        self.n += 1
        svc["tasks"].append(Task(id=f"task{self.n}", role_id=rid, slot=slot, host=f"10.0.0.{self.n}",
                                 port=svc["port"], state="running", started=time.time(),
                                 labels={"config": svc["config"]}))

    def tasks(self):
        return {rid: list(s["tasks"]) for rid, s in self.services.items()}

    def remove_role(self, rid):
        svc = self.services.pop(rid, None)
        for t in (svc or {}).get("tasks", []):
            self.exits[t.id] = 0
        return svc is not None

    def task_exit(self, task_id):
        return self.exits.get(task_id)

    def kill_task(self, task_id):
        return self.crash(task_id) is not None


class Recorder:
    def __init__(self):
        self.events = []

    def add(self, tenant, type_, **fields):
        self.events.append((type_, fields))

    def types(self):
        return [t for t, _ in self.events]


class FakeController:
    """The parts of AppController that ReplicatedRoles uses; _spec and _port are the real ones."""
    _spec = AppController._spec
    _port = AppController._port

    def __init__(self, runtime):
        import dataclasses

        from bus.settings import Settings
        self.settings = dataclasses.replace(Settings(), cluster="c1")
        self.runtime = runtime
        self.replicated = True
        self.insts: dict[str, Inst] = {}
        self.slots: dict = {}
        self.events = Recorder()
        self.unregistered: list[str] = []
        self.routes_removed: list = []
        self.monitor = type("M", (), {"wake": lambda self: None})()
        self.credentials = lambda tenant: {"STRATUS_AMQP_URL": f"amqp://{tenant}:x@rabbitmq/%2F"}
        self.observed: dict[str, dict] = {}     # the instances' records the last leader published

    def _observed_records(self):
        return dict(self.observed)

    def _unregister(self, inst):
        self.unregistered.append(inst.id)

    def _remove_route(self, t, a):
        self.routes_removed.append((t, a))


def shop(instances=2, restart=0, greeting="hi"):
    m = parse({"roles": {"web": {"kind": "web", "command": ["python", "-m", "shop.web"], "instances": instances,
                                 "routes": ["/shop"], "env": {"GREETING": greeting}},
                         "jobs": {"kind": "worker", "command": ["python", "-m", "shop.jobs"], "instances": 1}}})
    return App(tenant="acme", name="shop", manifest=m, digest=None, generation=1, updated=0.0, restart=restart)


def step(roles: ReplicatedRoles, apps):
    roles._looked = 0.0
    return roles.reconcile({(a.tenant, a.name): a for a in apps})


def test_declares_each_role_once_then_observes_its_tasks():
    rt = FakeRoles()
    c = FakeController(rt)
    roles = ReplicatedRoles(c)
    app = shop()
    out = step(roles, [app])
    web, jobs = role_unit_id("acme", "shop", "web"), role_unit_id("acme", "shop", "jobs")
    assert sorted((rid, n) for rid, n, _ in rt.applied) == sorted([(web, 2), (jobs, 1)])
    assert rt.services[web]["port"] == ROLE_PORT and rt.services[web]["env"]["PORT"] == str(ROLE_PORT)
    assert rt.services[web]["env"]["STRATUS_AMQP_URL"].startswith("amqp://acme:")
    web_insts = sorted((i for i in c.insts.values() if i.role == "web"), key=lambda i: i.slot)
    assert [i.slot for i in web_insts] == [0, 1] and all(i.state == STARTING for i in web_insts)
    assert [i.state for i in c.insts.values() if i.role == "jobs"] == [RUNNING]
    assert any("service created" in d for d in out)
    assert "started" not in c.events.types()     # the first look adopts: no events
    # Nothing changed: nothing declared again.
    n = len(rt.applied)
    step(roles, [app])
    assert len(rt.applied) == n


def test_scaling_is_declared_as_replicas_and_new_tasks_are_started_events():
    rt = FakeRoles()
    c = FakeController(rt)
    roles = ReplicatedRoles(c)
    step(roles, [shop(2)])
    step(roles, [shop(3)])
    assert rt.applied[-1][1] == 3
    assert sorted(i.slot for i in c.insts.values() if i.role == "web") == [0, 1, 2]
    assert c.events.types().count("started") == 1
    step(roles, [shop(1)])
    assert sorted(i.slot for i in c.insts.values() if i.role == "web") == [0]
    retired = [f for t, f in c.events.events if t == "exited"]
    assert len(retired) == 2 and all(f.get("retired") for f in retired)


def test_a_crashed_task_is_an_exit_and_its_successor_a_restart():
    rt = FakeRoles()
    c = FakeController(rt)
    roles = ReplicatedRoles(c)
    step(roles, [shop(2)])
    victim = next(i for i in c.insts.values() if i.role == "web" and i.slot == 1)
    rt.crash(victim.id, 137)
    step(roles, [shop(2)])
    assert victim.id not in c.insts and victim.id in c.unregistered
    assert ("exited", {"app": "shop", "role": "web", "instance": victim.id, "code": 137}) in c.events.events
    rt.restart_slot(role_unit_id("acme", "shop", "web"), 1)
    step(roles, [shop(2)])
    restarted = [f for t, f in c.events.events if t == "restarted"]
    assert len(restarted) == 1 and restarted[0]["restarts"] == 1
    assert next(i for i in c.insts.values() if i.role == "web" and i.slot == 1).restarts == 1


def test_a_new_config_is_declared_and_old_tasks_retire():
    rt = FakeRoles()
    c = FakeController(rt)
    roles = ReplicatedRoles(c)
    step(roles, [shop(2)])
    old = {i.id for i in c.insts.values() if i.role == "web"}
    step(roles, [shop(2, greeting="hello")])
    new_cfg = role_config(shop(2, greeting="hello"), shop(2, greeting="hello").manifest.roles["web"])
    assert {i.config for i in c.insts.values() if i.role == "web"} == {new_cfg}
    assert not old & set(c.insts)
    assert all(f.get("retired") for t, f in c.events.events if t == "exited")


def test_a_role_that_cannot_be_declared_backs_off_with_an_event():
    rt = FakeRoles()
    rt.fail = True
    c = FakeController(rt)
    roles = ReplicatedRoles(c)
    step(roles, [shop(2)])
    failed = [f for t, f in c.events.events if t == "start_failed"]
    assert len(failed) == 2 and all(f["retry_in"] == 1.0 for f in failed)
    rt.fail = False
    step(roles, [shop(2)])          # within the backoff: not tried again
    assert not rt.applied
    for rid in roles.not_before:
        roles.not_before[rid] = 0.0
    step(roles, [shop(2)])
    assert len(rt.applied) == 2


def test_a_deleted_app_loses_its_routes_then_its_role_services():
    rt = FakeRoles()
    c = FakeController(rt)
    roles = ReplicatedRoles(c)
    step(roles, [shop(2)])
    out = step(roles, [])
    assert c.routes_removed == [("acme", "shop")]
    assert not rt.services and not c.insts
    assert any("removed" in d for d in out)
    assert all(f.get("retired") for t, f in c.events.events if t == "exited")


def test_a_new_leader_keeps_the_state_the_last_one_published():
    """Taking the lead over running tasks: one the last leader published as
    running stays running (and so in the gateway's pool), with its restarts."""
    rt = FakeRoles()
    first = ReplicatedRoles(FakeController(rt))
    step(first, [shop(2)])
    web = sorted((i for i in first.c.insts.values() if i.role == "web"), key=lambda i: i.slot)
    c = FakeController(rt)
    c.observed = {web[0].id: {"id": web[0].id, "state": RUNNING, "restarts": 2}}
    step(ReplicatedRoles(c), [shop(2)])
    assert c.insts[web[0].id].state == RUNNING and c.insts[web[0].id].restarts == 2
    assert c.insts[web[1].id].state == STARTING        # not published as running: probed first
    assert not c.events.events                         # adopted: no events
