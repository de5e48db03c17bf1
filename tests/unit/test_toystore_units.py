"""Toy store units: request validation, the order write applied to a real
worker Store (SQLite in a temp dir), the shipped catalog, and the load
client's arithmetic and arguments."""
from __future__ import annotations

import pytest

from bus import ops
from bus.errors import PreconditionFailed
from toystore import schema
from catalog.app import load_catalog
from order.app import Invalid, order_ops, parse_order
from stratus import load_toystore as lt
from worker.store import Store


# --- the shipped catalog --------------------------------------------------------------

def test_catalog_csv_has_ten_toys_at_100():
    toys = load_catalog()
    names = [t["name"] for t in toys]
    assert len(toys) >= 10 and {"Tux", "Fox", "Python"} <= set(names)
    assert len(set(names)) == len(names)
    assert all(t["quantity"] == 100 and isinstance(t["price"], float) and t["price"] > 0 for t in toys)
    assert next(t for t in toys if t["name"] == "Tux")["price"] == 15.99


def test_load_client_default_toys_are_the_catalog():
    assert lt.DEFAULT_TOYS == [t["name"] for t in load_catalog()]


def test_bad_csv_is_refused(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text("name,price,quantity\nTux,1.0,100\nTux,2.0,100\n")
    with pytest.raises(ValueError, match="repeated"):
        load_catalog(p)


# --- request validation --------------------------------------------------------------------

@pytest.mark.parametrize("raw", [b"", b"nope", b"[]", b"1", b'"x"', b"\xff", b'{"name": "Tux"}',
                                 b'{"name": "Tux", "quantity": 0}', b'{"name": "Tux", "quantity": -3}',
                                 b'{"name": "Tux", "quantity": 1.0}', b'{"name": "Tux", "quantity": true}',
                                 b'{"name": "Tux", "quantity": "2"}', b'{"name": "Tux", "quantity": 1e400}',
                                 b'{"name": "Tux", "quantity": 100000000000000000000000}',
                                 b'{"quantity": 1}', b'{"name": "  ", "quantity": 1}', b'{"name": ["Tux"], "quantity": 1}'])
def test_parse_order_refuses(raw):
    with pytest.raises(Invalid) as e:
        parse_order(raw)
    assert e.value.status == 400 and e.value.message


def test_parse_order_accepts():
    assert parse_order(b'{"name": "Tux", "quantity": 3}') == ("Tux", 3)
    assert parse_order(b'{"name": "Tux", "quantity": 1000000, "extra": 1}') == ("Tux", 1_000_000)


# --- the order write on a real store ------------------------------------------------------------

@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'w.db'}")
    lsn = iter(range(1, 10_000))

    def write(op_list):
        with s.transaction():
            n = next(lsn)
            results, _ = s.apply_request(op_list, n, f"req-{n}")
            s.applied_lsn = n
            return results
    s.write = write
    write([schema.products_table(), schema.orders_table()])
    write([ops.insert(schema.PRODUCTS, {"name": "Tux", "price": 15.99, "quantity": 3})])
    yield s
    s.close()


def _state(store):
    return store.read(ops.select("products")), store.read(ops.select("orders"))


def test_orders_numbered_from_zero_and_stock_decremented(store):
    r0 = store.write(order_ops("Tux", 2))
    r1 = store.write(order_ops("Tux", 1))
    assert r0[2]["values"]["number"] == 0 and r1[2]["values"]["number"] == 1
    products, orders = _state(store)
    assert products[0]["quantity"] == 0
    assert orders == [{"number": 0, "name": "Tux", "quantity": 2}, {"number": 1, "name": "Tux", "quantity": 1}]


@pytest.mark.parametrize("name,q,tag", [("Tux", 4, "stock"), ("Nope", 1, "no_product")])
def test_failed_order_writes_nothing_and_takes_no_number(store, name, q, tag):
    before = _state(store)
    with pytest.raises(PreconditionFailed) as e:
        store.write(order_ops(name, q))
    assert e.value.tag == tag
    assert _state(store) == before
    assert store.write(order_ops("Tux", 1))[2]["values"]["number"] == 0   # the number was not used up


def test_create_tables_twice_is_a_no_op(store):
    assert store.write([schema.products_table(), schema.orders_table()]) == [{"created": False}, {"created": False}]


# --- the load client's arithmetic and arguments -------------------------------------------------

def test_percentile_nearest_rank():
    xs = list(range(1, 101))
    assert lt.percentile(xs, 50) == 50 and lt.percentile(xs, 95) == 95 and lt.percentile(xs, 99) == 99
    assert lt.percentile([7], 99) == 7 and lt.percentile([], 50) is None
    assert lt.percentile([1, 2], 50) == 1 and lt.percentile([1, 2], 51) == 2


def test_args_and_usage_errors():
    ns = lt.parse_args(["--url", "http://h:1/", "--clients", "3", "--p", "0.2", "--requests", "9"])
    assert (ns.url, ns.clients, ns.p, ns.requests, ns.duration) == ("http://h:1", 3, 0.2, 9, None)
    for bad in (["--p", "1.5"], ["--clients", "0"], ["--duration", "-1"], ["--requests", "0"], ["--bogus"]):
        assert lt.main(bad) == 2
    assert lt.main(["--help"]) == 0


def test_table_lists_each_type_and_mismatches():
    stats = lt.Stats()
    for i in range(10):
        stats.record("query", 0.0, (i + 1) / 1000, True)
    stats.record("order", 0.0, 0.005, False, "HTTP 503")
    summary = lt.summarize("http://x", 1, 0.5, 1.0, stats, [])
    assert summary["types"]["query"]["p50_ms"] == 5.0 and summary["types"]["query"]["p99_ms"] == 10.0
    assert summary["types"]["order"]["errors"] == 1
    summary["mismatches"] = [{"order": {"number": 1, "name": "Tux", "quantity": 1}, "why": "not found (404)"}]
    text = lt.format_table(summary)
    for word in ("query", "order", "check", "p50 ms", "p95 ms", "p99 ms", "req/s", "MISMATCH", "mismatches 1"):
        assert word in text
