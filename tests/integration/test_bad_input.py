"""Bad requests get an error reply with a code, consume no LSN, change
nothing on any worker; unparsable messages are dead-lettered."""
import json
import time

import pika
import pytest

from bus import ops
from bus.client import connection_params
from bus.errors import BadRequest, ConstraintViolation, PreconditionFailed
from bus.settings import load
from bus.tenancy import platform_user
from harness import wait_for

PLATFORM_USER = platform_user(load().amqp_url)   # raw requests act for the platform, as DBClient does


@pytest.fixture
def db(cluster):
    cluster.bootstrap(slaves=1)
    c = cluster.client()
    lsn = c.write([ops.create_table("kv", [ops.column("k", "text", nullable=False), ops.column("v", "integer")], ["k"]),
                   ops.insert("kv", {"k": "a", "v": 1})]).lsn
    # reads without min_lsn in the tests may reach the slave: let it apply the setup first
    wait_for(lambda: cluster.workers()["s1"]["applied_lsn"] >= lsn, 10, what="the slave to apply the setup")
    return c


def raw_roundtrip(cluster, queue, body: bytes, timeout=10.0):
    conn = pika.BlockingConnection(connection_params(cluster.settings.amqp_url))
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.basic_publish("", queue, body, pika.BasicProperties(reply_to=q, correlation_id="raw-1", user_id=PLATFORM_USER))
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


# --- inputs that crashed a master or stored something else (issue #13) ---------------
class Unchanged:
    """The request(s) inside consume no LSN, change nothing on any worker, and
    neither the term nor the master's process moves."""

    def __init__(self, cluster, db):
        self.cluster, self.db = cluster, db

    def __enter__(self):
        self.lsn = baseline(self.cluster, self.db)
        self.sums = {w: self.cluster.checksum(w) for w in ("w1", "s1")}
        self.master = master_state(self.cluster)
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            return False
        assert {w: self.cluster.checksum(w) for w in ("w1", "s1")} == self.sums
        assert self.db.write([ops.upsert("kv", {"k": "after", "v": 2})]).lsn == self.lsn + 1
        assert master_state(self.cluster) == self.master, "the master changed: no request may end it"
        return False


def master_state(cluster):
    w = cluster.workers()["w1"]
    assert w["role"] == "master" and cluster.procs["w1"].poll() is None
    return w["pid"], w["term"]


def refused(db, write_ops, code):
    with pytest.raises(BadRequest) as exc:
        db.write(write_ops)
    assert exc.value.code == code and exc.value.message and exc.value.status == 400
    return exc.value


@pytest.mark.parametrize("bad_ops,code", [
    ([{"op": "setseq"}], "bad_request"),                                   # KeyError in the store: killed every master
    ([{"op": "setseq", "name": "orders", "value": 0}], "bad_request"),     # would rewind a sequence
    ([{"op": "create_table", "table": "t", "columns": [{"name": "a", "type": ["integer"]}], "primary_key": ["a"]}],
     "bad_type"),                                                          # unhashable type: killed every master
    ([ops.update("kv", [], add={"v": 2 ** 63 - 1})], "out_of_range"),      # SQLite would store a float
    ([ops.insert("kv", {"k": "x", "v": 2 ** 63})], "out_of_range"),
    ([ops.create_table("KV", [ops.column("k", "text")], ["k"])], "schema_conflict"),   # "KV" is kv
    ([ops.update("kv", [["v", ["="], 1]], set={"v": 1})], "bad_request"),  # unhashable operator
    ([ops.insert("kv", {"k": "x", "v": 1}), ops.insert("kv", {"k": "x" * (1 << 20 + 1)})], "too_large"),
    ([ops.delete("kv", [["v", "=", 1]] * 65)], "too_large"),
])
def test_inputs_that_crashed_masters_are_refused_and_change_nothing(cluster, db, bad_ops, code):
    with Unchanged(cluster, db):
        refused(db, bad_ops, code)


