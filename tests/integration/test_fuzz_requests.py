"""Property test (issue #13): requests generated from the protocol's grammar,
valid and invalid, go through the real bus to a real master and slave.

Properties:
  - every request is answered before its deadline (never a Timeout), with a
    result or a refusal that has a code and a 4xx status;
  - the term never moves, and the master's process is the same one;
  - what was acknowledged reads back as sent: upserts to `kv` and inserts to
    `ins` use keys unique to one request, so a write that was acknowledged
    must be there, with every column as sent (missing ones: default or
    null), and one that was refused must not be there at all;
  - at the end, once the slave has applied the master's last LSN, the two
    stores' checksums agree.

One cluster for the whole test. STRATUS_FUZZ_EXAMPLES examples (default
2000; `make fuzz` runs 20000); each example is a small batch of writes and
reads sent concurrently (the master group-commits them), and now and then a
raw body that no client would send (NaN, a lone surrogate, bytes).
"""
import itertools
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pika
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus import ops
from bus.client import connection_params
from bus.errors import DBError, Timeout, Unavailable
from bus.settings import load
from bus.tenancy import platform_user
from harness import LocalCluster, wait_for

PLATFORM_USER = platform_user(load().amqp_url)   # raw requests act for the platform, as DBClient does

EXAMPLES = int(os.environ.get("STRATUS_FUZZ_EXAMPLES", "2000"))
DEADLINE = 30.0               # seconds a request may take to be answered
KEY = "\x00key"               # replaced, when sent, by a key unique to the request
INT64 = st.integers(-(2 ** 63), 2 ** 63 - 1)
CODES = {"bad_request", "unknown_table", "unknown_column", "bad_type", "constraint", "precondition_failed",
         "out_of_range", "too_large", "schema_conflict", "rejected", "unsupported_version"}

TABLES = [
    ops.create_table("kv", [ops.column("k", "text", nullable=False), ops.column("v", "integer")], ["k"]),
    ops.create_table("ins", [ops.column("id", "text", nullable=False), ops.column("i", "integer"),
                             ops.column("x", "real"), ops.column("t", "text"), ops.column("b", "boolean"),
                             ops.column("d", "integer", nullable=False, default=7)], ["id"]),
    ops.create_table("r", [ops.column("id", "integer", nullable=False), ops.column("n", "integer", nullable=False, default=0),
                           ops.column("x", "real"), ops.column("t", "text")], ["id"], indexes=[["n"]]),
]
COLS = {"kv": {"k": "text", "v": "integer"},
        "ins": {"id": "text", "i": "integer", "x": "real", "t": "text", "b": "boolean", "d": "integer"},
        "r": {"id": "integer", "n": "integer", "x": "real", "t": "text"}}
INS_DEFAULTS = {"i": None, "x": None, "t": None, "b": None, "d": 7}

# --- the grammar ---------------------------------------------------------------------
FLOATS = st.floats(allow_nan=False, allow_infinity=False)
VALUE = {"integer": INT64, "real": st.one_of(FLOATS, st.integers(-(2 ** 53), 2 ** 53)),  # exact in a double
         "text": st.text(max_size=20), "boolean": st.booleans()}
ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | FLOATS | st.text(max_size=8),
                        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                        max_leaves=12)
WRONG_VALUE = st.one_of(ANY_JSON, st.integers(2 ** 63, 2 ** 80), st.integers(-(2 ** 80), -(2 ** 63) - 1))


def spelt(name: str):
    """A name in any case: the store compares names as SQLite does."""
    return st.sampled_from([name, name.upper(), name.capitalize()])


def value(table, col):
    return VALUE[COLS[table][col]]


def where(table):
    col = st.sampled_from(sorted(COLS[table]))
    cond = col.flatmap(lambda c: st.one_of(
        st.tuples(spelt(c), st.sampled_from(["=", "!=", "<", "<=", ">", ">="]), value(table, c)).map(list),
        st.tuples(spelt(c), st.just("in"), st.lists(value(table, c), max_size=4)).map(list),
        st.tuples(spelt(c), st.sampled_from(["=", "!="]), st.none()).map(list)))
    return st.lists(cond, max_size=3)


