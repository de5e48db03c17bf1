"""The membership record (bus.cluster.Member): the one place a znode's JSON is
parsed and written (pure logic)."""
import dataclasses
import json

import pytest

from bus.cluster import Member, Role, State, choose_master

# A record exactly as a worker writes it today (worker/node.py membership()).
RECORD = {"id": "w-1", "pid": 4242, "host": "box", "role": "slave", "state": "ready", "term": 3,
          "applied_lsn": 120, "ready": True, "reads": 17, "serves_reads": True, "started": 1700000000.25,
          "reason": ""}


def test_a_worker_record_round_trips_with_the_same_wire_keys():
    m = Member.from_dict(RECORD)
    assert m == Member(id="w-1", pid=4242, host="box", role=Role.SLAVE, state=State.READY, term=3,
                       applied_lsn=120, ready=True, reads=17, serves_reads=True, started=1700000000.25)
    d = m.to_dict()
    assert d == RECORD and list(d) == list(RECORD)
    assert json.loads(json.dumps(d)) == RECORD
    assert all(type(d[k]) is str for k in ("role", "state"))   # plain strings on the wire


def test_every_state_a_worker_writes_is_known():
    for state in ("catching_up", "ready", "promoting", "master", "draining", "diverged"):
        assert Member.from_dict({**RECORD, "state": state}).state.value == state
    m = Member.from_dict({**RECORD, "state": "diverged", "ready": False, "reason": "gap after LSN 7"})
    assert m.state is State.DIVERGED and m.reason == "gap after LSN 7" and not m.ready


def test_parsing_is_tolerant():
    # unknown keys ignored, missing fields defaulted, the znode name as id
    m = Member.from_dict({"pid": 7, "future_field": {"x": 1}}, "w-2")
    assert m == Member(id="w-2", pid=7)
    assert m.role is Role.SLAVE and m.state is State.CATCHING_UP and m.reason == "" and m.host is None
    # a role or state this version does not know never crashes
    m = Member.from_dict({**RECORD, "role": "witness", "state": "hibernating"})
    assert m.role is Role.UNKNOWN and m.state is State.UNKNOWN
    # malformed values take their defaults
    m = Member.from_dict({"id": "w-3", "pid": "x", "term": None, "applied_lsn": [1], "reads": True,
                          "role": ["master"], "state": {}, "started": "soon", "host": 5})
    assert (m.pid, m.term, m.applied_lsn, m.reads, m.started, m.host) == (0, 0, 0, 0, None, None)
    assert m.role is Role.UNKNOWN and m.state is State.UNKNOWN
    assert Member.from_dict({"pid": "12", "applied_lsn": "30"}, "w").pid == 12
    # not even a dict (a corrupted znode)
    assert Member.from_dict(None, "w-4") == Member(id="w-4")
    assert Member.from_dict(["a"], "w-5") == Member(id="w-5")


def test_enums_read_as_their_wire_values():
    assert str(Role.MASTER) == "master" and f"{State.CATCHING_UP}" == "catching_up"
    assert Role("slave") is Role.SLAVE and State.READY == "ready"
    assert json.dumps({"r": Role.MASTER}) == '{"r": "master"}'


def test_a_member_is_frozen_and_the_orchestrators_flags_stay_off_the_wire():
    m = Member.from_dict(RECORD)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.state = State.MASTER
    view = dataclasses.replace(m, pid=99, own_pid=4242, booting=True)
    assert view.to_dict() == {**RECORD, "pid": 99, "own_pid": 4242, "booting": True}
    assert "own_pid" not in m.to_dict() and "booting" not in m.to_dict()
    assert Member.from_dict(view.to_dict()) == view


def test_choose_master_takes_members_and_raw_records():
    ms = [Member("a", pid=300, applied_lsn=10, ready=True), Member("b", pid=200, applied_lsn=12, ready=True),
          Member("m", pid=1, applied_lsn=50, role=Role.MASTER, state=State.MASTER, ready=True)]
    assert choose_master(ms) is ms[1]
    raw = [m.to_dict() for m in ms]
    assert choose_master(raw) is raw[1]     # the item it was given
    # draining and diverged workers are never chosen; unknown roles neither
    assert choose_master([Member("d", state=State.DRAINING, ready=True), Member("v", state=State.DIVERGED),
                          Member("u", role=Role.UNKNOWN, ready=True)]) is None
