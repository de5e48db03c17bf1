"""The contract between workers and whoever steers them (the orchestrator,
or a test harness), kept in ZooKeeper:

  /stratus/{cluster}/workers/{id}   ephemeral, written by each worker: its Member
      {id, pid, host, role, state, term, applied_lsn, ready, reads, serves_reads, started, reason,
       metrics_host, metrics_port}
      role:  "slave" | "master"                                    (Role)
      state: "catching_up" | "ready" | "promoting" | "master" |    (State)
             "draining" | "diverged"
             diverged: stopped applying (a record failed, or an LSN gap);
             `reason` says why, and the worker exits 77 to be rebuilt
      term:  a slave's highest barrier term seen; a master's own term
      reads: reads this worker has taken from readQ since it started (the
             orchestrator sums the increases to count reads for scaling)
      reason: why the worker is not ready ("" when nothing to say)
      cluster_id: the cluster identity its store holds, read from the log's
             barriers ("" or absent: none yet)
      refused_term: the last term this worker was named master for and
             refused, because the log already held a barrier of that term or
             a newer one from another master (absent when none): the
             orchestrator names it again above the log's term
             (orchestrator/decisions.py check_promotion: "renumber").
      metrics_host, metrics_port: where the worker serves its Prometheus
             /metrics (worker/metrics.py); absent when it serves none. The
             orchestrator's discovery (orchestrator/discovery.py) reads them.
      broker_up: whether the worker has a working broker connection now
             (true once a connection is open and its objects declared, false
             from the moment it is lost); absent (unknown) in records of
             older workers, which the orchestrator never treats as either.
      broker_down_since: wall time the worker lost its broker connection
             (absent while connected); for people: the orchestrator times
             a loss on its own clock (orchestrator/decisions.py
             check_master_broker deposes a master cut off from the broker
             while another replica reaches it).
  /stratus/{cluster}/leader         {id, term}: the worker named here becomes
      master for that term. Terms only grow; set_leader bumps it with a
      compare-and-set so two steerers can never hand out the same term, and
      above every term the caller knows of (`above`: the live workers'
      terms, which come from the log's barriers), so a leader record lost
      with ZooKeeper's state never makes a term go back.
  /stratus/{cluster}/identity       {id, created}: the cluster's identity (Identity).
      Every barrier in the log carries it too ("cluster"), and each worker's
      store keeps the first one it read. A worker finishing a promotion
      checks them: none in ZooKeeper (a fresh cluster, or ZooKeeper lost its
      state) -> it writes its log's (or a new one); a different one -> it
      refuses to take writes, and the orchestrator stops electing, with the
      error (orchestrator/decisions.py check_identity): two histories are
      never joined.
  /stratus/{cluster}/elections/e-   sequential history of elections.
  /stratus/{cluster}/orchestrator/members/{ident}   ephemeral, written by each
      orchestrator (leading or standby): {id, broker_up, broker_down_since}:
      whether its bus client (the one behind the db routes) is connected. A
      leader cut off from the broker while a standby reaches it resigns the
      lead (orchestrator/decisions.py check_service_broker).

Member.from_dict is the one place that parses a membership record (tolerant:
unknown keys are ignored, missing or malformed fields take their defaults, a
role or state this version does not know becomes UNKNOWN) and Member.to_dict
the one place that writes one (the wire keys above)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterable

from kazoo.client import KazooClient
from kazoo.exceptions import BadVersionError, NodeExistsError, NoNodeError

from .names import Paths
from .zk import children_json


class _Wire(str, Enum):
    """A string on the wire: str() and format() give the value."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


class Role(_Wire):
    SLAVE = "slave"
    MASTER = "master"
    UNKNOWN = "unknown"           # a role this version does not know: never chosen for anything


class State(_Wire):
    CATCHING_UP = "catching_up"   # a slave applying the log, not near its head yet
    READY = "ready"               # a slave near the log's head: it serves reads
    PROMOTING = "promoting"       # named leader: draining the log up to its barrier
    MASTER = "master"             # takes writes
    DRAINING = "draining"         # stopping: finishes what it holds, then exits
    DIVERGED = "diverged"         # stopped applying (failed record, LSN gap): exits 77 to be rebuilt
    STARTING = "starting"         # orchestrator only: the runtime runs it, it has not registered yet
    UNREGISTERED = "unregistered"  # orchestrator only: it runs, but its znode is gone (session lost)
    UNKNOWN = "unknown"           # a state this version does not know


def _int(v: Any, default: int = 0) -> int:
    try:
        return int(v) if v is not None and not isinstance(v, bool) else default
    except (TypeError, ValueError):
        return default