@st.composite
def kv_upsert(draw):
    v = draw(st.one_of(st.none(), INT64))
    return {"op": "upsert", "table": draw(spelt("kv")), "values": {draw(spelt("k")): KEY, "v": v}}


@st.composite
def ins_insert(draw):
    def row():
        cols = draw(st.lists(st.sampled_from(["i", "x", "t", "b", "d"]), unique=True, max_size=5))
        r = {"id": KEY}
        for c in cols:
            r[draw(spelt(c))] = draw(value("ins", c))
        return r
    if draw(st.booleans()):
        return ops.insert("ins", row())
    return ops.insert_many("ins", [row() for _ in range(draw(st.integers(1, 4)))])


@st.composite
def r_write(draw):
    kind = draw(st.sampled_from(["insert", "update", "delete", "require", "upsert", "seq"]))
    rid = st.integers(0, 40)
    if kind == "insert":
        return ops.insert("r", {"id": draw(rid), "n": draw(st.integers(-5, 5)), "x": draw(VALUE["real"])})
    if kind == "seq":
        return ops.insert("r", {"id": ops.seq("r", start=1000), "t": draw(VALUE["text"])})
    if kind == "upsert":
        return ops.upsert("r", {"id": draw(rid), "t": draw(VALUE["text"])})
    if kind == "update":
        w = draw(where("r"))
        if draw(st.booleans()):
            return ops.update("r", w, add={"n": draw(st.one_of(st.integers(-3, 3), INT64))},
                              expect=draw(st.none() | st.integers(0, 3)))
        return ops.update("r", w, set={"t": draw(VALUE["text"]), "x": draw(VALUE["real"])})
    if kind == "delete":
        return ops.delete("r", draw(where("r")), expect=draw(st.none() | st.integers(0, 2)), tag="del")
    return ops.require("r", draw(where("r")), exists=draw(st.booleans()), tag="req")


@st.composite
def create_table(draw):
    name = draw(st.sampled_from(["kv", "KV", "ins", "r", "f1", "F1", "f2", "ix_r_0", "sqlite_x", "_stratus_x"]))
    cols = draw(st.lists(st.tuples(st.sampled_from(["a", "b", "A", "k", "v"]),
                                   st.sampled_from(["integer", "real", "text", "boolean"])), min_size=1, max_size=3))
    columns = [ops.column(n, t) for n, t in cols]
    return ops.create_table(name, columns, [cols[0][0]])


@st.composite
def broken_op(draw):
    """An operation that the grammar or the schema refuses."""
    how = draw(st.integers(0, 7))
    if how == 0:
        return draw(ANY_JSON)
    if how == 1:
        return {"op": draw(st.sampled_from(["setseq", "drop_table", "", "INSERT", "select"])),
                **draw(st.dictionaries(st.sampled_from(["name", "value", "table", "where"]), ANY_JSON, max_size=3))}
    if how == 2:   # a value of the wrong type or out of range
        table = draw(st.sampled_from(["kv", "ins", "r"]))
        col = draw(st.sampled_from(sorted(COLS[table])))
        return {"op": "insert", "table": table, "values": {col: draw(WRONG_VALUE)}}
    if how == 3:
        return {"op": "update", "table": "r", "where": draw(ANY_JSON), "add": {"n": draw(WRONG_VALUE)}}
    if how == 4:
        return {"op": draw(st.sampled_from(["insert", "update", "delete", "upsert", "require"])),
                "table": draw(st.one_of(st.sampled_from(["nope", "kvv", "sqlite_master", "_stratus_seq"]), ANY_JSON)),
                "values": {"k": "x"}, "where": []}
    if how == 5:
        return {"op": "create_table", "table": draw(st.text(max_size=8)),
                "columns": [{"name": draw(ANY_JSON), "type": draw(ANY_JSON)}], "primary_key": draw(ANY_JSON)}
    if how == 6:
        return {"op": "delete", "table": "r", "where": [[draw(ANY_JSON), draw(ANY_JSON), draw(ANY_JSON)]]}
    return {**draw(r_write()), draw(st.sampled_from(["wher", "expect", "tag", "rows"])): draw(ANY_JSON)}


