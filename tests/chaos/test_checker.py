"""The chaos checker and schedule (stratus/chaos/checker.py, schedule.py):
pure logic on made-up histories."""
from __future__ import annotations

import math

import pytest

from stratus.chaos import checker, schedule
from stratus.chaos.schedule import FaultEvent
from stratus.chaos.workloads import Attempt, RegRead, SetKey, classify


def key(name: str, invoke: float, *outcomes: tuple[str, float]) -> SetKey:
    k = SetKey(name, invoke)
    t = invoke
    for outcome, done in outcomes:
        k.attempts.append(Attempt(t, done, outcome, 200 if outcome == "ok" else 504, lsn=1 if outcome == "ok" else 0))
        t = done
    return k


EVENTS = [FaultEvent("kill-master", 10.0, 10.0), FaultEvent("partition-master-zk", 20.0, 25.0),
          FaultEvent("kill-master", 30.0, 30.0)]


def test_clean_history_reports_nothing_wrong():
    keys = [key(f"k{i}", i * 1.0, ("ok", i * 1.0 + 0.1)) for i in range(40)]
    rep = checker.check(EVENTS, keys, [k.key for k in keys])
    assert rep.ok
    assert rep.total.acked == 40 and rep.set_acked == 40
    assert rep.rows["none"].acked == 10                       # acknowledged before 10 s
    assert rep.rows["kill-master"].runs == 2 and rep.rows["kill-master"].acked == 20   # [10,20) and [30,40)
    assert rep.rows["partition-master-zk"].acked == 10
    assert rep.rows["kill-master"].recoveries == pytest.approx([0.1, 0.1])


def test_lost_writes_are_charged_to_the_first_fault_not_healed_when_acknowledged():
    keys = [key("before", 9.0, ("ok", 9.5)),        # acknowledged before kill-master (h=10): lost to it
            key("quiet", 26.0, ("ok", 26.5)),        # after partition's heal (25), before the 2nd kill: the 2nd kill
            key("during", 21.0, ("ok", 21.5)),       # during the partition (20..25]: the partition
            key("late", 35.0, ("ok", 35.5)),         # after the last heal
            key("kept", 12.0, ("ok", 12.1))]
    rep = checker.check(EVENTS, keys, ["kept"])
    assert sorted(rep.lost_keys) == ["before", "during", "late", "quiet"]
    assert rep.rows["kill-master"].lost == 2
    assert rep.rows["partition-master-zk"].lost == 1
    assert rep.rows[checker.AFTER].lost == 1
    assert rep.total.lost == 4 and not rep.ok


def test_duplicates_unexpected_and_indeterminate():
    keys = [key("a", 1.0, ("ok", 1.1)), key("b", 11.0, ("info", 13.0), ("ok", 13.5)),
            key("c", 12.0, ("info", 20.0)), key("d", 12.0, ("fail", 12.1))]
    rep = checker.check(EVENTS, keys, ["a", "b", "b", "c", "zz"])
    assert rep.duplicated_keys == ["b"] and rep.rows["kill-master"].duplicated == 1
    assert rep.unexpected_keys == ["zz"] and rep.total.unexpected == 1
    assert rep.indeterminate == 1          # c: never acknowledged nor refused (present: fine)
    assert rep.total.lost == 0             # d was refused, c never acknowledged: neither can be lost
    assert not rep.ok


def test_stale_reads_and_unexpected_register_values():
    reads = [RegRead("r0", 5.0, 5.1, 3, (1, 2, 3), 3, "ok"),
             RegRead("r0", 15.0, 15.1, 4, (1, 2, 3, 4), 3, "ok"),       # stale, in kill-master's window
             RegRead("r1", 21.0, 21.1, 2, (1, 2), None, "ok"),         # no row: stale
             RegRead("r1", 22.0, 22.1, 2, (1, 2, 3), 3, "ok"),         # an attempted (indeterminate) value: fine
             RegRead("r1", 23.0, 23.1, 2, (1, 2), 9, "ok"),            # never attempted: unexpected
             RegRead("r1", 24.0, 24.1, 2, (1, 2), None, "info")]       # a failed read says nothing
    rep = checker.check(EVENTS, [], [], reads, [])
    assert rep.rows["kill-master"].stale == 1
    assert rep.rows["partition-master-zk"].stale == 1 and rep.rows["partition-master-zk"].unexpected == 1
    assert rep.total.stale == 2 and rep.total.reads == 5
    assert {s["client"] for s in rep.stale_reads} == {"r0", "r1"}


