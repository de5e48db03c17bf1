"""Choosing a master: the rule itself lives in bus.cluster.choose_master (most
applied LSN among ready slaves, lowest pid breaks a tie); this module picks
the candidate pool the orchestrator hands it."""
from __future__ import annotations

from bus.cluster import Member, Role, State, choose_master


def failover_candidate(members: dict[str, Member], *, exclude: set[str] = frozenset()) -> Member | None:
    """The worker to promote when the master is gone. `members` are the live
    workers; `exclude` holds ids that are leaving (or that failed a promotion)."""
    return choose_master(m for wid, m in members.items() if wid not in exclude)


def switchover_candidate(members: dict[str, Member], master_id: str, *, candidate: str | None = None,
                         exclude: set[str] = frozenset()) -> tuple[Member | None, str]:
    """The worker to hand the master role to in a planned switchover: only a
    ready slave qualifies (it has caught up, so the barrier drains quickly).
    Returns (worker, reason when None)."""
    ready = [m for wid, m in members.items()
             if wid != master_id and wid not in exclude and m.role is Role.SLAVE
             and m.ready and m.state is State.READY]
    if candidate is not None:
        match = [m for m in ready if m.id == candidate]
        if not match:
            return None, f"candidate {candidate!r} is not a ready slave"
        return match[0], ""
    chosen = choose_master(ready)
    return chosen, "" if chosen else "no ready slave to hand the master role to"