write_op = st.one_of(kv_upsert(), kv_upsert(), ins_insert(), r_write(), r_write(), create_table(), broken_op())
writes = st.lists(write_op, min_size=1, max_size=4)


@st.composite
def read(draw):
    table = draw(st.sampled_from(["kv", "ins", "r"]))
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return ops.select(draw(spelt(table)), draw(where(table)), limit=draw(st.none() | st.integers(0, 5)),
                          order_by=[[draw(st.sampled_from(sorted(COLS[table]))), draw(st.sampled_from(["asc", "desc"]))]])
    if kind == 1:
        return ops.count(table, draw(where(table)))
    if kind == 2:
        return {"op": "tables"}
    return draw(st.one_of(st.dictionaries(st.sampled_from(["op", "table", "where", "columns", "x"]), ANY_JSON),
                          st.fixed_dictionaries({"op": st.sampled_from(["select", "count", "explode"]),
                                                 "table": st.one_of(st.just(table), ANY_JSON),
                                                 "where": ANY_JSON, "limit": ANY_JSON})))


RAW_WRITE = ('{{"v":1,"kind":"write","id":"{id}","body":{{"ops":[{{"op":"upsert","table":"kv",'
             '"values":{{"k":"{key}","v":{value}}}}}]}}}}')
raw_body = st.one_of(
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "\"\\ud800\"", "[" * 40 + "]" * 40]).map(lambda v: ("kv", v)),
    st.binary(max_size=40).map(lambda b: ("bytes", b)),
)
example = st.fixed_dictionaries({"writes": st.lists(writes, min_size=1, max_size=5),
                                 "reads": st.lists(read(), max_size=3),
                                 "raw": st.lists(raw_body, max_size=1)})


# --- the test ---------------------------------------------------------------------------
class Model:
    """What must be in kv and ins: acknowledged rows as sent; refused keys absent."""

    def __init__(self):
        self.kv: dict[str, object] = {}
        self.ins: dict[str, dict] = {}
        self.absent: set[str] = set()
        self.lock = threading.Lock()
        self.counter = itertools.count()
        self.top_lsn = 0

    def materialize(self, write: list) -> tuple[list, list]:
        """The write with fresh keys, and what each key must read back as if it is acknowledged."""
        expect = []
        out = []
        for op in write:
            op = json.loads(json.dumps(op))   # a copy
            if isinstance(op, dict) and op.get("op") == "upsert" and isinstance(op.get("values"), dict):
                for k, v in list(op["values"].items()):
                    if v == KEY:
                        key = f"k{next(self.counter)}"
                        op["values"][k] = key
                        expect.append(("kv", key, {c.lower(): x for c, x in op["values"].items()}.get("v")))
            if isinstance(op, dict) and op.get("op") == "insert" and op.get("table") == "ins":
                for row in op.get("rows") or [op.get("values")]:
                    if isinstance(row, dict) and row.get("id") == KEY:
                        row["id"] = key = f"i{next(self.counter)}"
                        full = {**INS_DEFAULTS, **{c.lower(): x for c, x in row.items() if c != "id"}}
                        expect.append(("ins", key, full))
            out.append(op)
        return out, expect

    def record(self, expect: list, acked: bool, lsn: int = 0) -> None:
        with self.lock:
            self.top_lsn = max(self.top_lsn, lsn)
            for table, key, row in expect:
                if not acked:
                    self.absent.add(key)
                elif table == "kv":
                    self.kv[key] = row
                else:
                    self.ins[key] = row


def answered(fn):
    """Run one request: its result, or its refusal (which must carry a 4xx code)."""
    try:
        return True, fn()
    except (Timeout, Unavailable) as exc:
        raise AssertionError(f"a request was not answered: {exc!r}") from None
    except DBError as exc:
        assert exc.code in CODES and 400 <= exc.status < 500 and exc.message, repr(exc)
        return False, exc


