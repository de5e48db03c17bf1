"""The control loop: keeps one master and the target number of slaves alive.

Orchestrators run under a kazoo Election; only the leader acts. The leader
adopts the workers it finds (runtime pid files and membership znodes), then
runs a control tick (reconcile) on:
  - ZooKeeper watches on the workers' membership and on the leader record,
  - the runtime's exit reports (a process exit is seen before the worker's
    ZooKeeper session expires, so a failover starts at once),
  - a periodic reconcile (every RECONCILE_EVERY seconds) as a safety net.
A tick is a sequence of decisions (orchestrator/decisions.py holds the pure
rules): observe -> remove lost workers -> check the cluster identity (the
workers' logs against ZooKeeper's: a mismatch halts the tick) -> check the
leader (elect if it is gone, with a term above every term known) -> check a promotion in progress (a named master that has not taken
over within settings.promotion_timeout, on this orchestrator's own clock, is
killed and another elected) -> check the master's broker (a master cut off
from the broker while another replica reaches it is deposed) -> check the
service's broker (this orchestrator's bus client, behind the db routes, cut
off while a standby's is connected: it resigns the lead) -> size the slaves;
then the loop saves the scaling state.
Every orchestrator, leading or not, publishes whether its bus client is
connected in /stratus/<cluster>/orchestrator/members/<ident> (bus/cluster.py). Each step returns what it decided; a tick's decisions are
logged when they change.
Elections go through bus.cluster.set_leader with the version read, so two
steerers can never both hand out a term (fencing); each is recorded in the
election history. Scaling state lives in ZooKeeper so a standby continues it."""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from kazoo.client import KazooState
from kazoo.exceptions import BadVersionError, NoNodeError
from kazoo.recipe.watchers import ChildrenWatch, DataWatch

from bus import registry
from bus import zk as bzk
from bus.cluster import (Leader, Member, Role, State, elections, read_identity, read_leader, record_election,
                         set_leader, workers)
from bus.names import Paths
from bus.settings import Settings

from . import discovery
from .decisions import (Decision, Promotion, Stranded, check_identity, check_master_broker, check_promotion,
                        check_service_broker, live_members, on_broker, plan_election, plan_slaves, term_floor)
from .election import switchover_candidate
from .runtimes import Runtime, make_runtime
from .scaling import Scaler, ScalingState

log = logging.getLogger("stratus.orchestrator")

RECONCILE_EVERY = 2.0     # safety-net reconcile period (seconds)
SAMPLE_EVERY = 0.5        # how often read counters are summed
WATCH_EVERY = 0.1         # the loop's period while a broker loss is on the clock (decisions.BROKER_LOSS_BOUND)
BUS_STATUS_EVERY = 0.1    # how often this orchestrator's bus client is looked at (and published when changed)
DEAD_MEMORY = 60.0        # how long a dead worker id is remembered
EARLY_EXIT = 10.0         # a worker exiting this soon after its start counts toward start backoff
SWITCHOVER_MAX_LAG = 50   # log entries a switchover candidate may lag when it is named
SWITCHOVER_CATCH_UP = 15.0  # how long a switchover waits for the candidate to get there


class ControlError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def new_worker_id() -> str:
    return f"w-{uuid.uuid4().hex[:8]}"


@dataclass
class TickView:
    """What one control tick sees; steps update it as they act."""
    leader: Leader
    version: int                  # the leader record's znode version (for the compare-and-set)
    members: dict[str, Member]
    lost: dict[str, str]          # workers to kill: id -> why


