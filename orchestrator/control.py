"""The control loop: keeps one master and the target number of slaves alive.

Orchestrators run under a kazoo Election; only the leader acts. The leader
adopts the workers it finds (runtime pid files and membership znodes), then
reacts to:
  - ZooKeeper watches on the workers' membership and on the leader record,
  - the runtime's exit reports (a process exit is seen before the worker's
    ZooKeeper session expires, so a failover starts at once),
  - a periodic reconcile (every RECONCILE_EVERY seconds) as a safety net.
Elections go through bus.cluster.set_leader with the version read, so two
steerers can never both hand out a term (fencing); each is recorded in the
election history. Scaling state lives in ZooKeeper so a standby continues it."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from kazoo.client import KazooState
from kazoo.exceptions import BadVersionError, NoNodeError
from kazoo.recipe.watchers import ChildrenWatch, DataWatch

from bus import registry
from bus import zk as bzk
from bus.cluster import elections, read_leader, record_election, set_leader, workers
from bus.names import Paths
from bus.settings import Settings

from .election import failover_candidate, switchover_candidate
from .runtimes import Runtime, make_runtime
from .scaling import Scaler, ScalingState

log = logging.getLogger("stratus.orchestrator")

RECONCILE_EVERY = 2.0     # safety-net reconcile period (seconds)
SAMPLE_EVERY = 0.5        # how often read counters are summed
DEAD_MEMORY = 60.0        # how long a dead worker id is remembered
BOOT_GRACE = 60.0         # a started worker must register within this
REREGISTER_GRACE = 10.0   # a slave whose session expired may re-register within this
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


class Controller:
    def __init__(self, settings: Settings, runtime: Runtime | None = None, *, port: int | None = None):
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

    # --- lifecycle ---------------------------------------------------------------
    def start(self) -> "Controller":
        self._thread = threading.Thread(target=self._campaign, name="orchestrator-election", daemon=True)
        self._thread.start()
        return self

    def close(self, *, remove_workers: bool = True) -> None:
        """Clean shutdown: stop leading; with remove_workers, stop the workers."""
        log.info("orchestrator stopping (remove_workers=%s)", remove_workers)
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
        while not self.stopping.is_set() and not self.lost.is_set():
            woken = self.wake.wait(SAMPLE_EVERY)
            self.wake.clear()
            if self.stopping.is_set() or self.lost.is_set():
                break
            try:
                snapshot = workers(self.zk, self.paths)
                changed = self._sample(snapshot)
                decided = changed == "decision"
                now = time.monotonic()
                if woken or decided or now - last_reconcile >= RECONCILE_EVERY:
                    self.reconcile(snapshot if not woken else None)
                    last_reconcile = time.monotonic()
                if changed or now - last_save >= 5.0:
                    bzk.put_json(self.zk, self.paths.orchestrator_state, self.scaler.state.to_dict())
                    last_save = now
            except Exception as exc:
                log.warning("control loop: %r", exc)
                self.stopping.wait(0.2)

    def _sample(self, snapshot: dict[str, dict]):
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
    def members(self, snapshot: dict[str, dict] | None = None, *, leader_id: str | None = None,
                act: bool = False) -> dict[str, dict]:
        """Live workers: membership znodes, plus workers the runtime runs that
        have not registered yet, minus those known dead.

        A process the runtime still runs but whose znode is gone has lost its
        ZooKeeper session: the master among them is dead for the election at
        once (a master exits when its session is lost; if it hangs instead, its
        term check fails after the election), a slave gets REREGISTER_GRACE
        seconds to come back with a new session. A worker that never registers
        within BOOT_GRACE is stuck. With `act`, such workers are declared dead
        and killed (only the reconcile loop acts)."""
        snapshot = workers(self.zk, self.paths) if snapshot is None else snapshot
        now = time.time()
        for wid, t in list(self.dead.items()):
            if now - t > DEAD_MEMORY and wid not in snapshot:
                self.dead.pop(wid, None)
        out = {wid: w for wid, w in snapshot.items() if wid not in self.dead}
        for wid in out:
            self._registered[wid] = now
        for wid, h in self.runtime.workers().items():
            if wid in self.dead:
                continue
            if wid in out:
                if h.pid and out[wid].get("pid") != h.pid:
                    # In a container the worker sees its own pid namespace: the
                    # runtime's host pid is the one crash and list calls report.
                    out[wid] = {**out[wid], "pid": h.pid, "own_pid": out[wid].get("pid")}
                continue
            last = self._registered.get(wid)
            if last is None:
                lost = now - (h.started or now) > BOOT_GRACE
                why = f"did not register within {BOOT_GRACE:g}s"
            else:
                lost = wid == leader_id or now - last > REREGISTER_GRACE
                why = "lost its ZooKeeper session"
            if lost and act:
                log.warning("worker %s (pid %d) %s: killing it", wid, h.pid, why)
                self.dead[wid] = now
                self._registered.pop(wid, None)
                try:
                    self.runtime.kill_worker(wid)
                except Exception as exc:
                    log.warning("killing %s failed: %r", wid, exc)
                continue
            if lost and wid == leader_id:
                continue
            out[wid] = {"id": wid, "pid": h.pid, "role": "slave", "state": "starting" if last is None else "unregistered",
                        "term": 0, "applied_lsn": 0, "ready": False, "reads": 0, "started": h.started,
                        "booting": last is None}
        for wid in [w for w, t in self._registered.items() if now - t > DEAD_MEMORY and w not in out]:
            self._registered.pop(wid, None)
        return out

    # --- reconcile -----------------------------------------------------------------
    def reconcile(self, snapshot: dict[str, dict] | None = None) -> None:
        with self.lock:
            if not self.leading:
                return
            leader, version = read_leader(self.zk, self.paths)
            members = self.members(snapshot, leader_id=leader.id, act=True)
            if leader.id is None or leader.id not in members:
                leader = self._elect(leader, version, members)
                if leader is None:
                    return
                members = self.members(leader_id=leader.id)
            self._size_slaves(leader.id, members)

    def _elect(self, leader, version: int, members: dict[str, dict]):
        """The master is gone (or there never was one): name a new one."""
        old = leader.id
        try:
            if old is None and not members:
                wid = new_worker_id()
                term = set_leader(self.zk, self.paths, wid, expected_version=version)
                self._start(wid)
                reason = "bootstrap: a fresh cluster's first master"
            else:
                cand = failover_candidate(members, exclude=self.draining | self.retiring)
                if cand is not None:
                    wid = cand["id"]
                    term = set_leader(self.zk, self.paths, wid, expected_version=version)
                    reason = (f"master {old} died: {wid} has applied LSN {cand.get('applied_lsn', 0)}, "
                              f"the most among {'ready ' if cand.get('ready') else ''}slaves (pid {cand.get('pid')})")
                else:
                    if not self._may_start():
                        log.warning("no master and workers keep dying at start: retrying in up to %.1fs",
                                    self._start_backoff())
                        return None
                    wid = new_worker_id()
                    term = set_leader(self.zk, self.paths, wid, expected_version=version)
                    self._start(wid)
                    reason = f"master {old} died and no slave is left: a new worker replays the log"
        except BadVersionError:
            log.warning("the leader record changed meanwhile; reconciling again")
            self.wake.set()
            return None
        self.counters["elections"] += 1
        record_election(self.zk, self.paths, term=term, old=old, new=wid, reason=reason)
        log.info("election: term %d, master %s -> %s (%s)", term, old, wid, reason)
        leader, _ = read_leader(self.zk, self.paths)
        return leader

    def _size_slaves(self, master_id: str, members: dict[str, dict]) -> None:
        slaves = {wid: w for wid, w in members.items()
                  if wid != master_id and wid not in self.draining and wid not in self.retiring}
        target = min(self.scaler.state.target, self.settings.max_slaves)
        master = members.get(master_id, {})
        if len(slaves) < target:
            if master.get("booting"):
                return  # a fresh master first; its slaves once it is registered
            for _ in range(target - len(slaves)):
                if not self._may_start():
                    log.warning("workers keep dying at start: next start in up to %.1fs", self._start_backoff())
                    return
                self._start(new_worker_id())
        elif len(slaves) > target:
            newest = sorted(slaves.values(), key=lambda w: (float(w.get("started") or 0), int(w.get("pid") or 0)),
                            reverse=True)[:len(slaves) - target]
            for w in newest:
                self._drain(w["id"])

    def _start(self, wid: str) -> None:
        h = self.runtime.start_worker(wid)
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
            pid = int(m["pid"])
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
            victim = max(slaves, key=lambda w: int(w["pid"]))
            pid = int(victim["pid"])
            self._kill(victim["id"], pid)
            self.counters["crash_slave"] += 1
            log.info("crash/slave: killed %s (pid %d)", victim["id"], pid)
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
            if old is None or old.get("role") != "master" or old.get("state") != "master":
                raise ControlError(503, "there is no running master to switch over from")
            cand, why = switchover_candidate(members, leader.id, candidate=candidate,
                                             exclude=self.draining | self.retiring)
            if cand is None:
                raise ControlError(409, why)
            return leader, version, cand

    def _switchover(self, candidate: str | None, timeout: float) -> dict:
        leader, version, cand = self._switchover_plan(candidate)
        new = cand["id"]
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
            lag = int(m.get("applied_lsn", 0)) - int(c.get("applied_lsn", 0))
            if lag <= SWITCHOVER_MAX_LAG:
                break
            if time.monotonic() > deadline:
                raise ControlError(503, f"{new} is still {lag} entries behind the master after "
                                        f"{SWITCHOVER_CATCH_UP:g}s; nothing was changed, try again")
            time.sleep(0.1)
        with self.lock:
            self._require_leader()
            try:
                term = set_leader(self.zk, self.paths, new, expected_version=version)
            except BadVersionError:
                raise ControlError(409, "the master changed meanwhile; try again") from None
            self.retiring.add(leader.id)
            self.counters["elections"] += 1
            self.counters["switchovers"] += 1
            record_election(self.zk, self.paths, term=term, old=leader.id, new=new,
                            reason=f"switchover to {new} (applied LSN {c.get('applied_lsn', 0)}, {lag} behind)")
            log.info("switchover: term %d, master %s -> %s", term, leader.id, new)
        self.wake.set()   # a replacement slave for the old master, at once
        old_id = leader.id
        deadline = time.monotonic() + timeout
        took_over = False
        while time.monotonic() < deadline:
            w = bzk.get_json(self.zk, self.paths.worker(new)) or {}
            if w.get("role") == "master" and int(w.get("term", 0)) >= term:
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
        return sorted(int(w["pid"]) for w in ms.values() if w.get("pid"))

    def cluster_view(self) -> dict:
        leader, _ = read_leader(self.zk, self.paths)
        ms = self.members() if self.leading else workers(self.zk, self.paths)
        state = self.scaler.state if self.leading else \
            ScalingState.from_dict(bzk.get_json(self.zk, self.paths.orchestrator_state))
        master = ms.get(leader.id) if leader.id else None
        master_lsn = int(master.get("applied_lsn", 0)) if master else None
        rows = []
        for wid, w in ms.items():
            lsn = int(w.get("applied_lsn", 0) or 0)
            rows.append({"id": wid, "pid": w.get("pid"), "host": w.get("host"), "role": w.get("role"),
                         "state": w.get("state"), "term": w.get("term"), "applied_lsn": lsn,
                         "lag": None if master_lsn is None else max(0, master_lsn - lsn),
                         "ready": bool(w.get("ready")), "serves_reads": bool(w.get("serves_reads")),
                         "reads": w.get("reads", 0), "leader": wid == leader.id,
                         "draining": wid in self.draining or w.get("state") == "draining"})
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
