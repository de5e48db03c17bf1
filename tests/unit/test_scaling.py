"""The scaling rule as pure logic (rideshare.md "Scaling rule")."""
from bus.cluster import Member
from orchestrator.scaling import Scaler, ScalingState, slaves_for


def w(reads, started=1.0):
    return Member(id="", reads=reads, started=started)


def test_rule_reads_per_slave_with_floor_and_ceiling():
    assert slaves_for(0, 20, 8) == 1
    assert slaves_for(1, 20, 8) == 1
    assert slaves_for(20, 20, 8) == 1
    assert slaves_for(21, 20, 8) == 2
    assert slaves_for(40, 20, 8) == 2
    assert slaves_for(41, 20, 8) == 3
    assert slaves_for(70, 20, 8) == 4
    assert slaves_for(10_000, 20, 8) == 8
    assert slaves_for(70, 20, 0) == 0   # a ceiling of 0 keeps the master alone


def test_counting_starts_at_the_first_read_and_windows_follow_each_other():
    s = Scaler(120, 20, 8)
    assert s.observe({"a": w(0)}, now=100) == 0
    assert s.state.window_start is None          # no read yet: no window
    assert s.tick(now=1000) is None
    assert s.observe({"a": w(30)}, now=1005) == 30
    assert s.state.window_start == 1005
    assert s.tick(now=1124) is None              # window not over
    s.observe({"a": w(45)}, now=1124)
    d = s.tick(now=1125)
    assert d["reads"] == 45 and d["target"] == 3 and d["action"] == "up" and d["previous"] == 1
    assert s.state.reads == 0 and s.state.window_start == 1125 and s.state.target == 3
    # an idle window brings the count back to one slave
    d = s.tick(now=1245.5)
    assert d["reads"] == 0 and d["target"] == 1 and d["action"] == "down"
    assert s.state.decisions_total == 2 and s.state.last_decision == d


def test_counters_summed_across_workers_new_and_restarted_ids():
    s = Scaler(10, 20, 8)
    s.observe({"a": w(5), "b": w(7)}, now=0)
    assert s.state.reads == 12
    s.observe({"a": w(9), "b": w(7), "c": w(3)}, now=1)     # c is new: counts from 0
    assert s.state.reads == 12 + 4 + 3
    s.observe({"a": w(2, started=2.0), "c": w(3)}, now=2)    # a restarted under its id; b gone
    assert s.state.reads == 19 + 2
    assert "b" not in s.state.seen


def test_baseline_ignores_reads_before_the_orchestrator_started():
    s = Scaler(10, 20, 8)
    s.baseline({"a": w(500)})
    assert s.observe({"a": w(503)}, now=1) == 3


def test_state_survives_a_round_trip_for_the_standby():
    s = Scaler(5, 20, 8)
    s.observe({"a": w(70)}, now=10)
    s.tick(now=15)
    restored = Scaler(5, 20, 8, ScalingState.from_dict(s.state.to_dict()))
    assert restored.state.target == 4 and restored.state.window_start == 15
    assert restored.observe({"a": w(70)}, now=16) == 0    # already counted
    assert restored.observe({"a": w(75)}, now=17) == 5
    assert ScalingState.from_dict(None).target == 1
    assert ScalingState.from_dict({"target": 2}).target == 2


def test_missed_windows_are_skipped():
    s = Scaler(5, 20, 8)
    s.observe({"a": w(10)}, now=0)
    d = s.tick(now=23)                 # the orchestrator was away for four windows
    assert d["reads"] == 10 and d["target"] == 1
    assert s.state.window_start == 20
