"""The worker's store on a real SQLite file: structured ops, atomicity,
preconditions, sequences, deduplication."""
import pytest

from bus import ops
from bus.errors import BadRequest, ConstraintViolation, PreconditionFailed
from worker.store import Store


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    write(s, [ops.create_table("p", [ops.column("name", "text", nullable=False), ops.column("qty", "integer"),
                                     ops.column("price", "real")], ["name"], indexes=[["qty"]])])
    yield s
    s.close()


def write(s, o, rid=None):
    with s.transaction():
        lsn = s.applied_lsn + 1
        res, logged = s.apply_request(o, lsn, rid or f"r{lsn}")
        s.applied_lsn = lsn
    return res, logged


def test_create_table_is_idempotent_and_checked(store):
    assert write(store, [ops.create_table("p", [ops.column("name", "text", nullable=False), ops.column("qty", "integer"),
                                                 ops.column("price", "real")], ["name"], indexes=[["qty"]])])[0] == [{"created": False}]
    with pytest.raises(BadRequest):
        write(store, [ops.create_table("p", [ops.column("name", "text")], ["name"])])
    with pytest.raises(BadRequest):
        write(store, [ops.create_table("_stratus_x", [ops.column("a", "text")], ["a"])])
    with pytest.raises(BadRequest):
        write(store, [ops.create_table("t", [ops.column("a", "blob")], ["a"])])


def test_stock_sale_is_atomic_with_preconditions(store):
    write(store, [ops.insert("p", {"name": "Tux", "qty": 1, "price": 15.99})])
    sale = [ops.require("p", [ops.eq("name", "Tux")], tag="no_product"),
            ops.update("p", [ops.eq("name", "Tux"), ["qty", ">=", 1]], add={"qty": -1}, expect=1, tag="stock"),
            ops.create_table("orders", [ops.column("n", "integer", nullable=False), ops.column("name", "text")], ["n"]),
            ops.insert("orders", {"n": ops.seq("orders", start=0), "name": "Tux"})]
    res, logged = write(store, sale)
    assert res[3]["values"]["n"] == 0
    assert {"op": "setseq", "name": "orders", "value": 0} in logged
    assert not any(op["op"] == "require" for op in logged)  # preconditions do not travel in the log
    with pytest.raises(PreconditionFailed) as e:
        write(store, sale)
    assert e.value.tag == "stock"
    assert store.read(ops.count("orders")) == 1 and store.read(ops.select("p"))[0]["qty"] == 0
    lsn = store.applied_lsn
    write(store, [ops.update("p", [ops.eq("name", "Tux")], set={"qty": 5})])
    assert write(store, sale)[0][3]["values"]["n"] == 1   # the sequence did not skip
    assert store.applied_lsn == lsn + 2


def test_failed_write_leaves_nothing(store):
    with pytest.raises(ConstraintViolation):
        write(store, [ops.insert("p", {"name": "A", "qty": 1}), ops.insert("p", {"name": "A", "qty": 2})])
    assert store.read(ops.count("p")) == 0 and store.applied_lsn == 1


def test_reads_where_order_limit(store):
    write(store, [ops.insert_many("p", [{"name": n, "qty": q} for n, q in [("a", 3), ("b", 1), ("c", 2), ("d", None)]])])
    assert [r["name"] for r in store.read(ops.select("p", [["qty", ">", 1]], order_by=[["qty", "desc"]]))] == ["a", "c"]
    assert store.read(ops.select("p", [["name", "in", ["a", "d"]]], columns=["name"], limit=1)) == [{"name": "a"}]
    assert store.read(ops.count("p", [["qty", "=", None]])) == 1
    assert store.read(ops.count("p", [["qty", "!=", None], ["qty", "<=", 2]])) == 2
    with pytest.raises(BadRequest):
        store.read(ops.select("p", [["qty", "in", "notalist"]]))


def test_replay_and_dedup(store, tmp_path):
    res, logged = write(store, [ops.upsert("p", {"name": "x", "qty": 1}), ops.update("p", [ops.eq("name", "x")], add={"qty": 1})], rid="req-1")
    assert store.seen("req-1")[1] == res
    other = Store(f"sqlite:///{tmp_path / 'replica.sqlite'}")
    with other.transaction():
        other.replay([{"op": "create_table", **store.defs["p"]}], None, 1, None)
        other.replay(logged, "req-1", 2, res)
        other.applied_lsn = 2
    assert other.checksum() == store.checksum()
    assert other.seen("req-1") == (2, res)
    other.close()


def test_schema_survives_reopen(store, tmp_path):
    write(store, [ops.insert("p", {"name": "x", "qty": 1})])
    store.close()
    again = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    assert again.applied_lsn == 2 and again.read(ops.count("p")) == 1
    again.close()
