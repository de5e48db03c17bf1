"""The checker: from a run's history (stratus/chaos/workloads.py), the final
content of the set table and the faults that played (stratus/chaos/schedule.py
FaultEvent: name, start, heal), a report per fault type.

Windows. Fault event i started at s_i and was healed (its effect lifted: a
link restored, a process continued or brought back) at h_i >= s_i; the next
one started at s_{i+1}. Before the first fault is the window "none".
  - Activity is charged to the fault whose window [s_i, s_{i+1}) holds it:
    acknowledged writes (by their acknowledgement time), stale reads (by the
    read's start), duplicates and unexpected values (by the key's first
    attempt; an unexpected key was never attempted, so it is charged to the
    row "(run)" only).
  - A lost write is charged by its acknowledgement time to the first fault
    that had not been healed yet then: the window (h_{i-1}, h_i]. A write
    acknowledged in the quiet time after one fault and lost is lost to the
    next (a broker killed takes with it what it acknowledged just before);
    one acknowledged after the last heal is charged to "(after the last
    fault)".
  - Recovery of event i: the time from s_i until the acknowledgement of the
    first write that was started at or after s_i (set and register writes);
    None when no write started after s_i was ever acknowledged. "After
    heal" is the same from h_i: for a fault held for a while (a partition),
    how long the platform took once the fault was over.

Counts:
  acked       writes acknowledged (200), set and register workloads
  lost        acknowledged set keys missing from the final read
  unexpected  keys in the final read never attempted, plus register values
              read that their client never attempted
  duplicated  keys present more than once in the final read
  stale       register reads answered with a value below the client's last
              acknowledged one (or no row), read with that write's LSN
Lost, unexpected and duplicated keys are listed (a few of each) for a look."""
from __future__ import annotations

import bisect
import dataclasses
import statistics
from collections import Counter

NONE = "none"
RUN = "(run)"
AFTER = "(after the last fault)"


@dataclasses.dataclass
class Row:
    fault: str
    runs: int = 0
    acked: int = 0
    lost: int = 0
    unexpected: int = 0
    duplicated: int = 0
    stale: int = 0
    reads: int = 0
    recoveries: list = dataclasses.field(default_factory=list)   # seconds; None: never recovered
    after_heal: list = dataclasses.field(default_factory=list)   # the same, counted from the heal

    @property
    def recovered(self) -> list[float]:
        return [r for r in self.recoveries if r is not None]

    @property
    def never_recovered(self) -> int:
        return sum(1 for r in self.recoveries if r is None)

    @property
    def recovery_median(self) -> float | None:
        return statistics.median(self.recovered) if self.recovered else None

    @property
    def recovery_max(self) -> float | None:
        if self.never_recovered:
            return float("inf")
        return max(self.recovered) if self.recovered else None

    def as_dict(self) -> dict:
        return {"fault": self.fault, "runs": self.runs, "acked": self.acked, "lost": self.lost,
                "unexpected": self.unexpected, "duplicated": self.duplicated, "stale": self.stale,
                "reads": self.reads, "recovery_median": self.recovery_median,
                "recovery_max": None if self.recovery_max == float("inf") else self.recovery_max,
                "never_recovered": self.never_recovered,
                "after_heal_max": _max(self.after_heal),
                "recoveries": [None if r is None else round(r, 3) for r in self.recoveries]}


def _max(values: list) -> float | None:
    if any(v is None for v in values):
        return None
    return max(values) if values else None


@dataclasses.dataclass
class Report:
    rows: dict                   # fault name -> Row, in first-played order ("none" first)
    total: Row
    lost_keys: list
    unexpected_keys: list
    duplicated_keys: list
    stale_reads: list
    attempted: int
    indeterminate: int           # set keys whose fate the client never learned
    set_acked: int = 0

    @property
    def ok(self) -> bool:
        t = self.total
        return t.lost == t.unexpected == t.duplicated == t.stale == 0

    def as_dict(self) -> dict:
        return {"ok": self.ok, "rows": [r.as_dict() for r in self.rows.values()], "total": self.total.as_dict(),
                "lost_keys": self.lost_keys[:20], "unexpected_keys": self.unexpected_keys[:20],
                "duplicated_keys": self.duplicated_keys[:20], "stale_reads": self.stale_reads[:20],
                "attempted": self.attempted, "set_acked": self.set_acked, "indeterminate": self.indeterminate}


class Windows:
    def __init__(self, events: list):
        self.events = sorted(events, key=lambda e: e.start)
        self.starts = [e.start for e in self.events]
        self.heals = [max(e.start, e.heal) for e in self.events]

    def by_start(self, t: float) -> str:
        """The fault whose [s_i, s_{i+1}) holds t ("none" before the first)."""
        i = bisect.bisect_right(self.starts, t) - 1
        return NONE if i < 0 else self.events[i].name

    def by_heal(self, t: float) -> str:
        """The first fault not yet healed at t: (h_{i-1}, h_i] holds t."""
        i = bisect.bisect_left(self.heals, t)
        return AFTER if i >= len(self.events) else self.events[i].name


