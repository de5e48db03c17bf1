"""The control tick's rules, as pure functions: no ZooKeeper, no runtime, no
clock of their own. The Controller observes the cluster, asks these what to
do, does it, and logs what was decided (the way Patroni's ha.py answers each
cycle with a sentence such as "no action. I am the leader with the lock").

A tick (Controller.reconcile), in order:
  1. observe    the leader record and the live members (live_members):
                membership znodes, plus workers the runtime runs that have not
                registered (yet), minus the dead. Lost workers are killed.
  1b. identity do the workers' logs carry the cluster identity ZooKeeper
                holds? (check_identity) If not, `halt`: nothing more is done
                this tick (no election joins two histories).
  2. leader     is the named master among them? If not, elect (plan_election),
                with a term above every term known (term_floor: the leader
                record's and the workers', which they read from the log), so
                a term never goes back, even after ZooKeeper lost its state.
  3. promotion  has the named master taken over? (check_promotion) A named
                worker that is not master for the leader's term within the
                promotion timeout has failed: it is killed and another elected.
                One that refused its term (the log already held it) is named
                again above the log's term (renumber).
  4. broker     is the master in office cut off from the broker while another
                replica reaches it? (check_master_broker) Past
                BROKER_LOSS_BOUND on the orchestrator's own clock it is
                deposed: killed, and the most advanced replica that reaches
                the broker elected (a new term: the usual fencing and barrier).
  5. service    is this orchestrator's own bus client (the db routes) cut off
                while a standby's is connected? (check_service_broker) Past
                the same bound it resigns the lead, and the standby serves.
  6. slaves     start or drain slaves towards the scaling target (plan_slaves).
Then the loop saves the scaling state.

Steps 4 and 5 never act while nobody reaches the broker (a broker outage:
every connection is down, and an election or a hand-over would only churn),
and their clock runs only while the condition holds, so it starts again when
the broker comes back and the replicas reconnect one after the other."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from bus.cluster import Identity, Leader, Member, Role, State

from .election import failover_candidate

BOOT_GRACE = 60.0         # a started worker must register within this
REREGISTER_GRACE = 10.0   # a slave whose session expired may re-register within this
BROKER_LOSS_BOUND = 1.0   # a master (or the leading orchestrator) cut off from the broker this long, while
                          # another replica (a standby) reaches it, is deposed (resigns). Workers and bus
                          # clients retry their connection at least every 0.5 s, so after a broker restart
                          # each is back well within this, and nobody is deposed for having been slower.


@dataclass(frozen=True)
class Decision:
    """What one step of a tick decided."""
    action: str                  # none | wait | kill | halt | elect | bootstrap | start_master | failed |
                                 # renumber | depose | resign | start | drain
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
    unregistered = sorted(wid for wid, m in members.items() if m.state is State.UNREGISTERED)
    if old is None and unregistered:
        # No leader record, yet workers run: ZooKeeper lost its state (or was
        # restored from an old backup). Their records (terms read from the
        # log, applied LSNs) are what an election rests on: wait for them.
        return Decision("wait", f"no leader record and {len(unregistered)} running worker(s) not registered "
                                f"again ({', '.join(unregistered)}): waiting for their records before electing")
    cause = cause or (f"master {old} died" if old is not None else "no leader record (ZooKeeper lost its state)")
    cand = failover_candidate(members, exclude=exclude)
    if cand is None:
        return Decision("start_master", f"{cause} and no slave is left: a new worker replays the log")
    return Decision("elect", f"{cause}: {cand.id} has applied LSN {cand.applied_lsn}, the most among "
                             f"{'ready ' if cand.ready else ''}slaves (pid {cand.pid})", ids=(cand.id,))


def check_identity(identity: Identity | None, members: dict[str, Member]) -> Decision:
    """Do the workers' logs belong to the cluster ZooKeeper knows? A worker
    whose store read another identity from the log (the log of another
    cluster, or ZooKeeper restored from another cluster's backup) means two
    histories: `halt` (no election, no new master) with the error, rather
    than join them. None known on either side is no mismatch."""
    if identity is None:
        return Decision("none", "no cluster identity in ZooKeeper yet: the next master writes its log's")
    other = sorted((m.id, m.cluster_id) for m in members.values() if m.cluster_id and m.cluster_id != identity.id)
    if other:
        wid, theirs = other[0]
        return Decision("halt", f"cluster identity mismatch: ZooKeeper holds {identity.id}, the log of worker {wid} "
                                f"holds {theirs}: electing no master (restore the ZooKeeper state or the log that "
                                "belongs with the other)", ids=tuple(w for w, _ in other))
    return Decision("none", f"no action: cluster {identity.id}")


def term_floor(leader: Leader, members: dict[str, Member]) -> tuple[int, str]:
    """(the highest term known, why): a term handed out must be above it.
    The leader record's term is not enough: after ZooKeeper lost its state
    (an empty data directory, an old backup) the record is gone or behind
    while the log holds newer barriers. Every worker reports the highest
    barrier term it has read from the log (a master its own term), and one
    that refused a term says so; the next term is above all of them. A term
    in the log that no live worker has read is found by the worker named
    for a lower one: it refuses (refused_term), and check_promotion renumbers."""
    best, who = leader.term, "the leader record"
    for m in sorted(members.values(), key=lambda m: m.id):
        t = max(m.term, m.refused_term)
        if t > best:
            best, who = t, f"worker {m.id}"
    if best == 0:
        return 0, "no term known yet: the next is 1"
    return best, f"the highest term known is {best} ({who}): the next is above it"


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
    becoming master for the leader's term, and without progress, is a failure.
    A named worker that refused the term (the log already holds it or a newer
    one: refused_term) is `renumber`ed: named again with a term above the log's."""
    if leader.id is None or member is None:
        return None, Decision("none", "no named master to watch")
    if member.role is Role.MASTER and member.term >= leader.term:
        return None, Decision("none", f"no action: {member.id} is master for term {leader.term}")
    if member.booting:
        return None, Decision("wait", f"{member.id} is named master for term {leader.term}: waiting for it to register")
    if member.role is Role.SLAVE and member.refused_term >= leader.term:
        return None, Decision("renumber", f"{member.id} refused term {leader.term}: the log already holds term "
                                          f"{max(member.term, member.refused_term)}; naming it again above that",
                              ids=(member.id,))
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


# --- 4. broker: the master ------------------------------------------------------------
@dataclass(frozen=True)
class Stranded:
    """A master in office seen without its broker while another replica has
    one, since `since` (the orchestrator's own monotonic clock)."""
    id: str
    term: int
    since: float


def on_broker(members: dict[str, Member]) -> dict[str, Member]:
    """The members that say they have a working broker connection now (an
    older worker that does not say is not counted)."""
    return {wid: m for wid, m in members.items() if m.broker_up is True}


def check_master_broker(watch: Stranded | None, leader: Leader, members: dict[str, Member], *, now: float,
                        bound: float = BROKER_LOSS_BOUND,
                        exclude: set[str] = frozenset()) -> tuple[Stranded | None, Decision]:
    """Is the master in office cut off from the broker while a replica it
    could hand over to reaches it? Returns the watch to keep and the decision:
    `depose` (ids: the master) once that has lasted `bound` seconds.

    Only a master that has taken over for the leader's term is judged (one
    still promoting is on the promotion clock). Nothing is decided while no
    other replica (a slave not in `exclude`, not draining or diverged) reaches
    the broker: that is a broker outage, which an election cannot cure."""
    master = members.get(leader.id) if leader.id is not None else None
    if master is None or master.role is not Role.MASTER or master.term < leader.term:
        return None, Decision("none", "no master in office to judge")
    if master.broker_up is not False:
        return None, Decision("none", f"no action: {master.id} reaches the broker")
    others = {wid: m for wid, m in on_broker(members).items() if wid != master.id}
    cand = failover_candidate(others, exclude=exclude)
    if cand is None:
        return None, Decision("wait", f"{master.id} has lost the broker, and no replica reaches it: "
                                      "a broker outage, no election")
    if watch is None or (watch.id, watch.term) != (master.id, leader.term):
        watch = Stranded(master.id, leader.term, now)
    if now - watch.since < bound:
        return watch, Decision("wait", f"{master.id} has lost the broker and {cand.id} reaches it: "
                                       f"deposing it after {bound:g}s")
    return watch, Decision("depose", f"master {master.id} has been cut off from the broker for "
                                     f"{now - watch.since:.1f}s while {cand.id} reaches it", ids=(master.id,))


# --- 5. broker: the service behind the db routes ---------------------------------------
def check_service_broker(since: float | None, *, connected: bool | None, standbys: dict[str, dict], now: float,
                         bound: float = BROKER_LOSS_BOUND) -> tuple[float | None, Decision]:
    """Should the leading orchestrator resign because its bus client (the
    db routes') is cut off from the broker while a standby's is connected?
    `connected` is the leader's own client (None: it has none); `standbys`
    the other orchestrators' records {ident: {"broker_up": ...}}. Returns
    when the condition was first seen (the orchestrator's own monotonic
    clock; None when it does not hold) and the decision: `resign` once it has
    held `bound` seconds."""
    if connected is not False:
        return None, Decision("none", "no action: the db routes reach the broker")
    up = sorted(ident for ident, rec in standbys.items() if isinstance(rec, dict) and rec.get("broker_up") is True)
    if not up:
        return None, Decision("wait", "the db routes have lost the broker, and no standby reaches it: staying")
    since = now if since is None else since
    if now - since < bound:
        return since, Decision("wait", f"the db routes have lost the broker and standby {up[0]} reaches it: "
                                       f"resigning after {bound:g}s")
    return since, Decision("resign", f"the db routes have been cut off from the broker for {now - since:.1f}s "
                                     f"while standby {up[0]} reaches it: resigning the lead", ids=tuple(up))


# --- 6. slaves -------------------------------------------------------------------------
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
