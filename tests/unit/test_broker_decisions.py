"""The broker rules of the control tick (orchestrator/decisions.py
check_master_broker, check_service_broker) and the broker fields of the
membership record, as pure logic: no ZooKeeper, no broker, the clock passed in."""
import json

from bus.cluster import Leader, Member, Role, State
from orchestrator.decisions import (BROKER_LOSS_BOUND, Stranded, check_master_broker, check_service_broker,
                                    on_broker, plan_election)


def slave(wid, pid, lsn=0, *, up=True, ready=True, **kw):
    return Member(wid, pid=pid, applied_lsn=lsn, ready=ready, state=State.READY if ready else State.CATCHING_UP,
                  broker_up=up, **kw)


def master(wid, term, *, up, lsn=50):
    return Member(wid, pid=1, role=Role.MASTER, state=State.MASTER, term=term, applied_lsn=lsn, ready=True,
                  broker_up=up, broker_down_since=None if up else 1700000000.5)


def by_id(*ms):
    return {m.id: m for m in ms}


# --- the record ------------------------------------------------------------------------
def test_the_broker_fields_round_trip_and_are_absent_when_unknown():
    m = master("m", 3, up=False)
    d = m.to_dict()
    assert d["broker_up"] is False and d["broker_down_since"] == 1700000000.5
    assert Member.from_dict(json.loads(json.dumps(d))) == m
    up = master("m", 3, up=True).to_dict()
    assert up["broker_up"] is True and "broker_down_since" not in up
    # an older worker's record says nothing: unknown, never "lost" nor "reaches"
    old = Member.from_dict({"id": "w", "role": "master", "state": "master"})
    assert old.broker_up is None and "broker_up" not in old.to_dict()
    assert Member.from_dict({"id": "w", "broker_up": "no", "broker_down_since": "x"}).broker_up is None
    assert on_broker(by_id(old, slave("s", 2, up=False), slave("t", 3))) == {"t": slave("t", 3)}


# --- the master --------------------------------------------------------------------------
def test_a_master_cut_off_while_a_replica_reaches_the_broker_is_deposed_after_the_bound():
    leader = Leader("m", 4)
    ms = by_id(master("m", 4, up=False), slave("a", 30, 40), slave("b", 20, 45, up=False))
    w, d = check_master_broker(None, leader, ms, now=100.0)
    assert d.action == "wait" and w == Stranded("m", 4, 100.0)
    assert d.text == f"m has lost the broker and a reaches it: deposing it after {BROKER_LOSS_BOUND:g}s"
    w, d = check_master_broker(w, leader, ms, now=100.0 + BROKER_LOSS_BOUND - 0.01)
    assert d.action == "wait" and w.since == 100.0
    w, d = check_master_broker(w, leader, ms, now=100.0 + BROKER_LOSS_BOUND)
    assert d.action == "depose" and d.ids == ("m",)
    assert d.text == "master m has been cut off from the broker for 1.0s while a reaches it"
    # the election that follows: only replicas that reach the broker (b is ahead, but cut off too)
    e = plan_election("m", on_broker({k: v for k, v in ms.items() if k != "m"}), cause=d.text)
    assert e.action == "elect" and e.ids == ("a",) and e.text.startswith(d.text + ": a has applied LSN 40")


def test_a_broker_outage_deposes_nobody():
    leader = Leader("m", 4)
    ms = by_id(master("m", 4, up=False), slave("a", 30, 40, up=False), slave("b", 20, 45, up=False))
    w, d = check_master_broker(Stranded("m", 4, 0.0), leader, ms, now=100.0)
    assert w is None and d.action == "wait" and "no replica reaches it" in d.text
    # older workers that do not say, a draining or diverged slave, an excluded one: none counts
    ms = by_id(master("m", 4, up=False), Member("o", pid=5, ready=True, state=State.READY),
               Member("d", pid=6, state=State.DRAINING, broker_up=True),
               Member("v", pid=7, state=State.DIVERGED, broker_up=True), slave("x", 8))
    w, d = check_master_broker(None, leader, ms, now=100.0, exclude={"x"})
    assert w is None and d.action == "wait"


