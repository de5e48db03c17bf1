"""The control tick's rules (orchestrator/decisions.py), as pure logic: no
ZooKeeper, no runtime, the clock passed in."""
import dataclasses

from bus.cluster import Leader, Member, Role, State
from orchestrator.decisions import (BOOT_GRACE, REREGISTER_GRACE, Promotion, check_promotion, live_members,
                                    plan_election, plan_slaves)
from orchestrator.runtimes.base import WorkerHandle


def slave(wid, pid, lsn=0, *, ready=True, **kw):
    return Member(wid, pid=pid, applied_lsn=lsn, ready=ready, state=State.READY if ready else State.CATCHING_UP, **kw)


def master(wid, pid, term, lsn=0):
    return Member(wid, pid=pid, role=Role.MASTER, state=State.MASTER, term=term, applied_lsn=lsn, ready=True)


def by_id(*ms):
    return {m.id: m for m in ms}


# --- observe ---------------------------------------------------------------------------
def test_live_members_merges_znodes_runtime_and_the_dead():
    now = 1000.0
    snapshot = by_id(master("m", 11, 1), slave("s", 12), slave("gone", 13))
    handles = {"m": WorkerHandle("m", 11, started=900), "s": WorkerHandle("s", 5012, started=900),
               "new": WorkerHandle("new", 14, started=now - 1)}
    out, lost = live_members(snapshot, handles, dead={"gone"}, registered={"m": now, "s": now}, leader_id="m", now=now)
    assert set(out) == {"m", "s", "new"} and lost == {}
    assert out["s"].pid == 5012 and out["s"].own_pid == 12          # the runtime's (host) pid wins
    assert out["new"].booting and out["new"].state is State.STARTING and out["new"].role is Role.SLAVE
    assert out["m"] == snapshot["m"]


def test_live_members_finds_the_lost():
    now = 1000.0
    handles = {"m": WorkerHandle("m", 11, started=1), "s": WorkerHandle("s", 12, started=1),
               "t": WorkerHandle("t", 13, started=1), "b": WorkerHandle("b", 14, started=now - BOOT_GRACE - 1)}
    registered = {"m": now - 1, "s": now - 1, "t": now - REREGISTER_GRACE - 1}
    out, lost = live_members({}, handles, dead=set(), registered=registered, leader_id="m", now=now)
    # the master without its znode is lost at once and left out; a slave has REREGISTER_GRACE
    assert lost == {"m": "lost its ZooKeeper session", "t": "lost its ZooKeeper session",
                    "b": f"did not register within {BOOT_GRACE:g}s"}
    assert "m" not in out and out["s"].state is State.UNREGISTERED and not out["s"].booting
    assert {"t", "b"} <= set(out)    # lost slaves stay until the tick kills them


# --- leader ----------------------------------------------------------------------------
def test_plan_election():
    d = plan_election(None, {})
    assert d.action == "bootstrap" and d.text == "bootstrap: a fresh cluster's first master"
    ms = by_id(slave("a", 30, 10), slave("b", 20, 12), slave("c", 10, 99, ready=False))
    d = plan_election("m", ms)
    assert d.action == "elect" and d.ids == ("b",)
    assert d.text == "master m died: b has applied LSN 12, the most among ready slaves (pid 20)"
    d = plan_election("m", ms, exclude={"a", "b"})
    assert d.ids == ("c",) and "the most among slaves" in d.text
    d = plan_election("x", ms, exclude={"a", "b", "c"}, cause="x was named master for term 4 but did not take over in 10s")
    assert d.action == "start_master"
    assert d.text == "x was named master for term 4 but did not take over in 10s and no slave is left: " \
                     "a new worker replays the log"
    assert plan_election("m", by_id(master("old", 1, 1))).action == "start_master"


# --- promotion -------------------------------------------------------------------------
def test_a_named_master_that_takes_over_in_time_is_fine():
    leader = Leader("s", 2)
    w, d = check_promotion(None, leader, slave("s", 12, 40), now=100.0, timeout=10)
    assert d.action == "wait" and w == Promotion("s", 2, 100.0, 100.0, 40)
    promoting = dataclasses.replace(slave("s", 12, 40), state=State.PROMOTING, ready=False)
    w, d = check_promotion(w, leader, promoting, now=109.0, timeout=10)
    assert d.action == "wait" and w.named_at == 100.0
    w, d = check_promotion(w, leader, master("s", 12, 2, 40), now=109.5, timeout=10)
    assert w is None and d.action == "none" and d.text == "no action: s is master for term 2"
    # steady state: nothing to watch
    assert check_promotion(None, leader, master("s", 12, 2), now=500.0, timeout=10)[0] is None


