"""The contract between workers and whoever steers them (the orchestrator,
or a test harness), kept in ZooKeeper:

  /stratus/{cluster}/workers/{id}   ephemeral, written by each worker:
      {id, pid, host, role, state, term, applied_lsn, ready, reads, serves_reads, started}
      role:  "slave" | "master"
      state: "catching_up" | "ready" | "promoting" | "master" | "draining"
      reads: reads this worker has taken from readQ since it started (the
             orchestrator sums the increases to count reads for scaling)
  /stratus/{cluster}/leader         {id, term}: the worker named here becomes
      master for that term. Terms only grow; set_leader bumps it with a
      compare-and-set so two steerers can never hand out the same term.
  /stratus/{cluster}/elections/e-   sequential history of elections.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from kazoo.client import KazooClient
from kazoo.exceptions import BadVersionError, NodeExistsError, NoNodeError

from .names import Paths
from .zk import children_json


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


def set_leader(zk: KazooClient, paths: Paths, worker_id: str, *, expected_version: int | None = None) -> int:
    """Name a new master with the next term. Returns the new term. Raises
    BadVersionError if someone else changed the leader meanwhile."""
    for _ in range(20):
        current, version = read_leader(zk, paths)
        if expected_version is not None and version != expected_version:
            raise BadVersionError()
        term = current.term + 1
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


def workers(zk: KazooClient, paths: Paths) -> dict[str, dict]:
    return children_json(zk, paths.workers)


def choose_master(candidates: list[dict]) -> dict | None:
    """The replica that has applied the most of the log wins; the lowest pid
    breaks a tie. Ready slaves are preferred; a worker still catching up is
    chosen only when no slave is ready (it drains the log before taking
    writes either way, so no acknowledged write is lost)."""
    pool = [w for w in candidates if w.get("role") == "slave" and w.get("state") != "draining"]
    ready = [w for w in pool if w.get("ready")]
    pool = ready or pool
    if not pool:
        return None
    return min(pool, key=lambda w: (-int(w.get("applied_lsn", 0)), int(w.get("pid", 0))))
