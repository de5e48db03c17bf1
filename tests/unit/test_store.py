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


# --- no request can crash the store or corrupt it (issue #13) ----------------------
import json  # noqa: E402
import sqlite3  # noqa: E402

from sqlalchemy.exc import OperationalError  # noqa: E402

from bus.errors import DBError  # noqa: E402
from worker import store as store_mod  # noqa: E402


def refused(s, o, code):
    """The write is refused with `code`, and nothing changed: no LSN, same data."""
    lsn, before = s.applied_lsn, s.checksum()
    with pytest.raises(DBError) as e:
        write(s, o)
    assert e.value.code == code, e.value.message
    assert s.applied_lsn == lsn and s.checksum() == before
    return e.value


def test_log_only_ops_and_malformed_definitions_are_refused(store):
    write(store, [ops.insert("p", {"name": "n", "qty": ops.seq("s", start=5)})])
    refused(store, [{"op": "setseq"}], "bad_request")                          # was a KeyError: Fatal
    refused(store, [{"op": "setseq", "name": "s", "value": 0}], "bad_request")  # would rewind a sequence
    refused(store, [{"op": "create_table", "table": "t", "columns": [{"name": "a", "type": ["integer"]}],
                     "primary_key": ["a"]}], "bad_type")                        # was an unhashable list
    assert write(store, [ops.insert("p", {"name": "m", "qty": ops.seq("s")})])[0][0]["values"]["qty"] == 6


def test_multi_row_insert_keeps_every_rows_columns(store):
    write(store, [ops.insert_many("p", [{"name": "a"}, {"name": "b", "qty": 2, "price": 1.5}])])
    assert store.read(ops.select("p", order_by=[["name", "asc"]])) == [
        {"name": "a", "qty": None, "price": None}, {"name": "b", "qty": 2, "price": 1.5}]


def test_add_may_not_leave_the_64_bit_range_or_become_infinite(store):
    write(store, [ops.insert_many("p", [{"name": "a", "qty": 2 ** 63 - 10, "price": 1e308},
                                        {"name": "b", "qty": -(2 ** 63) + 10, "price": -1e308}])])
    refused(store, [ops.update("p", [], add={"qty": 11})], "out_of_range")
    refused(store, [ops.update("p", [], add={"qty": -11})], "out_of_range")
    refused(store, [ops.update("p", [ops.eq("name", "a")], add={"price": 1e308})], "out_of_range")
    write(store, [ops.update("p", [ops.eq("name", "a")], add={"qty": 9})])
    row = store.read(ops.select("p", [ops.eq("name", "a")]))[0]
    assert row["qty"] == 2 ** 63 - 1 and isinstance(row["qty"], int)


def test_names_are_one_table_however_spelt(store):
    same = ops.create_table("P", [ops.column("NAME", "text", nullable=False), ops.column("qty", "integer"),
                                  ops.column("price", "real")], ["name"], indexes=[["qty"]])
    assert write(store, [same])[0] == [{"created": False}]
    refused(store, [ops.create_table("P", [ops.column("name", "text")], ["name"])], "schema_conflict")
    write(store, [ops.insert("P", {"NAME": "x", "Qty": 1})])
    assert store.read(ops.select("p")) == [{"name": "x", "qty": 1, "price": None}]
    assert store.read(ops.count("P", [["QTY", "=", 1]])) == 1 and store.read({"op": "tables"}) == ["p"]


def test_values_json_cannot_carry_or_sqlite_cannot_hold_are_refused(store):
    refused(store, [ops.insert("p", {"name": "a", "price": float("nan")})], "out_of_range")
    refused(store, [ops.insert("p", {"name": "a", "price": float("inf")})], "out_of_range")
    refused(store, [ops.insert("p", {"name": "a", "qty": 2 ** 63})], "out_of_range")
    refused(store, [ops.insert("p", {"name": "\ud800"})], "bad_type")
    refused(store, [ops.insert("p", {"name": "a", "qty": ops.seq("big", start=2 ** 63 - 1)}),
                    ops.insert("p", {"name": "b", "qty": ops.seq("big")})], "out_of_range")   # sequence exhausted


def test_a_failed_create_table_leaves_nothing_behind(store):
    refused(store, [ops.create_table("t", [ops.column("a", "text")], ["a"]), ops.insert("t", {"a": 1})], "bad_type")
    assert "t" not in store.read({"op": "tables"})
    assert write(store, [ops.create_table("t", [ops.column("a", "text")], ["a"]), ops.insert("t", {"a": "1"})])[0][0] == \
        {"created": True}


