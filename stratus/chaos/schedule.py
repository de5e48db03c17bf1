"""The faults a chaos run injects, and the seeded schedule they play in.

A Fault has a name, `hold` (how long its effect lasts before it is healed),
applies(target) (whether it means anything on this setup: a stream leader
apart from the other broker nodes needs 2 or more of them), inject(target,
rng) -> (detail, heal callable or None). The Target (stratus/chaos/__main__.py
Target) is what faults act on: the test cluster, its servers, its proxies,
and how to find the master, the slaves and the leading orchestrator.

Faults (the names reported):
  kill-master              SIGKILL of the master worker
  kill-slave               SIGKILL of a slave worker
  kill-orchestrator        SIGKILL of the leading orchestrator's process group
                           (a standby takes over; a new standby is started at
                           the heal)
  kill-broker              SIGKILL of a RabbitMQ node (with several, one that
                           does not lead the log stream; with one node, that
                           node: a restart), started again at the heal
  kill-stream-leader       SIGKILL of the node leading the log stream (2+
                           nodes only), started again at the heal
  kill-zookeeper           SIGKILL of a ZooKeeper server (with several, the
                           ensemble's leader on even draws), started again at
                           the heal
  partition-master-zk      the master's links to every ZooKeeper server cut
                           (refused and dropped), its broker links intact
  partition-master-broker  the master's links to every broker node cut, its
                           ZooKeeper links intact
  pause-master             SIGSTOP of the master for longer than its ZooKeeper
                           session (3 x STRATUS_ZK_TIMEOUT, at least 3 s), then
                           SIGCONT
  partition-service-broker the leading orchestrator (the service behind the
                           db routes) cut from every broker node
  swallow-master-zk        the master's ZooKeeper links swallow every byte
                           (open, silent: timeouts instead of resets)
  slow-network             every proxied link delayed by 150 ms each way

Schedule: every applicable fault once, in an order shuffled by the seed;
then, while the run's length allows, faults drawn at random (same seed). A
fault follows the previous one once writes are acknowledged again (bounded)
and a quiet time has passed."""
from __future__ import annotations

import dataclasses
import os
import random
import signal
import time
from typing import Callable


@dataclasses.dataclass
class FaultEvent:
    name: str
    start: float          # run clock, seconds
    heal: float           # when its effect was lifted (== start for an instant fault)
    detail: str = ""

    def as_dict(self) -> dict:
        return {"name": self.name, "start": round(self.start, 3), "heal": round(self.heal, 3), "detail": self.detail}


class NotNow(Exception):
    """The fault has nothing to act on at the moment (no slave yet...)."""


@dataclasses.dataclass
class Fault:
    name: str
    hold: float
    inject: Callable             # (target, rng) -> (detail, heal or None)
    applies: Callable = lambda target: True


