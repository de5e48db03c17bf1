"""worker/validate.py: a request is checked whole, against the grammar and
the schema, before anything is applied (pure: no database here)."""
import pytest

from bus import ops
from bus.errors import BadRequest
from worker import schema, validate

P = schema.normalize(ops.create_table("p", [ops.column("name", "text", nullable=False), ops.column("qty", "integer"),
                                            ops.column("price", "real"), ops.column("on", "boolean", default=True),
                                            ops.column("note", "text", nullable=False, default="-")],
                                      ["name"], indexes=[["qty"]]))
DEFS = {"p": P}


def refused(ops_or_query, code="bad_request", *, read=False, op=None):
    with pytest.raises(BadRequest) as e:
        (validate.read if read else validate.write)(ops_or_query, DEFS)
    assert e.value.code == code, e.value.message
    assert e.value.message
    if op is not None:
        assert e.value.op == op
    return e.value


@pytest.mark.parametrize("bad", [
    None, [], {}, "ops", [1], [[]], [{}], [{"op": None}], [{"op": ["insert"]}], [{"op": "drop_table", "table": "p"}],
    [{"op": "setseq", "name": "orders", "value": 0}], [{"op": "setseq"}],      # log-only: never from a client
    [{"op": "insert", "table": "p"}],                                           # neither values nor rows
    [{"op": "insert", "table": "p", "values": {"name": "a"}, "rows": [{"name": "b"}]}],
    [{"op": "insert", "table": "p", "rows": []}], [{"op": "insert", "table": "p", "rows": {"name": "a"}}],
    [{"op": "insert", "table": "p", "values": {}}], [{"op": "insert", "table": "p", "values": [["name", "a"]]}],
    [{"op": "insert", "table": "p", "values": {"name": "a"}, "wher": []}],     # unknown field
    [{"op": "delete", "table": "p"}],                                           # where is required to delete
    [{"op": "update", "table": "p", "where": []}],                              # nothing to change
    [{"op": "update", "table": "p", "where": [], "set": {"qty": 1}, "add": {"qty": 1}}],
    [{"op": "update", "table": "p", "where": [], "set": "qty=1"}],
    [{"op": "update", "table": "p", "where": [["qty", "LIKE", 1]], "set": {"qty": 1}}],
    [{"op": "update", "table": "p", "where": [["qty", ["="], 1]], "set": {"qty": 1}}],   # unhashable operator
    [{"op": "delete", "table": "p", "where": [["qty", "="]]}], [{"op": "delete", "table": "p", "where": "1=1"}],
    [{"op": "delete", "table": "p", "where": [], "expect": -1}], [{"op": "delete", "table": "p", "where": [], "expect": True}],
    [{"op": "delete", "table": "p", "where": [], "tag": 5}], [{"op": "delete", "table": "p", "where": [], "tag": "x" * 129}],
    [{"op": "require", "table": "p", "where": [], "exists": "yes"}],
    [{"op": "upsert", "table": "p", "values": {"qty": 1}}],                     # no primary key
    [{"op": "clear", "table": "p"}],
    [ops.insert("p", {"name": "a", "qty": {"$seq": ""}})], [ops.insert("p", {"name": "a", "qty": {"$seq": "s" * 129}})],
    [ops.insert("p", {"name": "a", "qty": {"$seq": "s", "start": "0"}})],
    [ops.insert("p", {"name": "a", "qty": {"$seq": "s", "step": 2}})],
    [ops.insert("p", {"name": "a", "qty": 1, "QTY": 2})],                       # one column, twice
    [ops.delete("p", [["qty", "in", list(range(1001))]])],
])
def test_malformed_writes_are_refused(bad):
    with pytest.raises(BadRequest) as e:
        validate.write(bad, DEFS)
    assert e.value.code in ("bad_request", "bad_type", "too_large") and e.value.message


@pytest.mark.parametrize("value,code", [
    ("x", "bad_type"), (True, "bad_type"), (1.5, "bad_type"), ([1], "bad_type"), ({"a": 1}, "bad_type"),
    (2 ** 63, "out_of_range"), (-(2 ** 63) - 1, "out_of_range"),
])
def test_integer_values_are_64_bit_integers(value, code):
    refused([ops.insert("p", {"name": "a", "qty": value})], code, op=0)
    refused([ops.update("p", [["qty", "=", value]], set={"qty": 1})], code)
    assert validate.write([ops.insert("p", {"name": "a", "qty": 2 ** 63 - 1})], DEFS)[0]["rows"][0]["qty"] == 2 ** 63 - 1


@pytest.mark.parametrize("value,code", [(float("nan"), "out_of_range"), (float("inf"), "out_of_range"),
                                        (-float("inf"), "out_of_range"), (10 ** 30, "out_of_range"), ("1.5", "bad_type")])
def test_real_values_are_finite(value, code):
    refused([ops.insert("p", {"name": "a", "price": value})], code)
    refused([ops.update("p", [], add={"price": value})], code)


def test_text_is_valid_unicode_and_bounded():
    refused([ops.insert("p", {"name": "\ud800"})], "bad_type")
    refused([ops.insert("p", {"name": "x" * (schema.MAX_TEXT + 1)})], "too_large")
    refused([ops.insert("p", {"name": "ok"}, tag="\udfff")], "bad_type")
    assert validate.write([ops.insert("p", {"name": "x" * schema.MAX_TEXT})], DEFS)


