"""The control tick's rules, as pure functions: no ZooKeeper, no runtime, no
clock of their own. The Controller observes the cluster, asks these what to
do, does it, and logs what was decided (the way Patroni's ha.py answers each
cycle with a sentence such as "no action. I am the leader with the lock").

A tick (Controller.reconcile), in order:
  1. observe    the leader record and the live members (live_members):
                membership znodes, plus workers the runtime runs that have not
                registered (yet), minus the dead. Lost workers are killed.
  2. leader     is the named master among them? If not, elect (plan_election).
  3. promotion  has the named master taken over? (check_promotion) A named
                worker that is not master for the leader's term within the
                promotion timeout has failed: it is killed and another elected.
  4. slaves     start or drain slaves towards the scaling target (plan_slaves).
Then the loop saves the scaling state."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from bus.cluster import Leader, Member, Role, State

from .election import failover_candidate

BOOT_GRACE = 60.0         # a started worker must register within this
REREGISTER_GRACE = 10.0   # a slave whose session expired may re-register within this


@dataclass(frozen=True)
class Decision:
    """What one step of a tick decided."""
    action: str                  # none | wait | kill | elect | bootstrap | start_master | failed | start | drain
    text: str                    # the decision in words (logged when a tick's decisions change)
    ids: tuple[str, ...] = ()    # the workers it concerns (elect: the candidate)
    count: int = 0               # start: how many slaves

    def __str__(self) -> str:
        return self.text


class Handle(Protocol):          # what live_members needs of a runtime's WorkerHandle
    pid: int
    started: float


# --- 1. observe ------------------------------------------------------------------------
def live_members(snapshot: dict[str, Member], handles: dict[str, Handle], *, dead, registered: dict[str, float],
                 leader_id: str | None, now: float) -> tuple[dict[str, Member], dict[str, str]]:
    """(live members, lost workers {id: why}).

    `snapshot` holds the membership znodes, `handles` the workers the runtime
    runs, `dead` ids known dead, `registered` when each id's znode was last
    seen. A process the runtime runs whose znode is gone has lost its
    ZooKeeper session: the master among them is lost at once (a master exits
    when its session is lost; if it hangs instead, its term check fails after
    the election), a slave gets REREGISTER_GRACE seconds to come back with a
    new session. A worker that never registers within BOOT_GRACE is lost too.
    Lost workers other than the leader stay in the members (as
    `unregistered`) until the caller removes them."""
    out = {wid: m for wid, m in snapshot.items() if wid not in dead}
    lost: dict[str, str] = {}
    for wid, h in handles.items():
        if wid in dead:
            continue
        if wid in out:
            if h.pid and out[wid].pid != h.pid:
                # In a container the worker sees its own pid namespace: the
                # runtime's host pid is the one crash and list calls report.
                out[wid] = replace(out[wid], pid=h.pid, own_pid=out[wid].pid)
            continue
        last = registered.get(wid)
        if last is None:
            if now - (h.started or now) > BOOT_GRACE:
                lost[wid] = f"did not register within {BOOT_GRACE:g}s"
        elif wid == leader_id or now - last > REREGISTER_GRACE:
            lost[wid] = "lost its ZooKeeper session"
        if wid in lost and wid == leader_id:
            continue
        out[wid] = Member(id=wid, pid=h.pid, role=Role.SLAVE,
                          state=State.STARTING if last is None else State.UNREGISTERED,
                          started=h.started, booting=last is None)
    return out, lost


# --- 2. leader -------------------------------------------------------------------------
def plan_election(old: str | None, members: dict[str, Member], *, exclude: set[str] = frozenset(),
                  cause: str | None = None) -> Decision:
    """Whom to name master when the named one is gone (or failed): `elect`
    an existing worker, or start a new one that replays the log (`bootstrap`
    for a fresh cluster, else `start_master`). The text is the reason
    recorded with the election."""
    if old is None and not members:
        return Decision("bootstrap", "bootstrap: a fresh cluster's first master")
    cause = cause or f"master {old} died"
    cand = failover_candidate(members, exclude=exclude)
    if cand is None:
        return Decision("start_master", f"{cause} and no slave is left: a new worker replays the log")
    return Decision("elect", f"{cause}: {cand.id} has applied LSN {cand.applied_lsn}, the most among "
                             f"{'ready ' if cand.ready else ''}slaves (pid {cand.pid})", ids=(cand.id,))


# --- 3. promotion ----------------------------------------------------------------------
@dataclass(frozen=True)
class Promotion:
    """A naming being watched, on the orchestrator's own monotonic clock."""
    id: str
    term: int
    named_at: float       # when this orchestrator first saw the naming (with the worker registered)
    progress_at: float    # ... or, later, when the worker's applied LSN last grew
    lsn: int


def check_promotion(watch: Promotion | None, leader: Leader, member: Member | None, *, now: float,
                    timeout: float) -> tuple[Promotion | None, Decision]:
    """Has the named leader taken over? Returns the watch to keep and the decision.

    The clock starts when the orchestrator first sees the naming with the
    worker registered (a worker still booting is bounded by BOOT_GRACE), and
    starts again whenever the worker's applied LSN grows: a worker draining a
    long log before its barrier is making progress. `timeout` seconds without
    becoming master for the leader's term, and without progress, is a failure."""
    if leader.id is None or member is None:
        return None, Decision("none", "no named master to watch")
    if member.role is Role.MASTER and member.term >= leader.term:
        return None, Decision("none", f"no action: {member.id} is master for term {leader.term}")
    if member.booting:
        return None, Decision("wait", f"{member.id} is named master for term {leader.term}: waiting for it to register")
    waiting = Decision("wait", f"{member.id} is named master for term {leader.term}: waiting for it to take over")
    if watch is None or (watch.id, watch.term) != (member.id, leader.term):
        return Promotion(member.id, leader.term, now, now, member.applied_lsn), waiting
    if member.applied_lsn > watch.lsn:
        return replace(watch, progress_at=now, lsn=member.applied_lsn), waiting
    if now - watch.progress_at < timeout:
        return watch, waiting
    text = f"{member.id} was named master for term {leader.term} but did not take over in {timeout:g}s"
    if watch.progress_at > watch.named_at:
        text += f" (no progress past LSN {watch.lsn}; named {now - watch.named_at:.0f}s ago)"
    return watch, Decision("failed", text, ids=(member.id,))


# --- 4. slaves -------------------------------------------------------------------------
def plan_slaves(master_id: str, members: dict[str, Member], *, leaving: set[str], target: int) -> Decision:
    """Start slaves up to `target`, or drain the newest ones down to it.
    Workers in `leaving` (draining, retiring) do not count."""
    slaves = {wid: m for wid, m in members.items() if wid != master_id and wid not in leaving}
    master = members.get(master_id)
    n = len(slaves)
    if n < target:
        if master is not None and master.booting:
            return Decision("wait", f"{n} of {target} slave(s): a fresh master first, its slaves once it has registered")
        return Decision("start", f"{n} of {target} slave(s): starting {target - n}", count=target - n)
    if n > target:
        newest = sorted(slaves.values(), key=lambda m: (m.started or 0.0, m.pid), reverse=True)[:n - target]
        return Decision("drain", f"{n} slave(s) for a target of {target}: draining the newest",
                        ids=tuple(m.id for m in newest))
    return Decision("none", f"no action: {n} slave(s), the target")