class Raw:
    """Bodies no client would send, published straight to the queues."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.conn = pika.BlockingConnection(connection_params(cluster.settings.amqp_url))
        self.ch = self.conn.channel()
        self.queue = self.ch.queue_declare("", exclusive=True).method.queue
        self.n = 0

    def roundtrip(self, body: bytes, queue: str) -> dict:
        self.n += 1
        cid = f"raw-{self.n}"
        self.ch.basic_publish("", queue, body, pika.BasicProperties(reply_to=self.queue, correlation_id=cid,
                                                                   user_id=PLATFORM_USER))
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            method, props, reply = self.ch.basic_get(self.queue, auto_ack=True)
            if method and props.correlation_id == cid:
                return json.loads(reply)
            if not method:
                self.conn.sleep(0.01)
        raise AssertionError(f"no reply to the raw body {body[:80]!r}")

    def close(self):
        self.conn.close()


# the bus's own threads use `random` while an example runs; that is no strategy's doing
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
def test_generated_requests_never_crash_or_corrupt(tmp_path):
    cluster = LocalCluster(tmp_path)
    pool = ThreadPoolExecutor(8)
    raw = None
    try:
        cluster.bootstrap(slaves=1)
        db = cluster.client()
        db.write(list(TABLES))
        raw = Raw(cluster)
        master = (cluster.workers()["w1"]["pid"], cluster.workers()["w1"]["term"])
        model = Model()

        def send_write(w):
            ops_, expect = model.materialize(w)
            ok, res = answered(lambda: db.write(ops_, timeout=DEADLINE))
            model.record(expect, ok, res.lsn if ok else 0)

        def send_read(q):
            answered(lambda: db.read(q, timeout=DEADLINE))

        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(example)
        def one(ex):
            futures = [pool.submit(send_write, w) for w in ex["writes"]] + [pool.submit(send_read, q) for q in ex["reads"]]
            for kind, v in ex["raw"]:
                if kind == "kv":
                    key = f"k{next(model.counter)}"
                    body = RAW_WRITE.format(id=f"raw-{key}", key=key, value=v).encode()
                    reply = raw.roundtrip(body, cluster.names.write_queue)
                    assert reply["ok"] is False and reply["error"]["code"] == "bad_request", reply
                    model.record([("kv", key, None)], False)
                else:
                    reply = raw.roundtrip(v, cluster.names.write_queue)
                    assert reply["ok"] is False and reply["error"]["code"] in CODES, reply
            for f in futures:
                f.result(timeout=DEADLINE * 2)

        one()

        # the term never moved, the master is the same process, the slave still follows
        w = cluster.workers()
        assert (w["w1"]["pid"], w["w1"]["term"]) == master and w["w1"]["role"] == "master"
        assert cluster.procs["w1"].poll() is None and cluster.procs["s1"].poll() is None
        assert w["s1"]["state"] != "diverged", w["s1"]
        # what was acknowledged reads back as sent; what was refused is not there
        top = db.write([ops.upsert("kv", {"k": "last", "v": 0})]).lsn
        kv = {r["k"]: r["v"] for r in read_all(db, "kv", "k", top)}
        ins = {r["id"]: {k: v for k, v in r.items() if k != "id"} for r in read_all(db, "ins", "id", top)}
        assert {k: kv.get(k, "missing") for k in model.kv} == model.kv
        assert {k: ins.get(k, "missing") for k in model.ins} == model.ins
        assert not model.absent & (set(kv) | set(ins)), "a refused write left rows behind"
        assert model.kv and model.ins and model.absent, "the examples were all acknowledged, or all refused"
        # and the replicas agree
        wait_for(lambda: cluster.workers()["s1"]["applied_lsn"] >= top, 60, what="s1 to apply the last write")
        assert cluster.checksum("w1") == cluster.checksum("s1")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        if raw is not None:
            raw.close()
        cluster.close()


def read_all(db, table, key, min_lsn):
    rows, last = [], ""
    while True:
        page = db.read(ops.select(table, [[key, ">", last]], order_by=[[key, "asc"]], limit=10_000),
                       min_lsn=min_lsn, timeout=DEADLINE).result
        rows += page
        if len(page) < 10_000:
            return rows
        last = page[-1][key]