def _float(v: Any) -> float | None:
    try:
        return float(v) if v is not None and not isinstance(v, bool) else None
    except (TypeError, ValueError):
        return None


def _enum(cls, v: Any, unknown):
    try:
        return cls(v)
    except ValueError:
        return unknown


@dataclass(frozen=True)
class Member:
    """One worker's membership record."""
    id: str
    pid: int = 0
    host: str | None = None
    role: Role = Role.SLAVE
    state: State = State.CATCHING_UP
    term: int = 0
    applied_lsn: int = 0
    ready: bool = False
    reads: int = 0
    serves_reads: bool = False
    started: float | None = None      # the worker's start (wall clock): with id, identifies one run
    reason: str = ""
    metrics_host: str | None = None   # where the worker's /metrics listens (None: not served)
    metrics_port: int | None = None
    broker_up: bool | None = None     # has a working broker connection (None: not said, an older worker)
    broker_down_since: float | None = None   # wall time the connection was lost (None while up)
    refused_term: int = 0             # a term it was named for and refused: the log held that term or newer
    cluster_id: str = ""              # the cluster identity its store holds (read from the log's barriers)
    # What the orchestrator adds to its own view; never written to ZooKeeper.
    booting: bool = False             # started by the runtime, not registered yet
    own_pid: int | None = None        # the pid the worker reports, when the runtime's differs (containers)

    @classmethod
    def from_dict(cls, d: Any, id: str | None = None) -> "Member":
        """Parse a membership record; `id` is the znode name, used when the
        record has none. Never raises on the record's content."""
        d = d if isinstance(d, dict) else {}
        own = d.get("own_pid")
        mport = _int(d.get("metrics_port"), -1)
        return cls(id=str(d.get("id") or id or ""), pid=_int(d.get("pid")),
                   host=d.get("host") if isinstance(d.get("host"), str) else None,
                   role=_enum(Role, d.get("role", Role.SLAVE.value), Role.UNKNOWN),
                   state=_enum(State, d.get("state", State.CATCHING_UP.value), State.UNKNOWN),
                   term=_int(d.get("term")), applied_lsn=_int(d.get("applied_lsn")),
                   ready=bool(d.get("ready")), reads=_int(d.get("reads")),
                   serves_reads=bool(d.get("serves_reads")), started=_float(d.get("started")),
                   reason=str(d.get("reason") or ""),
                   metrics_host=d.get("metrics_host") if isinstance(d.get("metrics_host"), str) else None,
                   metrics_port=mport if 0 < mport < 65536 else None,
                   broker_up=d["broker_up"] if isinstance(d.get("broker_up"), bool) else None,
                   broker_down_since=_float(d.get("broker_down_since")),
                   refused_term=_int(d.get("refused_term")),
                   cluster_id=d["cluster_id"] if isinstance(d.get("cluster_id"), str) else "", booting=bool(d.get("booting")),
                   own_pid=None if own is None else _int(own))

    def to_dict(self) -> dict:
        """The record as a worker writes it (JSON-able, plain strings)."""
        d = {"id": self.id, "pid": self.pid, "host": self.host, "role": self.role.value,
             "state": self.state.value, "term": self.term, "applied_lsn": self.applied_lsn,
             "ready": self.ready, "reads": self.reads, "serves_reads": self.serves_reads,
             "started": self.started, "reason": self.reason}
        if self.metrics_port is not None:
            d["metrics_host"] = self.metrics_host
            d["metrics_port"] = self.metrics_port
        if self.broker_up is not None:
            d["broker_up"] = self.broker_up
        if self.broker_down_since is not None:
            d["broker_down_since"] = self.broker_down_since
        if self.refused_term:
            d["refused_term"] = self.refused_term
        if self.cluster_id:
            d["cluster_id"] = self.cluster_id
        if self.booting:
            d["booting"] = True
        if self.own_pid is not None:
            d["own_pid"] = self.own_pid
        return d


@dataclass(frozen=True)
class Leader:
    id: str | None
    term: int


def read_leader(zk: KazooClient, paths: Paths) -> tuple[Leader, int]:
    """The current leader record and its znode version (-1 when absent)."""
    try:
        data, stat = zk.get(paths.leader)
    except NoNodeError:
        return Leader(None, 0), -1
    d = json.loads(data) if data else {}
    return Leader(d.get("id"), int(d.get("term", 0))), stat.version


