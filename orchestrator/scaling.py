"""The scaling rule (rideshare.md "Scaling rule"), as pure logic.

Reads are counted from the workers' cumulative `reads` counters: the
increase of each counter since it was last seen (a worker id never seen
before counts from 0). Counting starts at the first read; windows of
`window` seconds then follow each other, and at the end of each the slave
target becomes min(max_slaves, max(1, ceil(reads / reads_per_slave))) and the
count starts again from zero. The whole state is a JSON-able dict, kept in
ZooKeeper so a standby orchestrator continues it."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from bus.cluster import Member

MAX_DECISIONS = 20


def slaves_for(reads: int, reads_per_slave: int, max_slaves: int) -> int:
    return min(max_slaves, max(1, math.ceil(reads / max(1, reads_per_slave))))


@dataclass
class ScalingState:
    target: int = 1
    window_start: float | None = None   # wall clock; None until the first read
    reads: int = 0                       # reads counted in the current window
    seen: dict = field(default_factory=dict)   # worker id -> [started, reads] last seen
    last_decision: dict | None = None
    decisions: list = field(default_factory=list)
    decisions_total: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "ScalingState":
        s = cls()
        if not isinstance(d, dict):
            return s
        s.target = int(d.get("target", 1) or 1)
        s.window_start = d.get("window_start")
        s.reads = int(d.get("reads", 0) or 0)
        s.seen = {k: list(v) for k, v in (d.get("seen") or {}).items()}
        s.last_decision = d.get("last_decision")
        s.decisions = list(d.get("decisions") or [])[-MAX_DECISIONS:]
        s.decisions_total = int(d.get("decisions_total", 0) or 0)
        return s


class Scaler:
    def __init__(self, window: float, reads_per_slave: int, max_slaves: int, state: ScalingState | None = None):
        self.window = float(window)
        self.reads_per_slave = int(reads_per_slave)
        self.max_slaves = int(max_slaves)
        self.state = state or ScalingState()

    def baseline(self, workers: dict[str, Member]) -> None:
        """Take the current counters as seen without counting them (a fresh
        orchestrator that finds a running cluster and no saved state)."""
        for wid, w in workers.items():
            self.state.seen[wid] = [w.started, w.reads]

    def observe(self, workers: dict[str, Member], now: float) -> int:
        """Count the increase of every worker's counter; returns the reads added."""
        added = 0
        seen = self.state.seen
        for wid, w in workers.items():
            reads = w.reads
            started = w.started
            prev = seen.get(wid)
            if prev is None or prev[0] != started:
                delta = reads            # a new worker (or a restart under the same id) counts from 0
            else:
                delta = reads - int(prev[1])
            if delta > 0:
                added += delta
            seen[wid] = [started, reads]
        for wid in [w for w in seen if w not in workers]:
            del seen[wid]                # gone: its reads were counted while it lived
        if added:
            if self.state.window_start is None:
                self.state.window_start = now   # counting starts at the first read
            self.state.reads += added
        return added

    def tick(self, now: float) -> dict | None:
        """End the current window if it is over: returns the decision made."""
        st = self.state
        if st.window_start is None or now < st.window_start + self.window:
            return None
        reads = st.reads
        new = slaves_for(reads, self.reads_per_slave, self.max_slaves)
        decision = {"at": now, "window_start": st.window_start, "window_end": st.window_start + self.window,
                    "reads": reads, "previous": st.target, "target": new,
                    "action": "up" if new > st.target else "down" if new < st.target else "keep"}
        st.target = new
        st.reads = 0
        # Windows follow each other; a window missed entirely (orchestrator down) is skipped.
        elapsed = math.floor((now - st.window_start) / self.window)
        st.window_start += max(1, elapsed) * self.window
        st.last_decision = decision
        st.decisions = (st.decisions + [decision])[-MAX_DECISIONS:]
        st.decisions_total += 1
        return decision