def test_nullability_and_types_of_booleans():
    refused([ops.insert("p", {"name": None})], "bad_type")
    refused([ops.insert("p", {"name": "a", "on": 1})], "bad_type")
    refused([ops.insert("p", {"name": "a", "note": None})], "bad_type")
    refused([ops.update("p", [], set={"name": None})], "bad_type")
    refused([ops.update("p", [["qty", "<", None]], set={"qty": 1})], "bad_type")
    refused([ops.update("p", [], add={"on": 1})], "bad_type")
    refused([ops.update("p", [], add={"qty": None})], "bad_type")


def test_every_row_gets_every_column():
    """Rows with different keys lose nothing: missing columns take their default, else null."""
    out = validate.write([ops.insert_many("p", [{"name": "a"}, {"name": "b", "qty": 2, "price": 1.5, "on": False}])], DEFS)
    assert out[0]["rows"] == [{"name": "a", "qty": None, "price": None, "on": True, "note": "-"},
                              {"name": "b", "qty": 2, "price": 1.5, "on": False, "note": "-"}]


def test_names_resolve_to_the_canonical_spelling():
    out = validate.write([ops.update("P", [["NAME", "=", "a"]], set={"Qty": 1}, add={"PRICE": 1})], DEFS)
    assert out == [{"op": "update", "table": "p", "where": [["name", "=", "a"]], "set": {"qty": 1}, "add": {"price": 1}}]
    q = validate.read(ops.select("P", columns=["QTY", "qty"], order_by=[["Name", "desc"]]), DEFS)
    assert q == {"op": "select", "table": "p", "where": [], "columns": ["qty"], "order_by": [["name", "desc"]],
                 "limit": validate.MAX_LIMIT}


def test_create_table_is_compared_as_sqlite_compares_names():
    same = ops.create_table("P", [ops.column("NAME", "text", nullable=False), ops.column("qty", "integer"),
                                  ops.column("price", "real"), ops.column("on", "boolean", default=True),
                                  ops.column("note", "text", nullable=False, default="-")], ["name"], indexes=[["QTY"]])
    assert validate.write([same], DEFS) == [{"op": "create_table", **P}]   # the existing table: created: false
    refused([ops.create_table("P", [ops.column("name", "text")], ["name"])], "schema_conflict")
    refused([ops.create_table("ix_p_0", [ops.column("a", "text")], ["a"])], "schema_conflict")   # p's index
    refused([ops.create_table("t", [ops.column("a", "text"), ops.column("A", "text")], ["a"])])
    refused([ops.create_table("t", [ops.column("a", ["text"])], ["a"])], "bad_type")   # a list is no type
    refused([ops.create_table("t", [ops.column("a", "blob")], ["a"])], "bad_type")
    refused([ops.create_table("sqlite_t", [ops.column("a", "text")], ["a"])])
    refused([ops.create_table("_Stratus_t", [ops.column("a", "text")], ["a"])])
    refused([ops.create_table("t", [ops.column("a", "text")], ["a", "a"])])
    refused([{**ops.create_table("t", [ops.column("a", "text")], ["a"]), "unique": 5}])
    refused([{**ops.create_table("t", [ops.column("a", "text")], ["a"]), "engine": "x"}])
    refused([ops.create_table("t", [ops.column("a", "integer", default=2 ** 64)], ["a"])], "out_of_range")
    refused([ops.create_table("t", [ops.column(f"c{i}", "text") for i in range(schema.MAX_COLUMNS + 1)], ["c0"])],
            "too_large")


def test_a_write_may_create_a_table_then_fill_it():
    out = validate.write([ops.create_table("o", [ops.column("n", "integer", nullable=False)], ["n"]),
                          ops.insert("O", {"N": ops.seq("o", start=0)})], DEFS)
    assert out[1] == {"op": "insert", "table": "o", "rows": [{"n": {"$seq": "o", "start": 0}}]}
    assert "o" not in DEFS   # the caller's schema is not touched
    refused([ops.insert("o", {"n": 1})], "unknown_table", op=0)


def test_seq_only_in_numeric_columns_and_in_range():
    refused([ops.insert("p", {"name": ops.seq("s")})], "bad_type")
    refused([ops.insert("p", {"name": "a", "qty": ops.seq("s", start=2 ** 63)})], "out_of_range")
    refused([ops.update("p", [], set={"qty": ops.seq("s")})], "bad_type")


def test_the_failing_op_is_named():
    e = refused([ops.insert("p", {"name": "a"}), ops.insert("p", {"name": "b", "zz": 1})], "unknown_column")
    assert e.op == 1


@pytest.mark.parametrize("q,code", [
    (None, "bad_request"), ({"op": "explode"}, "bad_request"), ({"op": ["select"]}, "bad_request"),
    (ops.select("nope"), "unknown_table"), ({"op": "select", "table": ["p"]}, "unknown_table"),
    (ops.select("p", columns=["zz"]), "unknown_column"), ({"op": "select", "table": "p", "columns": []}, "bad_request"),
    ({"op": "select", "table": "p", "limit": -1}, "bad_request"), ({"op": "select", "table": "p", "limit": 10_001}, "bad_request"),
    ({"op": "select", "table": "p", "limit": True}, "bad_request"),
    ({"op": "select", "table": "p", "order_by": [["qty", "up"]]}, "bad_request"),
    ({"op": "select", "table": "p", "order_by": "qty"}, "bad_request"),
    ({"op": "count", "table": "p", "limit": 1}, "bad_request"),
    (ops.count("p", [["qty", "=", "x"]]), "bad_type"), (ops.count("p", [["qty", "in", "x"]]), "bad_request"),
    (ops.count("p", [["qty", "=", 1]] * 65), "too_large"),
])
def test_malformed_reads_are_refused(q, code):
    refused(q, code, read=True)