def test_the_clock_starts_again_when_the_condition_breaks():
    leader = Leader("m", 4)
    cut = by_id(master("m", 4, up=False), slave("a", 30, 40))
    w, _ = check_master_broker(None, leader, cut, now=100.0)
    # the master is back: no watch
    w2, d = check_master_broker(w, leader, by_id(master("m", 4, up=True), slave("a", 30, 40)), now=100.5)
    assert w2 is None and d.action == "none" and d.text == "no action: m reaches the broker"
    # cut again: the clock starts from here, not from 100.0
    w3, d = check_master_broker(w2, leader, cut, now=101.2)
    assert d.action == "wait" and w3.since == 101.2
    # the replicas lose it too (a broker restart), then one is back first: a fresh clock again
    w4, _ = check_master_broker(w3, leader, by_id(master("m", 4, up=False), slave("a", 30, 40, up=False)), now=102.0)
    w5, d = check_master_broker(w4, leader, cut, now=105.0)
    assert w5.since == 105.0 and d.action == "wait"
    # a watch of an older term (or another master) does not carry over
    w6, d = check_master_broker(Stranded("m", 3, 0.0), leader, cut, now=110.0)
    assert w6 == Stranded("m", 4, 110.0) and d.action == "wait"


def test_only_a_master_in_office_is_judged():
    # named, still promoting: the promotion clock's business
    promoting = Member("m", pid=1, role=Role.SLAVE, state=State.PROMOTING, term=3, broker_up=False)
    w, d = check_master_broker(Stranded("m", 4, 0.0), Leader("m", 4), by_id(promoting, slave("a", 2)), now=100.0)
    assert w is None and d.action == "none"
    # a master of an older term than the record (it has not noticed yet): not judged either
    w, d = check_master_broker(None, Leader("m", 5), by_id(master("m", 4, up=False), slave("a", 2)), now=100.0)
    assert w is None and d.action == "none"
    # an older worker that says nothing about its broker is never deposed for it
    old = Member("m", pid=1, role=Role.MASTER, state=State.MASTER, term=4)
    assert check_master_broker(None, Leader("m", 4), by_id(old, slave("a", 2)), now=100.0)[1].action == "none"
    assert check_master_broker(None, Leader(None, 0), {}, now=100.0)[1].action == "none"


# --- the service (the leading orchestrator's bus client) -------------------------------
def test_a_leader_cut_off_while_a_standby_is_connected_resigns_after_the_bound():
    standbys = {"h:2:9": {"id": "h:2:9", "broker_up": True, "broker_down_since": None}}
    since, d = check_service_broker(None, connected=False, standbys=standbys, now=50.0)
    assert since == 50.0 and d.action == "wait" and "standby h:2:9 reaches it" in d.text
    since, d = check_service_broker(since, connected=False, standbys=standbys, now=50.0 + BROKER_LOSS_BOUND - 0.01)
    assert since == 50.0 and d.action == "wait"
    since, d = check_service_broker(since, connected=False, standbys=standbys, now=50.0 + BROKER_LOSS_BOUND)
    assert d.action == "resign" and d.ids == ("h:2:9",)
    assert d.text == "the db routes have been cut off from the broker for 1.0s while standby h:2:9 reaches it: " \
                     "resigning the lead"


def test_a_leader_stays_when_nobody_would_do_better():
    # connected, or no client at all (None): nothing to decide
    assert check_service_broker(10.0, connected=True, standbys={}, now=50.0) == \
        (None, check_service_broker(None, connected=True, standbys={}, now=0.0)[1])
    assert check_service_broker(10.0, connected=None, standbys={"s": {"broker_up": True}}, now=50.0)[0] is None
    # cut off, but so is every standby (a broker outage), or there is none, or its record is garbage
    for standbys in ({"s": {"broker_up": False, "broker_down_since": 1.0}}, {}, {"s": None}, {"s": {"broker_up": "yes"}}):
        since, d = check_service_broker(10.0, connected=False, standbys=standbys, now=50.0)
        assert since is None and d.action == "wait" and "no standby reaches it" in d.text
    # ... and a standby that comes back first starts a fresh clock
    since, d = check_service_broker(None, connected=False, standbys={"s": {"broker_up": True}}, now=60.0)
    assert since == 60.0 and d.action == "wait"