def test_a_named_master_that_does_not_take_over_has_failed():
    leader = Leader("x", 4)
    stuck = slave("x", 66, 5, ready=False)
    w, _ = check_promotion(None, leader, stuck, now=0.0, timeout=10)
    w, d = check_promotion(w, leader, stuck, now=9.9, timeout=10)
    assert d.action == "wait"
    w, d = check_promotion(w, leader, stuck, now=10.0, timeout=10)
    assert d.action == "failed" and d.ids == ("x",)
    assert d.text == "x was named master for term 4 but did not take over in 10s"
    # a master of an older term has not taken over this one
    old_master = master("x", 66, 3)
    w, _ = check_promotion(None, leader, old_master, now=0.0, timeout=2)
    assert check_promotion(w, leader, old_master, now=2.5, timeout=2)[1].action == "failed"


def test_progress_in_the_log_restarts_the_clock():
    leader = Leader("x", 4)
    w, _ = check_promotion(None, leader, slave("x", 66, 5, ready=False), now=0.0, timeout=10)
    w, d = check_promotion(w, leader, slave("x", 66, 900, ready=False), now=8.0, timeout=10)
    assert d.action == "wait" and (w.progress_at, w.lsn, w.named_at) == (8.0, 900, 0.0)
    w, d = check_promotion(w, leader, slave("x", 66, 900, ready=False), now=17.0, timeout=10)
    assert d.action == "wait"
    w, d = check_promotion(w, leader, slave("x", 66, 900, ready=False), now=18.0, timeout=10)
    assert d.action == "failed" and "no progress past LSN 900; named 18s ago" in d.text


def test_the_clock_starts_with_each_naming_and_with_each_orchestrator():
    stuck = slave("x", 66, 5, ready=False)
    w, _ = check_promotion(None, Leader("x", 4), stuck, now=0.0, timeout=10)
    # a new term (say, a switchover back to the same worker) is a new naming
    w, d = check_promotion(w, Leader("x", 5), stuck, now=50.0, timeout=10)
    assert d.action == "wait" and (w.term, w.named_at) == (5, 50.0)
    # another worker named: its own clock
    w, d = check_promotion(w, Leader("y", 6), slave("y", 67, 5), now=55.0, timeout=10)
    assert d.action == "wait" and (w.id, w.named_at) == ("y", 55.0)
    # a standby that takes over has no watch: it starts its own clock, whatever the age of the naming
    w, d = check_promotion(None, Leader("y", 6), slave("y", 67, 5), now=1000.0, timeout=10)
    assert d.action == "wait" and w.named_at == 1000.0


def test_a_worker_still_booting_is_not_on_the_promotion_clock():
    booting = Member("n", pid=70, state=State.STARTING, booting=True)
    w, d = check_promotion(None, Leader("n", 2), booting, now=0.0, timeout=2)
    assert w is None and d.action == "wait" and "register" in d.text
    registered = Member("n", pid=70)
    w, d = check_promotion(w, Leader("n", 2), registered, now=30.0, timeout=2)
    assert d.action == "wait" and w.named_at == 30.0
    assert check_promotion(None, Leader(None, 0), None, now=0.0, timeout=2)[1].action == "none"


# --- slaves ----------------------------------------------------------------------------
def test_plan_slaves():
    ms = by_id(master("m", 1, 1), slave("a", 2, started=10.0), slave("b", 3, started=20.0), slave("c", 4, started=20.0))
    d = plan_slaves("m", ms, leaving=set(), target=3)
    assert d.action == "none" and d.text == "no action: 3 slave(s), the target"
    d = plan_slaves("m", ms, leaving=set(), target=5)
    assert d.action == "start" and d.count == 2
    d = plan_slaves("m", ms, leaving=set(), target=1)
    assert d.action == "drain" and d.ids == ("c", "b")   # the newest first (then the highest pid)
    d = plan_slaves("m", ms, leaving={"c"}, target=1)
    assert d.ids == ("b",)
    fresh = by_id(Member("m", pid=1, state=State.STARTING, booting=True))
    d = plan_slaves("m", fresh, leaving=set(), target=1)
    assert d.action == "wait" and d.count == 0