@pytest.mark.parametrize("body,code", [
    # NaN / Infinity / a number past a double were stored, then served as invalid JSON
    (b'{"v":1,"kind":"write","id":"nan-1","body":{"ops":[{"op":"insert","table":"kv","values":{"k":"x","v":NaN}}]}}',
     "bad_request"),
    (b'{"v":1,"kind":"write","id":"inf-1","body":{"ops":[{"op":"insert","table":"kv","values":{"k":"x","v":Infinity}}]}}',
     "bad_request"),
    (b'{"v":1,"kind":"write","id":"big-1","body":{"ops":[{"op":"insert","table":"kv","values":{"k":"x","v":1e999}}]}}',
     "bad_request"),
    # a lone surrogate: JSON carries it, UTF-8 and SQLite cannot
    (b'{"v":1,"kind":"write","id":"sur-1","body":{"ops":[{"op":"insert","table":"kv","values":{"k":"\\ud800"}}]}}',
     "bad_request"),
    (b'{"v":1,"kind":"write","id":"deep-1","body":{"ops":' + b"[" * 50_000 + b"]" * 50_000 + b"}}", "bad_request"),
])
def test_values_json_or_sqlite_cannot_hold_are_refused(cluster, db, body, code):
    with Unchanged(cluster, db):
        reply = raw_roundtrip(cluster, cluster.names.write_queue, body)
        assert reply["ok"] is False and reply["error"]["code"] == code and reply["error"]["message"]


@pytest.mark.parametrize("body", [
    b'{"v":1,"kind":"read","id":"r-nan","body":{"op":"count","table":"kv","where":[["v","=",NaN]]}}',
    b'{"v":1,"kind":"read","id":"r-sur","body":{"op":"count","table":"kv","where":[["k","=","\\udc00"]]}}',
    b'{"v":1,"kind":"read","id":"r-deep","body":{"op":"count","table":"kv","where":' + b"[" * 50_000 + b"]" * 50_000 + b"}}",
])
def test_reads_of_values_json_cannot_carry_are_refused(cluster, db, body):
    before = master_state(cluster)
    reply = raw_roundtrip(cluster, cluster.names.read_queue, body)
    assert reply["ok"] is False and reply["error"]["code"] == "bad_request"
    assert db.read(ops.count("kv")).result >= 1 and master_state(cluster) == before


def test_a_multi_row_insert_keeps_every_rows_columns_on_every_worker(cluster, db):
    lsn = db.write([ops.insert_many("kv", [{"k": "m1"}, {"k": "m2", "v": 7}, {"K": "m3", "V": 8}])]).lsn
    rows = db.read(ops.select("kv", [["k", "in", ["m1", "m2", "m3"]]], order_by=[["k", "asc"]]), min_lsn=lsn).result
    assert rows == [{"k": "m1", "v": None}, {"k": "m2", "v": 7}, {"k": "m3", "v": 8}]
    wait_for(lambda: cluster.workers()["s1"]["applied_lsn"] >= lsn, 10, what="s1 to apply the insert")
    assert cluster.checksum("w1") == cluster.checksum("s1")


def test_a_table_has_one_name_however_it_is_spelt(cluster, db):
    same = ops.create_table("KV", [ops.column("K", "text", nullable=False), ops.column("v", "integer")], ["k"])
    assert db.write([same]).result == [{"created": False}]
    lsn = db.write([ops.upsert("Kv", {"K": "case", "V": 3})]).lsn
    assert db.read(ops.select("KV", [["K", "=", "case"]]), min_lsn=lsn).result == [{"k": "case", "v": 3}]
    assert db.read({"op": "tables"}, min_lsn=lsn).result == ["kv"]


def test_an_add_that_stays_in_range_is_applied_exactly(cluster, db):
    lsn = db.write([ops.upsert("kv", {"k": "big", "v": 2 ** 63 - 2}), ops.update("kv", [ops.eq("k", "big")], add={"v": 1})]).lsn
    assert db.read(ops.select("kv", [ops.eq("k", "big")]), min_lsn=lsn).result == [{"k": "big", "v": 2 ** 63 - 1}]
    with Unchanged(cluster, db):
        refused(db, [ops.update("kv", [ops.eq("k", "big")], add={"v": 1})], "out_of_range")
