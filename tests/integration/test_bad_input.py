"""Bad requests get an error reply with a code, consume no LSN, change
nothing on any worker; unparsable messages are dead-lettered."""
import json
import time

import pika
import pytest

from bus import ops
from bus.client import connection_params
from bus.errors import BadRequest, ConstraintViolation, PreconditionFailed
from harness import wait_for


@pytest.fixture
def db(cluster):
    cluster.bootstrap(slaves=1)
    c = cluster.client()
    c.write([ops.create_table("kv", [ops.column("k", "text", nullable=False), ops.column("v", "integer")], ["k"]),
             ops.insert("kv", {"k": "a", "v": 1})])
    return c


def raw_roundtrip(cluster, queue, body: bytes, timeout=10.0):
    conn = pika.BlockingConnection(connection_params(cluster.settings.amqp_url))
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.basic_publish("", queue, body, pika.BasicProperties(reply_to=q, correlation_id="raw-1"))
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            method, props, reply = ch.basic_get(q, auto_ack=True)
            if method:
                return json.loads(reply)
            time.sleep(0.05)
        raise AssertionError("no reply")
    finally:
        conn.close()


def dead_letters(cluster) -> int:
    conn = pika.BlockingConnection(connection_params(cluster.settings.amqp_url))
    n = conn.channel().queue_declare(cluster.names.dead_queue, passive=True).method.message_count
    conn.close()
    return n


def baseline(cluster, db):
    """The LSN of a fresh write, once every worker has applied it."""
    lsn = db.write([ops.upsert("kv", {"k": "base", "v": 0})]).lsn
    wait_for(lambda: all(w.get("applied_lsn", 0) >= lsn for w in cluster.workers().values()), 10, what="sync")
    return lsn


@pytest.mark.parametrize("queue_attr", ["write_queue", "read_queue"])
@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"\xff\xfe", b'{"v": 99, "kind": "write", "id": "x", "body": {}}',
                                  b'{"v": 1, "kind": "delete-everything", "id": "x", "body": {}}'])
def test_malformed_messages_get_an_error_and_change_nothing(cluster, db, queue_attr, body):
    before_lsn = baseline(cluster, db)
    before = {w: cluster.checksum(w) for w in ("w1", "s1")}
    reply = raw_roundtrip(cluster, getattr(cluster.names, queue_attr), body)
    assert reply["ok"] is False
    assert reply["error"]["code"] in ("bad_request", "unsupported_version")
    assert reply["error"]["message"]
    assert {w: cluster.checksum(w) for w in ("w1", "s1")} == before
    # the worker keeps serving, and no LSN was consumed
    assert db.write([ops.insert("kv", {"k": "after", "v": 2})]).lsn == before_lsn + 1


def test_unparsable_messages_are_dead_lettered_not_redelivered(cluster, db):
    n0 = dead_letters(cluster)
    raw_roundtrip(cluster, cluster.names.write_queue, b"{not json")
    raw_roundtrip(cluster, cluster.names.read_queue, b"\x00garbage")
    wait_for(lambda: dead_letters(cluster) == n0 + 2, 10, what="two dead letters")
    assert db.read(ops.count("kv")).result == 1  # and both workers still serve


@pytest.mark.parametrize("bad_ops,error,code", [
    ([ops.insert("nope", {"k": "x"})], BadRequest, "unknown_table"),
    ([ops.insert("kv", {"k": "x", "zz": 1})], BadRequest, "unknown_column"),
    ([ops.insert("kv", {"k": "x", "v": "one"})], BadRequest, "bad_type"),
    ([ops.insert("kv", {"k": "x", "v": True})], BadRequest, "bad_type"),
    ([ops.insert("kv", {"k": "a", "v": 5})], ConstraintViolation, "constraint"),
    ([ops.insert("kv", {"k": "x", "v": 1}), ops.require("kv", [ops.eq("k", "missing")], tag="t1")], PreconditionFailed, "precondition_failed"),
    ([ops.insert("kv", {"k": "x", "v": 1}), ops.update("kv", [ops.eq("k", "a")], add={"v": 1}, expect=2)], PreconditionFailed, "precondition_failed"),
    ([{"op": "drop_table", "table": "kv"}], BadRequest, "bad_request"),
    ([ops.update("kv", [["k", "LIKE", "a%"]], set={"v": 1})], BadRequest, "bad_request"),
    ([], BadRequest, "bad_request"),
])
def test_bad_writes_get_an_error_reply_and_leave_the_lsn(cluster, db, bad_ops, error, code):
    before_lsn = baseline(cluster, db)
    sums = {w: cluster.checksum(w) for w in ("w1", "s1")}
    with pytest.raises(error) as exc:
        db.write(bad_ops)
    assert exc.value.code == code and exc.value.message
    if code == "precondition_failed" and bad_ops[-1].get("tag"):
        assert exc.value.tag == "t1"
    # half-written? the insert before the failed precondition must not be there
    assert db.read(ops.count("kv", [ops.eq("k", "x")])).result == 0
    assert {w: cluster.checksum(w) for w in ("w1", "s1")} == sums
    assert db.write([ops.insert("kv", {"k": "y", "v": 1})]).lsn == before_lsn + 1


@pytest.mark.parametrize("query,code", [
    (ops.select("nope"), "unknown_table"),
    (ops.select("kv", columns=["zz"]), "unknown_column"),
    (ops.select("kv", [ops.eq("v", "text")]), "bad_type"),
    ({"op": "select", "table": "kv", "limit": -1}, "bad_request"),
    ({"op": "explode"}, "bad_request"),
])
def test_bad_reads_get_an_error_reply(db, query, code):
    with pytest.raises(BadRequest) as exc:
        db.read(query)
    assert exc.value.code == code