class Controller:
    def __init__(self, settings: Settings, runtime: Runtime | None = None, *, port: int | None = None,
                 credentials=None, instance_runtime: Runtime | None = None,
                 bus_connected: Callable[[], bool] | None = None):
        self.settings = settings
        self.paths = Paths(settings.cluster)
        self.port = port if port is not None else settings.orchestrator_port
        self.ident = f"{socket.gethostname()}:{self.port}:{os.getpid()}"
        self.runtime = runtime or make_runtime(settings)
        self.runtime.on_exit(self._on_worker_exit)
        # The orchestrator's own session: a little longer than the workers' so a
        # busy machine does not flap leadership; a standby still takes over in seconds.
        self.zk = bzk.connect(settings, timeout=max(2.0, settings.zk_timeout * 2))
        self.zk.add_listener(self._on_zk_state)
        self.lock = threading.RLock()        # serialises every control action
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.lost = threading.Event()
        self.leading = False
        self.lead_since: float | None = None
        self.generation = 0                  # bumps on each leadership; old watches stop
        self.dead: dict[str, float] = {}     # worker id -> when it was seen dead
        self.draining: set[str] = set()      # slaves being scaled down
        self.retiring: set[str] = set()      # old masters after a switchover
        self.scaler = Scaler(settings.scale_window, settings.reads_per_slave, settings.max_slaves)
        self.registration = None
        self.election = None
        self.counters = {"crash_master": 0, "crash_slave": 0, "elections": 0, "switchovers": 0,
                         "workers_started": 0, "workers_drained": 0}
        self._thread: threading.Thread | None = None
        # Crash-loop protection: workers that die soon after their start slow new starts down.
        self._started_at: dict[str, float] = {}
        self._early_exits: list[float] = []
        self._last_start = 0.0
        self._registered: dict[str, float] = {}   # worker id -> last time its znode was seen
        self._switch_lock = threading.Lock()
        self._promotion: Promotion | None = None  # the naming being watched (decisions.check_promotion)
        self._stranded: Stranded | None = None    # a master without its broker (decisions.check_master_broker)
        # This orchestrator's bus client (the db routes'): is it connected? None: not known (no client).
        self._bus_connected = bus_connected
        self._service_lost_at: float | None = None  # decisions.check_service_broker's clock
        self._resigning = False                   # leave the lead at the end of this tick
        self._watched_master: str | None = None   # the named master whose record a DataWatch follows
        self._last_decisions: tuple[str, ...] = ()
        # Tenants' app instances: a controller of their own, leading with this one.
        self.apps = None
        if credentials is not None:
            from .apps.controller import AppController
            self.apps = AppController(settings, self.zk, runtime=instance_runtime or make_runtime(settings, kind="instance"),
                                      credentials=credentials,
                                      leading=lambda: self.leading and not self.lost.is_set())

    # --- lifecycle ---------------------------------------------------------------
    def start(self) -> "Controller":
        self._thread = threading.Thread(target=self._campaign, name="orchestrator-election", daemon=True)
        self._thread.start()
        if self._bus_connected is not None:
            threading.Thread(target=self._publish_bus_status, name="orchestrator-bus-status", daemon=True).start()
        if self.apps is not None:
            self.apps.start()
        return self

    def close(self, *, remove_workers: bool = True) -> None:
        """Clean shutdown: stop leading; with remove_workers, stop the workers."""
        log.info("orchestrator stopping (remove_workers=%s)", remove_workers)
        if self.apps is not None:   # the apps first: they use the database
            try:
                self.apps.close(remove=remove_workers)
            except Exception:
                log.exception("app controller close failed")
        self.stopping.set()
        self.wake.set()
        if self.election is not None:
            try:
                self.election.cancel()
            except Exception:
                pass
        if self._thread is not None:
            self._thread.join(10)
        with self.lock:
            try:
                self.runtime.close(remove_workers=remove_workers)
            except Exception:
                log.exception("runtime close failed")
        try:
            self.zk.stop()
            self.zk.close()
        except Exception:
            pass

    def _campaign(self) -> None:
        while not self.stopping.is_set():
            try:
                self.election = self.zk.Election(self.paths.orchestrators, self.ident)
                log.info("orchestrator %s waiting for leadership", self.ident)
                self.election.run(self._lead)
            except Exception as exc:
                if not self.stopping.is_set():
                    log.warning("orchestrator election interrupted: %r", exc)
            self.stopping.wait(0.5)

    def bus_up(self) -> bool | None:
        """Is this orchestrator's bus client connected? None: it has none."""
        if self._bus_connected is None:
            return None
        try:
            return bool(self._bus_connected())
        except Exception:
            return False

    def _publish_bus_status(self) -> None:
        """Keep /orchestrator/members/<ident> saying whether our bus client is
        connected (bus/cluster.py); a leader reads its standbys' records to
        know whether resigning would help (decisions.check_service_broker)."""
        path = self.paths.orchestrator_member(self.ident)
        last, last_at, down_since = None, 0.0, None
        while not self.stopping.wait(BUS_STATUS_EVERY):
            up = self.bus_up()
            down_since = None if up else (down_since or time.time())
            rec = {"id": self.ident, "broker_up": bool(up), "broker_down_since": down_since}
            if rec != last or time.time() - last_at > 1.0:   # refreshed: re-created after a new session
                try:
                    bzk.put_json(self.zk, path, rec, ephemeral=True)
                    last, last_at = rec, time.time()
                except Exception as exc:
                    log.debug("bus status not published: %r", exc)

    def _on_zk_state(self, state) -> None:
        if state == KazooState.LOST:
            self.lost.set()
            self.wake.set()
        elif state == KazooState.SUSPENDED:
            self.wake.set()

    def _on_worker_exit(self, worker_id: str, code) -> None:
        now = time.time()
        self.dead[worker_id] = now
        started = self._started_at.pop(worker_id, None)
        if (started is not None and now - started < EARLY_EXIT and code not in (0, -9, -15)
                and worker_id not in self.retiring and worker_id not in self.draining):
            self._early_exits.append(now)   # not a drain, a switchover or a crash we were asked for
            log.warning("worker %s exited with %s %.1fs after its start", worker_id, code, now - started)
        self.wake.set()

    def _start_backoff(self) -> float:
        """Seconds to wait between starts: 0 normally, growing while workers
        keep dying right after their start (broker down, broken install...)."""
        now = time.time()
        self._early_exits = [t for t in self._early_exits if now - t < 60]
        n = len(self._early_exits)
        return 0.0 if n < 3 else min(30.0, 0.5 * 2 ** (n - 3))

    def _may_start(self) -> bool:
        backoff = self._start_backoff()
        return backoff == 0 or time.time() - self._last_start >= backoff

    # --- leading -------------------------------------------------------------------
    def _lead(self) -> None:
        self.lost.clear()
        self._promotion = None    # a new leader starts its own promotion clock
        self._stranded = None     # ... and its own broker clocks
        self._service_lost_at = None
        self._resigning = False
        self._watched_master = None
        self.generation += 1
        gen = self.generation
        log.info("orchestrator %s is the leader", self.ident)
        try:
            adopted = self.runtime.adopt()
            if adopted:
                log.info("adopted %d running workers: %s", len(adopted),
                         ", ".join(f"{h.id}/{h.pid}" for h in adopted))
            saved = bzk.get_json(self.zk, self.paths.orchestrator_state)
            self.scaler.state = ScalingState.from_dict(saved)
            if saved is None:
                self.scaler.baseline(workers(self.zk, self.paths))
            self.zk.ensure_path(self.paths.workers)
            self.leading = True
            self.lead_since = time.time()
            ChildrenWatch(self.zk, self.paths.workers, lambda children: self._watch_fired(gen))
            DataWatch(self.zk, self.paths.leader, lambda data, stat, event=None: self._watch_fired(gen))
            self.registration = registry.register(self.zk, self.settings, "orchestrator", self.port,
                                                  extra={"id": self.ident})
            with discovery.running(self):   # Prometheus file service discovery while leading
                self._loop()
        finally:
            self.leading = False
            reg, self.registration = self.registration, None
            if reg is not None:
                reg.close()
                threading.Thread(target=self._unregister_late, args=(reg.path, gen), daemon=True).start()
            log.info("orchestrator %s stopped leading", self.ident)

    def _unregister_late(self, path: str, gen: int) -> None:
        """A registration can be re-created by a session reconnect racing its
        close: make sure a former leader does not stay in the registry."""
        for _ in range(5):
            if self.stopping.wait(1.0):
                return
            if self.leading or self.generation != gen:
                return
            try:
                self.zk.delete(path)
            except NoNodeError:
                pass
            except Exception:
                continue

    def _watch_fired(self, gen: int):
        if gen != self.generation or not self.leading:
            return False  # an older leadership's watch: stop it
        self.wake.set()
        return None

    def _loop(self) -> None:
        last_reconcile = 0.0
        last_save = 0.0
        while not self.stopping.is_set() and not self.lost.is_set() and not self._resigning:
            clock = self._stranded is not None or self._service_lost_at is not None or self.bus_up() is False
            woken = self.wake.wait(WATCH_EVERY if clock else SAMPLE_EVERY)
            self.wake.clear()
            if self.stopping.is_set() or self.lost.is_set():
                break
            try:
                snapshot = workers(self.zk, self.paths)
                changed = self._sample(snapshot)
                decided = changed == "decision"
                now = time.monotonic()
                # A promotion's deadline, and a broker loss (the master's or our
                # own), are checked every turn: a membership record's change
                # fires no watch.
                watching = (self._promotion is not None or clock or self.bus_up() is False
                            or any(m.role is Role.MASTER and m.broker_up is False for m in snapshot.values()))
                if woken or decided or watching or now - last_reconcile >= RECONCILE_EVERY:
                    self.reconcile(snapshot if not woken else None)
                    last_reconcile = time.monotonic()
                if changed or now - last_save >= 5.0:
                    bzk.put_json(self.zk, self.paths.orchestrator_state, self.scaler.state.to_dict())
                    last_save = now
            except Exception as exc:
                log.warning("control loop: %r", exc)
                self.stopping.wait(0.2)

    def _sample(self, snapshot: dict[str, Member]):
        """Count reads; end the window when it is over. Returns False, True
        (counts changed) or "decision"."""
        live = {wid: w for wid, w in snapshot.items() if wid not in self.dead}
        with self.lock:
            added = self.scaler.observe(live, time.time())
            decision = self.scaler.tick(time.time())
        if decision:
            log.info("scaling decision: %d reads in the window %.0f..%.0f -> %d slave(s) (%s, was %d)",
                     decision["reads"], decision["window_start"], decision["window_end"], decision["target"],
                     decision["action"], decision["previous"])
            return "decision"
        return bool(added)

    # --- the view of the cluster ------------------------------------------------------
    def members(self, snapshot: dict[str, Member] | None = None, *,
                leader_id: str | None = None) -> dict[str, Member]:
        """Live workers (decisions.live_members), lost ones included until
        a tick kills them."""
        return self._live(snapshot, leader_id)[0]

    def _live(self, snapshot: dict[str, Member] | None, leader_id: str | None):
        snapshot = workers(self.zk, self.paths) if snapshot is None else snapshot
        now = time.time()
        for wid, t in list(self.dead.items()):
            if now - t > DEAD_MEMORY and wid not in snapshot:
                self.dead.pop(wid, None)
        for wid in snapshot:
            if wid not in self.dead:
                self._registered[wid] = now
        out, lost = live_members(snapshot, self.runtime.workers(), dead=self.dead, registered=self._registered,
                                 leader_id=leader_id, now=now)
        for wid in [w for w, t in self._registered.items() if now - t > DEAD_MEMORY and w not in out]:
            self._registered.pop(wid, None)
        return out, lost

    # --- the control tick ----------------------------------------------------------------
    def reconcile(self, snapshot: dict[str, Member] | None = None) -> list[Decision]:
        """One control tick, as a sequence of decisions (decisions.py):
        observe, remove lost workers, check the leader (elect if it is gone),
        check a promotion in progress (a timeout fails it), check the master's
        broker (deposed when cut off), check our own (resign when cut off),
        size the slaves."""
        with self.lock:
            if not self.leading:
                return []
            view = self._observe(snapshot)
            decisions = [self._remove_lost(view), check_identity(read_identity(self.zk, self.paths), view.members)]
            if decisions[-1].action == "halt":
                if decisions[-1].text not in self._last_decisions:
                    log.error("%s", decisions[-1].text)
                self._log_decisions(decisions)
                return decisions
            decisions.append(self._check_leader(view))
            if view.leader.id in view.members:
                decisions.append(self._check_promotion(view))
            if view.leader.id in view.members:
                decisions.append(self._check_master_broker(view))
            decisions.append(self._check_service_broker())
            if view.leader.id in view.members and not self._resigning:
                decisions.append(self._size_slaves(view))
        self._log_decisions(decisions)
        return decisions

    def _log_decisions(self, decisions: list[Decision]) -> None:
        texts = tuple(d.text for d in decisions)
        if texts != self._last_decisions:
            self._last_decisions = texts
            log.info("tick: %s", "; ".join(texts))

    def _observe(self, snapshot: dict[str, Member] | None) -> TickView:
        leader, version = read_leader(self.zk, self.paths)
        members, lost = self._live(snapshot, leader.id)
        self._follow_master(leader.id)
        return TickView(leader, version, members, lost)

    def _follow_master(self, wid: str | None) -> None:
        """A DataWatch on the named master's record wakes the loop as soon as
        it says it lost the broker (a record's change fires no ChildrenWatch)."""
        if wid is None or wid == self._watched_master:
            return
        self._watched_master = wid
        gen = self.generation

        def changed(data, stat, event=None):
            if gen != self.generation or not self.leading or self._watched_master != wid:
                return False   # another leadership, or another master named since: stop
            try:
                cut = data is not None and Member.from_dict(json.loads(data), wid).broker_up is False
            except ValueError:
                cut = False
            if cut:
                self.wake.set()
            return None
        DataWatch(self.zk, self.paths.worker(wid), changed)

    def _remove_lost(self, view: TickView) -> Decision:
        """Kill the workers that lost their session or never registered."""
        if not view.lost:
            return Decision("none", "no lost workers")
        now = time.time()
        for wid, why in view.lost.items():
            h = self.runtime.workers().get(wid)
            log.warning("worker %s (pid %d) %s: killing it", wid, h.pid if h else 0, why)
            self.dead[wid] = now
            self._registered.pop(wid, None)
            view.members.pop(wid, None)
            try:
                self.runtime.kill_worker(wid)
            except Exception as exc:
                log.warning("killing %s failed: %r", wid, exc)
        return Decision("kill", "killed " + ", ".join(f"{wid} ({why})" for wid, why in view.lost.items()),
                        ids=tuple(view.lost))

    def _check_leader(self, view: TickView) -> Decision:
        """The named master is alive, or a new one is elected."""
        if view.leader.id is not None and view.leader.id in view.members:
            return Decision("none", f"no action: {view.leader.id} holds term {view.leader.term}")
        plan = plan_election(view.leader.id, view.members, exclude=self.draining | self.retiring)
        if plan.action == "wait":
            return plan
        return self._elect(view, plan)

    def _check_promotion(self, view: TickView) -> Decision:
        """A named master that does not take over in time has failed:
        kill it and elect another."""
        self._promotion, d = check_promotion(self._promotion, view.leader, view.members.get(view.leader.id),
                                             now=time.monotonic(), timeout=self.settings.promotion_timeout)
        if d.action == "renumber":
            return self._elect(view, Decision("elect", d.text, ids=d.ids))
        if d.action != "failed":
            return d
        wid = view.leader.id
        log.warning("%s: killing it", d.text)
        self._promotion = None
        self.dead[wid] = time.time()
        view.members.pop(wid, None)
        try:
            self.runtime.kill_worker(wid)
        except KeyError:
            log.warning("%s is not managed by this orchestrator: it is only left out of elections", wid)
        except Exception as exc:
            log.warning("killing %s failed: %r", wid, exc)
        return self._elect(view, plan_election(wid, view.members, exclude=self.draining | self.retiring,
                                               cause=d.text))

    def _check_master_broker(self, view: TickView) -> Decision:
        """A master cut off from the broker while another replica reaches it
        is deposed: killed (its term is fenced anyway), and the most advanced
        replica that reaches the broker elected with a new term."""
        leaving = self.draining | self.retiring
        self._stranded, d = check_master_broker(self._stranded, view.leader, view.members,
                                                now=time.monotonic(), exclude=leaving)
        if d.action != "depose":
            return d
        wid = view.leader.id
        log.warning("%s: deposing it", d.text)
        self._stranded = None
        self._promotion = None
        self.dead[wid] = time.time()
        view.members.pop(wid, None)
        try:
            self.runtime.kill_worker(wid)
        except KeyError:
            log.warning("%s is not managed by this orchestrator: its term is fenced, it exits on its own", wid)
        except Exception as exc:
            log.warning("killing %s failed: %r", wid, exc)
        return self._elect(view, plan_election(wid, on_broker(view.members), exclude=leaving, cause=d.text))

    def _check_service_broker(self) -> Decision:
        """Our bus client (the db routes') cut off while a standby's is
        connected: resign the lead, so that the standby leads and serves."""
        connected = self.bus_up()
        standbys = {} if connected is not False else {
            k: v for k, v in bzk.children_json(self.zk, self.paths.orchestrator_members).items() if k != self.ident}
        self._service_lost_at, d = check_service_broker(self._service_lost_at, connected=connected,
                                                        standbys=standbys, now=time.monotonic())
        if d.action == "resign":
            log.warning("%s", d.text)
            self._resigning = True
            self.wake.set()
        return d

    def _elect(self, view: TickView, plan: Decision) -> Decision:
        """Name the planned master (an existing worker, or a new one), with a
        compare-and-set on the leader record version the tick read."""
        old = view.leader.id
        if plan.action not in ("elect", "bootstrap", "start_master"):
            return plan   # nothing to name (wait)
        if plan.action == "elect":
            wid = plan.ids[0]
        elif plan.action == "start_master" and not self._may_start():
            log.warning("no master and workers keep dying at start: retrying in up to %.1fs", self._start_backoff())
            return Decision("wait", "no master, and workers keep dying at start: backing off")
        else:
            wid = new_worker_id()
        floor, why = term_floor(view.leader, view.members)
        try:
            term = set_leader(self.zk, self.paths, wid, expected_version=view.version, above=floor)
        except BadVersionError:
            log.warning("the leader record changed meanwhile; reconciling again")
            self.wake.set()
            return Decision("wait", "the leader record changed meanwhile: reconciling again")
        if plan.action in ("bootstrap", "start_master"):
            self._start(wid)
        self.counters["elections"] += 1
        record_election(self.zk, self.paths, term=term, old=old, new=wid, reason=plan.text)
        log.info("election: term %d, master %s -> %s (%s; %s)", term, old, wid, plan.text, why)
        view.leader, view.version = read_leader(self.zk, self.paths)
        view.members = self.members(leader_id=view.leader.id)
        return Decision("elect", f"elected {wid} for term {term}: {plan.text}", ids=(wid,))

    def _size_slaves(self, view: TickView) -> Decision:
        target = min(self.scaler.state.target, self.settings.max_slaves)
        d = plan_slaves(view.leader.id, view.members, leaving=self.draining | self.retiring, target=target)
        if d.action == "start":
            for _ in range(d.count):
                if not self._may_start():
                    log.warning("workers keep dying at start: next start in up to %.1fs", self._start_backoff())
                    return Decision("wait", "workers keep dying at start: backing off")
                self._start(new_worker_id())
        for wid in d.ids if d.action == "drain" else ():
            self._drain(wid)
        return d

    def _start(self, wid: str) -> None:
        self.runtime.start_worker(wid)
        self._last_start = self._started_at[wid] = time.time()
        self.counters["workers_started"] += 1

    def _drain(self, wid: str) -> None:
        self.draining.add(wid)
        self.counters["workers_drained"] += 1
        log.info("scaling down: draining slave %s", wid)

        def stop():
            try:
                self.runtime.stop_worker(wid, timeout=10.0)
            finally:
                self.dead.setdefault(wid, time.time())
                self.draining.discard(wid)
                self.wake.set()
        threading.Thread(target=stop, name=f"drain-{wid}", daemon=True).start()

    # --- admin actions -----------------------------------------------------------------
    def _require_leader(self) -> None:
        if not self.leading:
            raise ControlError(503, "this orchestrator is a standby; ask the leading orchestrator")

    def _kill(self, wid: str, pid: int) -> None:
        try:
            self.runtime.kill_worker(wid)
        except KeyError:
            raise ControlError(503, f"worker {wid} (pid {pid}) is not managed by this orchestrator") from None
        self.dead[wid] = time.time()
        self.wake.set()

    def crash_master(self) -> int:
        with self.lock:
            self._require_leader()
            leader, _ = read_leader(self.zk, self.paths)
            m = self.members().get(leader.id) if leader.id else None
            if m is None:
                raise ControlError(409, "there is no master to kill")
            pid = m.pid
            self._kill(leader.id, pid)
            self.counters["crash_master"] += 1
            log.info("crash/master: killed %s (pid %d)", leader.id, pid)
            return pid

    def crash_slave(self) -> int:
        with self.lock:
            self._require_leader()
            leader, _ = read_leader(self.zk, self.paths)
            slaves = [w for wid, w in self.members().items()
                      if wid != leader.id and wid not in self.draining and wid not in self.retiring]
            if not slaves:
                raise ControlError(409, "there is no slave to kill")
            victim = max(slaves, key=lambda w: w.pid)
            pid = victim.pid
            self._kill(victim.id, pid)
            self.counters["crash_slave"] += 1
            log.info("crash/slave: killed %s (pid %d)", victim.id, pid)
            return pid

    def switchover(self, candidate: str | None = None, *, timeout: float = 20.0) -> dict:
        if not self._switch_lock.acquire(blocking=False):
            raise ControlError(409, "a switchover is already in progress")
        try:
            return self._switchover(candidate, timeout)
        finally:
            self._switch_lock.release()

    def _switchover_plan(self, candidate: str | None):
        with self.lock:
            self._require_leader()
            leader, version = read_leader(self.zk, self.paths)
            members = self.members()
            old = members.get(leader.id) if leader.id else None
            if old is None or old.role is not Role.MASTER or old.state is not State.MASTER:
                raise ControlError(503, "there is no running master to switch over from")
            cand, why = switchover_candidate(members, leader.id, candidate=candidate,
                                             exclude=self.draining | self.retiring)
            if cand is None:
                raise ControlError(409, why)
            return leader, version, cand, term_floor(leader, members)[0]

    def _switchover(self, candidate: str | None, timeout: float) -> dict:
        leader, version, cand, floor = self._switchover_plan(candidate)
        new = cand.id
        # A planned switchover waits until the candidate has nearly caught up
        # with the master, so that writes pause only briefly while it drains
        # the log up to its barrier (a "ready" slave can still be far behind).
        deadline = time.monotonic() + SWITCHOVER_CATCH_UP
        lag = None
        while True:
            ws = workers(self.zk, self.paths)
            m, c = ws.get(leader.id), ws.get(new)
            if m is None or c is None:
                raise ControlError(409, "the master or the candidate left meanwhile; try again")
            lag = m.applied_lsn - c.applied_lsn
            if lag <= SWITCHOVER_MAX_LAG:
                break
            if time.monotonic() > deadline:
                raise ControlError(503, f"{new} is still {lag} entries behind the master after "
                                        f"{SWITCHOVER_CATCH_UP:g}s; nothing was changed, try again")
            time.sleep(0.1)
        with self.lock:
            self._require_leader()
            try:
                term = set_leader(self.zk, self.paths, new, expected_version=version, above=floor)
            except BadVersionError:
                raise ControlError(409, "the master changed meanwhile; try again") from None
            self.retiring.add(leader.id)
            self.counters["elections"] += 1
            self.counters["switchovers"] += 1
            record_election(self.zk, self.paths, term=term, old=leader.id, new=new,
                            reason=f"switchover to {new} (applied LSN {c.applied_lsn}, {lag} behind)")
            log.info("switchover: term %d, master %s -> %s", term, leader.id, new)
        self.wake.set()   # a replacement slave for the old master, at once
        old_id = leader.id
        deadline = time.monotonic() + timeout
        took_over = False
        while time.monotonic() < deadline and new not in self.dead:   # dead: its promotion failed
            w = Member.from_dict(bzk.get_json(self.zk, self.paths.worker(new)), new)
            if w.role is Role.MASTER and w.term >= term:
                took_over = True
                break
            time.sleep(0.05)
        # The old master exits once it sees it was superseded; make sure it does.
        while time.monotonic() < deadline and old_id in self.runtime.workers() and old_id not in self.dead:
            time.sleep(0.05)
        if old_id in self.runtime.workers() and old_id not in self.dead:
            log.warning("old master %s did not exit after the switchover: stopping it", old_id)
            self.runtime.stop_worker(old_id, timeout=5.0)
        self.dead.setdefault(old_id, time.time())
        self.retiring.discard(old_id)
        self.wake.set()
        if not took_over:
            raise ControlError(503, f"{new} was named master for term {term} but did not take over in {timeout:g}s")
        return {"old": old_id, "new": new, "term": term}

    # --- views ----------------------------------------------------------------------
    def worker_pids(self) -> list[int]:
        if self.leading:
            ms = self.members()
        else:
            ms = workers(self.zk, self.paths)
        return sorted(w.pid for w in ms.values() if w.pid)

    def cluster_view(self) -> dict:
        leader, _ = read_leader(self.zk, self.paths)
        ms = self.members() if self.leading else workers(self.zk, self.paths)
        state = self.scaler.state if self.leading else \
            ScalingState.from_dict(bzk.get_json(self.zk, self.paths.orchestrator_state))
        master = ms.get(leader.id) if leader.id else None
        master_lsn = master.applied_lsn if master else None
        rows = []
        for wid, w in ms.items():
            rows.append({"id": wid, "pid": w.pid, "host": w.host, "role": w.role.value,
                         "state": w.state.value, "term": w.term, "applied_lsn": w.applied_lsn,
                         "lag": None if master_lsn is None else max(0, master_lsn - w.applied_lsn),
                         "ready": w.ready, "serves_reads": w.serves_reads,
                         "reads": w.reads, "leader": wid == leader.id,
                         "draining": wid in self.draining or w.state is State.DRAINING})
        rows.sort(key=lambda r: (r["role"] != "master", int(r["pid"] or 0)))
        try:
            orchs = sorted(self.zk.get_children(self.paths.orchestrators))
        except NoNodeError:
            orchs = []
        return {
            "cluster": self.settings.cluster,
            "term": leader.term,
            "leader": leader.id,
            "workers": rows,
            "slave_target": min(state.target, self.settings.max_slaves),
            "reads_in_window": state.reads,
            "window_start": state.window_start,
            "window_seconds": self.settings.scale_window,
            "reads_per_slave": self.settings.reads_per_slave,
            "max_slaves": self.settings.max_slaves,
            "last_decision": state.last_decision,
            "decisions": state.decisions,
            "decisions_total": state.decisions_total,
            "elections": elections(self.zk, self.paths),
            "orchestrator": {"id": self.ident, "pid": os.getpid(), "leading": self.leading,
                             "lead_since": self.lead_since, "candidates": len(orchs)},
        }