def test_recovery_is_from_the_fault_to_the_first_acknowledged_write_started_after_it():
    writes = [("r0", 1, Attempt(9.9, 14.0, "ok", 200, 5)),       # started before the fault: does not count
              ("r0", 2, Attempt(10.5, 12.5, "ok", 200, 6)),      # the first started after: 2.5 s
              ("r0", 3, Attempt(20.1, 27.0, "ok", 200, 7)),     # the partition: 7 s from its start
              ("r1", 1, Attempt(25.5, 27.5, "ok", 200, 8))]     # and 2.5 s from its heal (25)
    rep = checker.check(EVENTS, [], [], [], writes)
    assert rep.rows["kill-master"].recoveries[0] == pytest.approx(2.5)
    assert rep.rows["kill-master"].recoveries[1] is None            # nothing after 30 s
    assert rep.rows["kill-master"].recovery_max == math.inf
    assert rep.rows["partition-master-zk"].recoveries == [pytest.approx(7.0)]
    assert rep.rows["partition-master-zk"].after_heal == [pytest.approx(2.5)]
    assert rep.rows["kill-master"].after_heal[1] is None
    assert "never" in checker.table(rep)


def test_table_has_a_row_per_fault_and_the_total():
    keys = [key("a", 11.0, ("ok", 11.2))]
    text = checker.table(checker.check(EVENTS, keys, ["a"]))
    lines = text.splitlines()
    assert lines[0].startswith("| fault | runs | writes acked | lost |")
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == ["none", "kill-master", "partition-master-zk", "**all**"]


@pytest.mark.parametrize("status,outcome", [(200, "ok"), (503, "fail"), (400, "fail"), (403, "fail"),
                                            (504, "info"), (502, "info"), (500, "info"), (0, "info")])
def test_outcome_of_a_status(status, outcome):
    assert classify(status) == outcome


def test_plan_plays_each_fault_once_then_random_draws_reproducibly():
    faults = schedule.catalog()
    once = schedule.plan(faults, seed=3, seconds=0)
    assert sorted(f.name for f in once) == sorted(schedule.FAULT_NAMES)
    long = schedule.plan(faults, seed=3, seconds=600, per_fault=15)
    assert len(long) == 40 and [f.name for f in long[:len(faults)]] == [f.name for f in once]
    assert [f.name for f in schedule.plan(faults, seed=3, seconds=600, per_fault=15)] == [f.name for f in long]
    assert len(schedule.plan(faults, seed=3, seconds=600)) == 120   # 5 s each by default: the deadline ends a run
    assert [f.name for f in schedule.plan(faults, seed=4, seconds=0)] != [f.name for f in once]


class _Target:
    def __init__(self):
        self.calls = []

    def wait_writes_after(self, t, timeout):
        self.calls.append(("wait", t))
        return True


def test_play_injects_holds_heals_and_records_events(monkeypatch):
    t = _Target()
    now = [0.0]

    def clock():
        return now[0]

    def inject(target, rng):
        target.calls.append("inject")
        now[0] += 1.0
        return "x", lambda: target.calls.append("heal")

    def skip(target, rng):
        raise schedule.NotNow("nothing to hit")

    faults = [schedule.Fault("a", 0.0, inject), schedule.Fault("b", 0.0, skip)]
    monkeypatch.setattr(schedule.time, "sleep", lambda s: None)
    events = schedule.play(t, faults, seed=1, clock=clock, quiet=0, log=lambda m: None)
    assert [e.name for e in events] == ["a"]
    assert t.calls == ["inject", "heal", ("wait", 1.0)]
    assert events[0].start == 0.0 and events[0].heal == 1.0
