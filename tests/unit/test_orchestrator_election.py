"""The election choice the orchestrator makes (pure logic)."""
from bus.cluster import Member
from orchestrator.election import failover_candidate, switchover_candidate


def worker(wid, pid, lsn, *, role="slave", state="ready", ready=True, **kw):
    return Member.from_dict({"id": wid, "pid": pid, "applied_lsn": lsn, "role": role, "state": state,
                             "ready": ready, **kw})


def members(*ws):
    return {w.id: w for w in ws}


def test_most_applied_lsn_wins_then_lowest_pid():
    ms = members(worker("a", 300, 10), worker("b", 100, 12), worker("c", 200, 12))
    assert failover_candidate(ms).id == "b"   # 12 beats 10; pid 100 beats 200
    ms = members(worker("a", 300, 10), worker("b", 400, 12), worker("c", 200, 12))
    assert failover_candidate(ms).id == "c"


def test_ready_slaves_are_preferred_over_catching_up_ones():
    ms = members(worker("a", 100, 50, state="catching_up", ready=False), worker("b", 200, 40))
    assert failover_candidate(ms).id == "b"
    # with no ready slave, a catching-up one (it drains the log before taking writes)
    ms = members(worker("a", 100, 5, state="catching_up", ready=False),
                 worker("n", 300, 0, state="starting", ready=False, booting=True))
    assert failover_candidate(ms).id == "a"


def test_dead_master_draining_and_excluded_workers_are_never_chosen():
    ms = members(worker("m", 50, 99, role="master", state="master"),
                 worker("d", 60, 98, state="draining"), worker("x", 70, 97), worker("s", 80, 10))
    assert failover_candidate(ms).id == "x"
    assert failover_candidate(ms, exclude={"x"}).id == "s"
    assert failover_candidate(members(worker("m", 1, 1, role="master", state="master"))) is None
    assert failover_candidate({}) is None
    # a diverged worker is on its way out (exit 77, rebuilt): never a candidate
    ms = members(worker("v", 10, 99, state="diverged", ready=False), worker("s", 80, 10, state="catching_up", ready=False))
    assert failover_candidate(ms).id == "s"
    assert failover_candidate(members(ms["v"])) is None


def test_switchover_takes_only_a_ready_slave():
    ms = members(worker("m", 50, 99, role="master", state="master"),
                 worker("a", 60, 90, state="catching_up", ready=False), worker("b", 70, 95), worker("c", 65, 95))
    chosen, why = switchover_candidate(ms, "m")
    assert chosen.id == "c" and why == ""
    chosen, why = switchover_candidate(ms, "m", candidate="b")
    assert chosen.id == "b"
    chosen, why = switchover_candidate(ms, "m", candidate="a")
    assert chosen is None and "not a ready slave" in why
    chosen, why = switchover_candidate(ms, "m", candidate="m")
    assert chosen is None
    chosen, why = switchover_candidate(members(ms["m"]), "m")
    assert chosen is None and "no ready slave" in why
