"""Choosing a master: the rule itself lives in bus.cluster.choose_master (most
applied LSN among ready slaves, lowest pid breaks a tie); this module picks
the candidate pool the orchestrator hands it."""
from __future__ import annotations

from bus.cluster import choose_master


def failover_candidate(members: dict[str, dict], *, exclude: set[str] = frozenset()) -> dict | None:
    """The worker to promote when the master is gone. `members` are the live
    workers ({id: membership data}); `exclude` holds ids that are leaving."""
    pool = [w for wid, w in members.items() if wid not in exclude]
    return choose_master(pool)


def switchover_candidate(members: dict[str, dict], master_id: str, *, candidate: str | None = None,
                         exclude: set[str] = frozenset()) -> tuple[dict | None, str]:
    """The worker to hand the master role to in a planned switchover: only a
    ready slave qualifies (it has caught up, so the barrier drains quickly).
    Returns (worker, reason when None)."""
    ready = [w for wid, w in members.items()
             if wid != master_id and wid not in exclude and w.get("role") == "slave"
             and w.get("ready") and w.get("state") == "ready"]
    if candidate is not None:
        match = [w for w in ready if w.get("id") == candidate]
        if not match:
            return None, f"candidate {candidate!r} is not a ready slave"
        return match[0], ""
    chosen = choose_master(ready)
    return chosen, "" if chosen else "no ready slave to hand the master role to"