def _kill(pid: int, sig=signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def kill_master(t, rng):
    wid, pid = t.master()
    _kill(pid)
    return f"{wid} pid {pid}", None


def kill_slave(t, rng):
    slaves = t.slaves()
    if not slaves:
        raise NotNow("no slave")
    wid, pid = rng.choice(sorted(slaves))
    _kill(pid)
    return f"{wid} pid {pid}", None


def kill_orchestrator(t, rng):
    key, pid = t.leading_orchestrator()
    try:
        os.killpg(os.getpgid(pid), signal.SIGKILL)
    except ProcessLookupError:
        pass
    return f"{key} pid {pid}", lambda: t.start_orchestrator(key)


def _kill_node(t, node):
    pid = node.kill()
    return f"{node.name} pid {pid}", lambda: t.services.bring_back(node)


def kill_broker(t, rng):
    nodes = t.services.brokers
    if len(nodes) == 1:
        return _kill_node(t, nodes[0])
    leader = t.services.stream_leader(t.cluster.names.log_stream)
    others = [n for n in nodes if n is not leader and n.alive()]
    if not others:
        raise NotNow("no broker node but the stream's leader is up")
    return _kill_node(t, rng.choice(others))


def kill_stream_leader(t, rng):
    leader = t.services.stream_leader(t.cluster.names.log_stream)
    if leader is None:
        raise NotNow("the stream's leader cannot be told")
    return _kill_node(t, leader)


def kill_zookeeper(t, rng):
    zks = t.services.zks
    node = zks[0]
    if len(zks) > 1:
        leader = getattr(t.services, "zk_leader", lambda: None)()
        node = leader if (leader is not None and rng.random() < 0.5) else rng.choice(zks)
    return _kill_node(t, node)


def _cut(proxies, pids, kind="cut", **kw):
    """Apply one link fault on every proxy; returns (how many open connections
    it concerns, the heal)."""
    hit = sum(1 for p in proxies for c in p.connections() if pids is None or c in pids)
    rules = [(p, getattr(p, kind)(pids=pids, **kw)) for p in proxies]

    def heal():
        for p, r in rules:
            p.heal(r)
    return hit, heal


def _link_fault(what: str, proxies, pids, kind="cut", **kw):
    hit, heal = _cut(proxies, pids, kind, **kw)
    return f"{what}, {len(proxies)} link(s), {hit} open connection(s)", heal


def partition_master_zk(t, rng):
    wid, pid = t.master()
    return _link_fault(f"{wid} pid {pid} from ZooKeeper", t.zk_proxies, [pid])


def partition_master_broker(t, rng):
    wid, pid = t.master()
    return _link_fault(f"{wid} pid {pid} from the broker", t.broker_proxies, [pid])


def swallow_master_zk(t, rng):
    wid, pid = t.master()
    return _link_fault(f"{wid} pid {pid}", t.zk_proxies, [pid], kind="swallow")


def partition_service_broker(t, rng):
    key, pid = t.leading_orchestrator()
    return _link_fault(f"{key} pid {pid} from the broker", t.broker_proxies, [pid])


def pause_master(t, rng):
    wid, pid = t.master()
    t.paused.add(pid)   # continued at the heal, or by the run's teardown whatever happens
    _kill(pid, signal.SIGSTOP)

    def heal():
        _kill(pid, signal.SIGCONT)
        t.paused.discard(pid)
    return f"{wid} pid {pid}", heal


def slow_network(t, rng):
    proxies = t.broker_proxies + t.zk_proxies + t.service_proxies
    return _link_fault("150 ms each way", proxies, None, kind="delay", ms=150)


def catalog(zk_timeout: float = 1.0) -> list[Fault]:
    pause = max(3.0, 3 * zk_timeout)
    return [
        Fault("kill-master", 0.0, kill_master),
        Fault("kill-slave", 0.0, kill_slave),
        Fault("kill-orchestrator", 2.0, kill_orchestrator),
        Fault("kill-broker", 3.0, kill_broker),
        Fault("kill-stream-leader", 3.0, kill_stream_leader, lambda t: len(t.services.brokers) > 1),
        Fault("kill-zookeeper", 3.0, kill_zookeeper),
        Fault("partition-master-zk", 5.0, partition_master_zk),
        Fault("partition-master-broker", 5.0, partition_master_broker),
        Fault("pause-master", pause, pause_master),
        Fault("partition-service-broker", 4.0, partition_service_broker),
        Fault("swallow-master-zk", 5.0, swallow_master_zk),
        Fault("slow-network", 5.0, slow_network),
    ]


FAULT_NAMES = [f.name for f in catalog()]


def plan(faults: list[Fault], seed: int, seconds: float, *, per_fault: float = 5.0) -> list[Fault]:
    """The order faults play in: each once (shuffled by `seed`), then random
    draws, enough for `seconds` at `per_fault` each (a fault takes 3 to 15 s:
    the run's deadline, not this list, ends a long run)."""
    rng = random.Random(seed)
    order = list(faults)
    rng.shuffle(order)
    n = max(len(order), int(seconds // per_fault)) if seconds > 0 else len(order)
    while len(order) < n:
        order.append(rng.choice(faults))
    return order


def play(target, faults: list[Fault], *, seed: int, clock, deadline: float | None = None, quiet: float = 3.0,
         recover_wait: float = 30.0, on_event=None, log=print) -> list[FaultEvent]:
    """Inject each fault in turn: inject, hold, heal, wait until writes are
    acknowledged again (at most recover_wait), then quiet. Stops early at
    `deadline` (run clock). Returns the events as they happened."""
    rng = random.Random(seed + 1)
    events: list[FaultEvent] = []
    for f in faults:
        if deadline is not None and clock() > deadline:
            log(f"chaos: the run's time is up; {len(events)} faults played")
            break
        detail, heal = None, None
        for _ in range(20):   # a target may be missing for a moment (a slave being replaced)
            try:
                start = clock()
                detail, heal = f.inject(target, rng)
                break
            except NotNow as exc:
                detail = f"skipped: {exc}"
                time.sleep(0.5)
        if detail is not None and detail.startswith("skipped"):
            log(f"chaos: {f.name} {detail}")
            continue
        log(f"chaos: {start:7.2f}s {f.name}: {detail}")
        time.sleep(f.hold)
        if heal is not None:
            try:
                heal()
            except Exception as exc:  # a heal that fails is reported, and the run goes on
                log(f"chaos: healing {f.name} failed: {exc!r}")
                detail = f"{detail}; heal failed: {exc!r}"
        ev = FaultEvent(f.name, start, clock(), detail)
        events.append(ev)
        if on_event is not None:
            on_event(ev)
        target.wait_writes_after(ev.heal, recover_wait)
        time.sleep(quiet)
    return events