def test_a_request_sqlite_refuses_is_an_error_reply_and_the_store_goes_on(store):
    """SQLite's own refusal of a request (here: a value over its length limit) is a
    DBError, its savepoint rolled back, and the next write applies."""
    store.conn.connection.dbapi_connection.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 1000)
    e = refused(store, [ops.insert("p", {"name": "ok"}), ops.insert("p", {"name": "x" * 2000})], "rejected")
    assert "too big" in e.message and "INSERT" not in e.message and e.op == 1
    with pytest.raises(DBError) as r:
        store.read(ops.select("p", [ops.eq("name", "y" * 2000)]))
    assert r.value.code == "rejected" and "SELECT" not in r.value.message
    write(store, [ops.insert("p", {"name": "ok"})])
    assert store.read(ops.count("p")) == 1


def test_a_failure_of_the_store_itself_propagates(store):
    """Only the machinery (here: a read-only database) may end the worker."""
    with store.conn.begin():
        store.conn.exec_driver_sql("PRAGMA query_only=1")
    with pytest.raises(OperationalError):
        write(store, [ops.insert("p", {"name": "a"})])
    assert store_mod.request_error(TypeError("x"), "write").code == "rejected"
    assert store_mod.request_error(KeyboardInterrupt(), "write") is None


def test_infinite_reals_stored_by_an_earlier_version_read_as_null(store, tmp_path):
    write(store, [ops.insert("p", {"name": "a", "price": 1.0})])
    with store.conn.begin():
        store.conn.exec_driver_sql("UPDATE p SET price = 9e999")
    assert store.read(ops.select("p")) == [{"name": "a", "qty": None, "price": None}]


def test_request_ids_are_kept_for_the_retention_window(tmp_path):
    now = [1000.0]
    s = Store(f"sqlite:///{tmp_path / 'r.sqlite'}", dedup_retention=60.0, clock=lambda: now[0])
    write(s, [ops.create_table("t", [ops.column("a", "integer")], ["a"])], rid="old")
    now[0] += 30
    write(s, [ops.insert("t", {"a": 1})], rid="mid")
    now[0] += 40   # "old" is 70 s old, "mid" 40 s: a prune (due: 5 s passed) forgets only "old"
    write(s, [ops.insert("t", {"a": 2})], rid="new")
    assert s.seen("old") is None and s.seen("mid") == (2, [{"rowcount": 1, "values": {"a": 1}}]) and s.seen("new")
    # an id seen again after its window is a new write, on a replica too (no duplicate key)
    with s.transaction():
        s.replay([ops.insert("t", {"a": 3})], "mid", 4, [{"rowcount": 1}])
        s.applied_lsn = 4
    assert s.seen("mid") == (4, [{"rowcount": 1}])
    s.close()


def test_a_store_made_by_the_previous_version_opens(tmp_path):
    """The old _stratus_requests had no applied_at; tables could exist under two spellings."""
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    d = {"table": "users", "columns": [{"name": "name", "type": "text", "nullable": False}], "primary_key": ["name"],
         "unique": [], "indexes": []}
    conn.executescript("""
        CREATE TABLE _stratus_meta (key VARCHAR(64) PRIMARY KEY, value TEXT);
        CREATE TABLE _stratus_tables (name VARCHAR(64) PRIMARY KEY, definition TEXT NOT NULL);
        CREATE TABLE _stratus_seq (name VARCHAR(128) PRIMARY KEY, value BIGINT NOT NULL);
        CREATE TABLE _stratus_requests (id VARCHAR(128) PRIMARY KEY, lsn BIGINT NOT NULL, result TEXT);
        CREATE INDEX ix__stratus_requests_lsn ON _stratus_requests (lsn);
        CREATE TABLE users (name TEXT NOT NULL, PRIMARY KEY (name));
        INSERT INTO _stratus_meta VALUES ('applied_lsn', '3'), ('term', '1'), ('stream_offset', '7');
        INSERT INTO users VALUES ('bob');
    """)
    conn.execute("INSERT INTO _stratus_tables VALUES ('users', ?)", (json.dumps(d),))
    conn.execute("INSERT INTO _stratus_tables VALUES ('Users', ?)", (json.dumps({**d, "table": "Users"}),))
    conn.execute("INSERT INTO _stratus_requests VALUES ('req-1', 3, '[{\"rowcount\": 1}]')")
    conn.commit()
    conn.close()
    s = Store(f"sqlite:///{path}")
    assert (s.applied_lsn, s.term, s.stream_offset) == (3, 1, 7)
    assert s.seen("req-1") == (3, [{"rowcount": 1}])
    assert s.read({"op": "tables"}) == ["users"] and s.read(ops.select("USERS")) == [{"name": "bob"}]
    write(s, [ops.insert("Users", {"name": "al"})], rid="req-2")
    assert s.read(ops.count("users")) == 2 and s.seen("req-2")[0] == 4
    s.close()
    s = Store(f"sqlite:///{path}")   # and again, migrated
    assert s.seen("req-2")[0] == 4
    s.close()