def set_leader(zk: KazooClient, paths: Paths, worker_id: str, *, expected_version: int | None = None,
               above: int = 0) -> int:
    """Name a new master with the next term: above the record's term and
    above `above` (the highest term the caller knows to be in the log).
    Returns the new term. Raises BadVersionError if someone else changed the
    leader meanwhile."""
    for _ in range(20):
        current, version = read_leader(zk, paths)
        if expected_version is not None and version != expected_version:
            raise BadVersionError()
        term = max(current.term, above) + 1
        data = json.dumps({"id": worker_id, "term": term, "at": time.time()}).encode()
        try:
            if version < 0:
                zk.create(paths.leader, data, makepath=True)
            else:
                zk.set(paths.leader, data, version=version)
            return term
        except (BadVersionError, NodeExistsError):
            if expected_version is not None:
                raise BadVersionError() from None
            continue
    raise RuntimeError("could not update the leader record")


@dataclass(frozen=True)
class Identity:
    """The cluster's identity: made once, by the first master of a fresh
    cluster, kept in ZooKeeper and in every barrier of the log."""
    id: str
    created: float = 0.0


def settle_identity(in_zk: str | None, in_log: str, new: str) -> tuple[str | None, str]:
    """The identity a new master takes: (identity, why), or (None, the
    error) when ZooKeeper and the log disagree. `in_log` is what the worker's
    store read from the log's barriers ("" none), `new` a fresh one for a
    fresh cluster."""
    if in_zk and in_log and in_zk != in_log:
        return None, (f"cluster identity mismatch: ZooKeeper holds {in_zk}, the log holds {in_log}: not taking "
                      "writes (two histories are never joined; restore the ZooKeeper state or the log that "
                      "belongs with the other)")
    if in_zk and in_log:
        return in_zk, f"cluster {in_zk}: ZooKeeper and the log agree"
    if in_zk:
        return in_zk, f"cluster {in_zk}: the log had no identity yet, ZooKeeper's is stamped into it"
    if in_log:
        return in_log, f"cluster {in_log}: ZooKeeper holds no identity (its state was lost?), the log's is restored"
    return new, f"cluster {new}: a fresh cluster, a new identity"


def read_identity(zk: KazooClient, paths: Paths) -> Identity | None:
    try:
        data, _ = zk.get(paths.identity)
    except NoNodeError:
        return None
    try:
        d = json.loads(data) if data else {}
    except ValueError:
        d = {}
    ident = d.get("id") if isinstance(d, dict) else None
    return Identity(ident, _float(d.get("created")) or 0.0) if isinstance(ident, str) and ident else None


def claim_identity(zk: KazooClient, paths: Paths, ident: str) -> Identity:
    """The identity ZooKeeper holds, writing `ident` first if it holds none
    (create-only: the first writer wins, and everyone gets the winner)."""
    try:
        zk.create(paths.identity, json.dumps({"id": ident, "created": time.time()}).encode(), makepath=True)
    except NodeExistsError:
        pass
    found = read_identity(zk, paths)
    if found is None:
        raise RuntimeError(f"{paths.identity} holds no readable identity")
    return found


def record_election(zk: KazooClient, paths: Paths, *, term: int, old: str | None, new: str, reason: str) -> None:
    data = json.dumps({"term": term, "old": old, "new": new, "at": time.time(), "reason": reason}).encode()
    zk.create(paths.elections + "/e-", data, sequence=True, makepath=True)


def elections(zk: KazooClient, paths: Paths) -> list[dict]:
    out = []
    try:
        for name in sorted(zk.get_children(paths.elections)):
            data, _ = zk.get(f"{paths.elections}/{name}")
            out.append(json.loads(data))
    except NoNodeError:
        pass
    return out


def workers(zk: KazooClient, paths: Paths) -> dict[str, Member]:
    """The registered workers: {id: Member}."""
    return {name: Member.from_dict(d, name) for name, d in children_json(zk, paths.workers).items()}


def choose_master(candidates: Iterable) -> Any:
    """The replica that has applied the most of the log wins; the lowest pid
    breaks a tie. Ready slaves are preferred; a worker still catching up is
    chosen only when no slave is ready (it drains the log before taking
    writes either way, so no acknowledged write is lost). A draining or
    diverged worker is never chosen. Takes Members (raw records are parsed
    with Member.from_dict) and returns the item it was given."""
    pool = [(c if isinstance(c, Member) else Member.from_dict(c), c) for c in candidates]
    pool = [(m, c) for m, c in pool if m.role is Role.SLAVE and m.state not in (State.DRAINING, State.DIVERGED)]
    ready = [(m, c) for m, c in pool if m.ready]
    pool = ready or pool
    if not pool:
        return None
    return min(pool, key=lambda mc: (-mc[0].applied_lsn, mc[0].pid))[1]