def check(events: list, set_keys: list, final_keys: list, reg_reads: list = (), reg_writes: list = ()) -> Report:
    """events: FaultEvent-like (name, start, heal); set_keys: SetKey-like
    (key, invoke, attempts); final_keys: the table's keys (duplicates kept);
    reg_reads: RegRead-like; reg_writes: (client, value, Attempt)."""
    w = Windows(list(events))
    rows: dict[str, Row] = {NONE: Row(NONE)}
    for e in w.events:
        rows.setdefault(e.name, Row(e.name)).runs += 1

    def row(name: str) -> Row:
        return rows.setdefault(name, Row(name))

    total = Row(RUN, runs=len(w.events))
    counts = Counter(final_keys)
    attempted = {k.key: k for k in set_keys}

    # acknowledged writes, lost ones
    lost_keys = []
    indeterminate = set_acked = 0
    ok_writes: list[tuple[float, float]] = []     # (invoke, complete) of every acknowledged attempt
    for k in set_keys:
        a = next((x for x in k.attempts if x.outcome == "ok"), None)
        if a is None:
            if k.attempts and not all(x.outcome == "fail" for x in k.attempts):
                indeterminate += 1
            continue
        set_acked += 1
        ok_writes += [(x.invoke, x.complete) for x in k.attempts if x.outcome == "ok"]
        row(w.by_start(a.complete)).acked += 1
        total.acked += 1
        if counts.get(k.key, 0) == 0:
            lost_keys.append(k.key)
            row(w.by_heal(a.complete)).lost += 1
            total.lost += 1
    for _client, _v, a in reg_writes:
        if a.outcome == "ok":
            ok_writes.append((a.invoke, a.complete))
            row(w.by_start(a.complete)).acked += 1
            total.acked += 1

    # duplicates, unexpected
    duplicated_keys = sorted(k for k, c in counts.items() if c > 1)
    for key in duplicated_keys:
        k = attempted.get(key)
        if k is not None:
            row(w.by_start(k.invoke)).duplicated += 1
        total.duplicated += 1
    unexpected_keys = sorted(k for k in counts if k not in attempted)
    total.unexpected += len(unexpected_keys)
    if unexpected_keys:
        row(RUN).unexpected += len(unexpected_keys)

    # the register
    stale_reads = []
    for r in reg_reads:
        if r.outcome != "ok":
            continue
        name = w.by_start(r.invoke)
        row(name).reads += 1
        total.reads += 1
        if r.got is None or r.got < r.expected:
            row(name).stale += 1
            total.stale += 1
            stale_reads.append({"client": r.client, "at": round(r.invoke, 3), "expected": r.expected,
                                "got": r.got, "fault": name, "lsn": r.lsn})
        elif r.got not in r.attempted:
            row(name).unexpected += 1
            total.unexpected += 1

    # recovery: the first write started at or after s_i that was acknowledged
    ok_writes.sort()
    invokes = [i for i, _ in ok_writes]
    def first_ack_after(t: float) -> float | None:
        j = bisect.bisect_left(invokes, t)
        done = min((c for _, c in ok_writes[j:]), default=None)
        return None if done is None else max(0.0, done - t)

    for e in w.events:
        rec, after = first_ack_after(e.start), first_ack_after(max(e.start, e.heal))
        rows[e.name].recoveries.append(rec)
        rows[e.name].after_heal.append(after)
        total.recoveries.append(rec)
        total.after_heal.append(after)
    if RUN in rows and not any((rows[RUN].unexpected, rows[RUN].acked)):
        rows.pop(RUN)
    return Report(rows, total, lost_keys, unexpected_keys, duplicated_keys, stale_reads, len(set_keys),
                  indeterminate, set_acked)


def _s(v: float | None) -> str:
    if v is None:
        return "-"
    if v == float("inf"):
        return "never"
    return f"{v:.2f}"


def table(report: Report) -> str:
    """The report as a Markdown table (one row per fault type, then the run)."""
    head = ("| fault | runs | writes acked | lost | unexpected | duplicated | stale reads | "
            "recovery median (s) | recovery max (s) | after heal, max (s) |")
    lines = [head, "|" + "---|" * 10]
    for r in list(report.rows.values()) + [report.total]:
        name = "**all**" if r is report.total else r.fault
        rec_med = _s(r.recovery_median) if r.recoveries else "-"
        rec_max = _s(r.recovery_max) if r.recoveries else "-"
        heal_max = ("never" if any(v is None for v in r.after_heal) else _s(max(r.after_heal))) if r.after_heal else "-"
        lines.append(f"| {name} | {r.runs} | {r.acked} | {r.lost} | {r.unexpected} | {r.duplicated} | "
                     f"{r.stale} of {r.reads} | {rec_med} | {rec_max} | {heal_max} |")
    return "\n".join(lines)
