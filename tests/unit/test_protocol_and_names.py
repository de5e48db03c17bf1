import json

import pytest

from bus import protocol
from bus.cluster import choose_master
from bus.errors import BadRequest, PreconditionFailed, Timeout, from_wire
from bus.names import Names, Paths, check_cluster
from bus.settings import load


def test_request_roundtrip():
    r = protocol.Request(kind="read", body={"op": "count", "table": "t"}, min_lsn=7)
    d = protocol.decode_request(r.encode())
    assert (d.kind, d.body, d.min_lsn, d.id) == ("read", r.body, 7, r.id)


@pytest.mark.parametrize("raw", [b"nope", b"[]", b'{"v":2,"kind":"read","id":"a","body":{}}',
                                 b'{"v":1,"kind":"x","id":"a","body":{}}', b'{"v":1,"kind":"read","id":"","body":{}}',
                                 b'{"v":1,"kind":"read","id":"a","body":[]}', b'{"v":1,"kind":"read","id":"a","body":{},"min_lsn":-1}'])
def test_bad_requests_are_refused_with_a_message(raw):
    with pytest.raises(BadRequest) as e:
        protocol.decode_request(raw)
    assert e.value.message


def test_error_replies_carry_code_and_tag():
    raw = protocol.encode_error(PreconditionFailed("no stock", tag="stock", op=1), "w1")
    with pytest.raises(PreconditionFailed) as e:
        protocol.decode_reply(raw)
    assert (e.value.code, e.value.tag, e.value.op, e.value.status) == ("precondition_failed", "stock", 1, 400)
    assert from_wire({"code": "timeout", "message": "m"}).status == 504
    assert isinstance(from_wire({"code": "timeout"}), Timeout)


def test_log_records():
    rec = protocol.decode_record(protocol.encode_entries(3, "w1", [{"lsn": 1, "id": "a", "ops": []}]))
    assert rec["term"] == 3 and rec["entries"][0]["lsn"] == 1
    assert protocol.decode_record(protocol.encode_barrier(4, "w2", "n"))["type"] == "barrier"
    assert protocol.decode_record(protocol.encode_probe("w2", "n"))["type"] == "probe"
    with pytest.raises(ValueError):
        protocol.decode_record(json.dumps({"type": "x"}).encode())


def test_every_name_is_namespaced_by_cluster():
    a, b = Names("a"), Names("b")
    for attr in ("read_queue", "write_queue", "master_read_queue", "sync_exchange", "log_stream",
                 "dead_exchange", "dead_queue", "invalidate_exchange", "response_prefix"):
        assert getattr(a, attr) != getattr(b, attr)
        assert ".a." in getattr(a, attr)
    assert a.read_queue.endswith("readQ") and a.write_queue.endswith("writeQ") and a.sync_exchange.endswith("syncQ")
    assert a.response_queue("c1").startswith(a.response_prefix) and "responseQ" in a.response_prefix
    assert Paths("a").workers != Paths("b").workers
    with pytest.raises(ValueError):
        check_cluster("../etc")


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("STRATUS_CLUSTER", "c9")
    monkeypatch.setenv("STRATUS_SCALE_WINDOW", "5")
    monkeypatch.delenv("STRATUS_READS_PER_SLAVE", raising=False)
    s = load()
    assert (s.cluster, s.scale_window, s.reads_per_slave, s.max_slaves) == ("c9", 5.0, 20, 8)
    monkeypatch.setenv("STRATUS_MAX_SLAVES", "lots")
    with pytest.raises(ValueError, match="STRATUS_MAX_SLAVES"):
        load()


def test_choose_master_prefers_most_applied_then_lowest_pid():
    ws = [{"id": "a", "role": "slave", "ready": True, "applied_lsn": 10, "pid": 300},
          {"id": "b", "role": "slave", "ready": True, "applied_lsn": 12, "pid": 400},
          {"id": "c", "role": "slave", "ready": True, "applied_lsn": 12, "pid": 200},
          {"id": "d", "role": "slave", "ready": False, "applied_lsn": 99, "pid": 100},
          {"id": "m", "role": "master", "ready": True, "applied_lsn": 50, "pid": 50}]
    assert choose_master(ws)["id"] == "c"
    assert choose_master([ws[3], ws[4]])["id"] == "d"   # nobody ready: a catching-up worker still drains first
    assert choose_master([ws[4]]) is None


@pytest.mark.parametrize("raw,code", [
    (b'{"v":1,"kind":"write","id":"a","body":{"ops":[{"op":"insert","table":"t","values":{"x":NaN}}]}}', "bad_request"),
    (b'{"v":1,"kind":"write","id":"a","body":{"ops":[{"x":Infinity}]}}', "bad_request"),
    (b'{"v":1,"kind":"write","id":"a","body":{"ops":[{"x":-Infinity}]}}', "bad_request"),
    (b'{"v":1,"kind":"write","id":"a","body":{"ops":[{"x":1e999}]}}', "bad_request"),       # overflows a double
    (b'{"v":1,"kind":"write","id":"a","body":{"ops":[{"x":"\\ud800"}]}}', "bad_request"),   # lone surrogate
    (b'{"v":1,"kind":"write","id":"a","body":{"\\udfff":1}}', "bad_request"),
    (b'{"v":1,"kind":"read","id":"\\ud800","body":{}}', "bad_request"),
    (b'{"v":1,"kind":"read","id":"a","body":{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}}", "bad_request"),
    (b'{"v":1,"kind":"read","id":"a","body":{"x":' + b"[" * 40 + b"]" * 40 + b"}}", "bad_request"),
    (b'{"v":1,"kind":"read","id":"a","body":{"x":"' + b"a" * protocol.MAX_REQUEST_BYTES + b'"}}', "too_large"),
    (b'{"v":1,"kind":"read","id":"a","body":{},"sent_at":"now"}', "bad_request"),
    (b'{"v":1,"kind":"read","id":"a","body":{"x":' + b"9" * 5000 + b"}}", "bad_request"),  # past int str digits
])
def test_requests_json_cannot_carry_are_refused(raw, code):
    """Only BadRequest may come out of decode_request: the worker answers it."""
    with pytest.raises(BadRequest) as e:
        protocol.decode_request(raw)
    assert e.value.code == code and e.value.message


def test_nan_and_lone_surrogates_are_never_written():
    with pytest.raises(ValueError):
        protocol.dumps({"x": float("nan")})
    for bad in (float("inf"), "\ud800"):
        with pytest.raises(BadRequest):   # refused before it is sent, not a crash of the client
            protocol.Request(kind="write", body={"ops": [{"x": bad}]}).encode()
    raw = protocol.encode_error(BadRequest("bad name '\ud800'"), "w1")   # an error reply is always sent
    with pytest.raises(BadRequest):
        protocol.decode_reply(raw)


@pytest.mark.parametrize("code", ["out_of_range", "too_large", "schema_conflict", "rejected", "bad_type"])
def test_every_refusal_code_is_a_4xx(code):
    assert 400 <= from_wire({"code": code, "message": "m"}).status < 500
