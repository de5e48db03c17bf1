"""The toy store contract (shared/spec/toystore.md), row by row, success and
failure, against real catalog and order processes on a real cluster; and the
same rows through the gateway when gateway/ exists."""
from __future__ import annotations

import json
import time

import pika
import pytest

from bus.client import connection_params
from harness import LocalCluster, wait_for
from test_toystore_support import (call, db_rows, gateway_available, start_catalog, start_gateway,
                                   start_order, stock)

pytestmark = pytest.mark.timeout(240)

TOYS_AT_START = {"Tux", "Fox", "Python"}


class Stack:
    def __init__(self, cluster, db, catalog, order):
        self.cluster, self.db, self.catalog, self.order = cluster, db, catalog, order
        self.gateway = None


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    cluster = LocalCluster(tmp_path_factory.mktemp("toystore"))
    try:
        cluster.bootstrap(slaves=1)
        db = cluster.client(tenant="toystore")
        # the restocker acts once an hour: not during these tests
        s = Stack(cluster, db, start_catalog(cluster, "catalog", STRATUS_RESTOCK_INTERVAL=3600),
                  start_order(cluster, "order"))
        yield s
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def gateway(stack):
    if not gateway_available():
        pytest.skip("gateway/__main__.py does not exist yet")
    if stack.gateway is None:
        stack.gateway = start_gateway(stack.cluster, "gw")
    return stack.gateway


@pytest.fixture(params=["direct", "gateway"])
def api(request, stack):
    """(products base URL, orders base URL): the services themselves, or the gateway."""
    if request.param == "direct":
        return stack.catalog, stack.order
    gw = request.getfixturevalue("gateway")
    return gw, gw


def assert_error(status, body, code, message=None):
    assert status == code, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code and isinstance(body["error"]["message"], str), body
    if message is not None:
        assert body["error"]["message"] == message, body


# --- ordering comes first: order numbers start at 0 -----------------------------------

def test_first_order_is_number_0_and_numbers_grow_by_one(stack):
    before = stock(stack.catalog, "Whale")
    status, body, headers = call(stack.order, "POST", "/orders", {"name": "Whale", "quantity": 2})
    assert (status, body) == (200, {"data": {"order_number": 0}})
    assert int(headers["x-stratus-lsn"]) > 0
    status, body, _ = call(stack.order, "POST", "/orders", {"name": "Whale", "quantity": 1})
    assert (status, body) == (200, {"data": {"order_number": 1}})
    # the decrement is visible to a read that asks for the order's LSN
    lsn = headers["x-stratus-lsn"]
    status, body, _ = call(stack.catalog, "GET", "/products/Whale", headers={"X-Stratus-Min-LSN": lsn})
    assert status == 200 and body["data"]["quantity"] <= before - 2
    wait_for(lambda: stock(stack.catalog, "Whale") == before - 3, 5, what="stock decremented")


# --- GET /products/{name} --------------------------------------------------------------

def test_get_product(stack, api):
    products, _ = api
    status, body, headers = call(products, "GET", "/products/Tux")
    assert (status, body) == (200, {"data": {"name": "Tux", "price": 15.99, "quantity": 100}})
    assert list(body["data"]) == ["name", "price", "quantity"]
    assert int(headers["x-stratus-lsn"]) >= 0


def test_catalog_ships_at_least_ten_toys_at_100(stack):
    rows = db_rows(stack.db, "products")
    assert len(rows) >= 10
    assert TOYS_AT_START <= {r["name"] for r in rows}
    for r in rows:
        assert isinstance(r["price"], float) and r["price"] > 0
    assert all(r["quantity"] == 100 for r in rows if r["name"] in TOYS_AT_START)


def test_get_unknown_product_is_404(stack, api):
    products, _ = api
    status, body, _ = call(products, "GET", "/products/NoSuchToy")
    assert_error(status, body, 404, "product not found")


# --- POST /orders ----------------------------------------------------------------------

def test_order_then_get_order(stack, api):
    _, orders = api
    before = stock(stack.catalog, "Fox")
    status, body, headers = call(orders, "POST", "/orders", {"name": "Fox", "quantity": 3})
    assert status == 200 and set(body) == {"data"} and set(body["data"]) == {"order_number"}, body
    n = body["data"]["order_number"]
    assert isinstance(n, int) and n >= 0
    status, got, _ = call(orders, "GET", f"/orders/{n}", headers={"X-Stratus-Min-LSN": headers["x-stratus-lsn"]})
    assert (status, got) == (200, {"data": {"number": n, "name": "Fox", "quantity": 3}})
    assert list(got["data"]) == ["number", "name", "quantity"]
    wait_for(lambda: stock(stack.catalog, "Fox") == before - 3, 5, what="Fox stock down by 3")


def test_order_unknown_product_is_404_and_sells_nothing(stack, api):
    _, orders = api
    n_orders = len(db_rows(stack.db, "orders"))
    status, body, _ = call(orders, "POST", "/orders", {"name": "NoSuchToy", "quantity": 1})
    assert_error(status, body, 404, "product not found")
    assert len(db_rows(stack.db, "orders")) == n_orders


@pytest.mark.parametrize("payload", [
    {"name": "Python", "quantity": 0},
    {"name": "Python", "quantity": -1},
    {"name": "Python", "quantity": 1.5},
    {"name": "Python", "quantity": 2.0},
    {"name": "Python", "quantity": "1"},
    {"name": "Python", "quantity": True},
    {"name": "Python", "quantity": None},
    {"name": "Python", "quantity": 10**30},
    {"name": "Python", "quantity": 10**7},
    {"name": "Python"},
    {"quantity": 1},
    {"name": "", "quantity": 1},
    {"name": 7, "quantity": 1},
    {"name": None, "quantity": 1},
], ids=["zero", "negative", "fraction", "float", "string", "bool", "null", "huge", "large", "no-quantity",
        "no-name", "empty-name", "number-name", "null-name"])
def test_bad_order_is_400_and_stock_unchanged(stack, api, payload):
    _, orders = api
    before_rows = db_rows(stack.db, "products")
    n_orders = len(db_rows(stack.db, "orders"))
    status, body, _ = call(orders, "POST", "/orders", payload)
    assert_error(status, body, 400)
    assert db_rows(stack.db, "products") == before_rows
    assert len(db_rows(stack.db, "orders")) == n_orders


@pytest.mark.parametrize("raw", [b"not json", b"{\"name\": \"Python\", \"quantity\": 1", b"[1, 2]", b"\"Python\"",
                                 b"", b"\xff\xfe"], ids=["text", "truncated", "array", "string", "empty", "binary"])
def test_non_json_or_non_object_body_is_400(stack, api, raw):
    _, orders = api
    before = db_rows(stack.db, "products")
    status, body, _ = call(orders, "POST", "/orders", raw=raw)
    assert_error(status, body, 400)
    assert db_rows(stack.db, "products") == before


def test_more_than_in_stock_is_400_and_sells_nothing(stack, api):
    _, orders = api
    before = db_rows(stack.db, "products")
    n_orders = len(db_rows(stack.db, "orders"))
    status, body, _ = call(orders, "POST", "/orders", {"name": "Python", "quantity": 101})
    assert_error(status, body, 400, "not enough stock")
    assert db_rows(stack.db, "products") == before
    assert len(db_rows(stack.db, "orders")) == n_orders


def test_failed_orders_take_no_number(stack):
    """Numbers stay gap-free across refused orders."""
    rows = db_rows(stack.db, "orders")
    call(stack.order, "POST", "/orders", {"name": "Python", "quantity": 1000})
    call(stack.order, "POST", "/orders", {"name": "NoSuchToy", "quantity": 1})
    status, body, _ = call(stack.order, "POST", "/orders", {"name": "Python", "quantity": 1})
    assert status == 200 and body["data"]["order_number"] == len(rows)
    numbers = [r["number"] for r in db_rows(stack.db, "orders")]
    assert numbers == list(range(len(numbers)))


def test_order_empties_stock_exactly(stack):
    """Ordering exactly what is left works and leaves 0; one more is refused."""
    left = stock(stack.catalog, "Elephant")
    status, body, _ = call(stack.order, "POST", "/orders", {"name": "Elephant", "quantity": left})
    assert status == 200, body
    wait_for(lambda: stock(stack.catalog, "Elephant") == 0, 5, what="Elephant at 0")
    status, body, _ = call(stack.order, "POST", "/orders", {"name": "Elephant", "quantity": 1})
    assert_error(status, body, 400, "not enough stock")
    assert stock(stack.catalog, "Elephant") == 0


# --- GET /orders/{n} -------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/orders/999999", "/orders/abc", "/orders/-1", "/orders/1.5",
                                  "/orders/99999999999999999999999"])
def test_unknown_order_is_404(stack, api, path):
    _, orders = api
    status, body, _ = call(orders, "GET", path)
    assert_error(status, body, 404, "order not found")


# --- the error shape for every HTTP error ---------------------------------------------

@pytest.mark.parametrize("which,method,path,code", [
    ("catalog", "GET", "/nothing/here", 404),
    ("order", "GET", "/nothing/here", 404),
    ("catalog", "DELETE", "/products/Tux", 405),
    ("catalog", "POST", "/products/Tux", 405),
    ("order", "GET", "/orders", 405),
    ("order", "DELETE", "/orders/0", 405),
])
def test_http_errors_have_the_error_shape(stack, which, method, path, code):
    base = stack.catalog if which == "catalog" else stack.order
    status, body, _ = call(base, method, path)
    assert_error(status, body, code)


def test_too_large_body_is_413_and_sells_nothing(stack):
    before = db_rows(stack.db, "products")
    big = json.dumps({"name": "Python", "quantity": 1, "pad": "x" * 70_000}).encode()
    status, body, _ = call(stack.order, "POST", "/orders", raw=big)
    assert_error(status, body, 413)
    assert db_rows(stack.db, "products") == before


# --- invalidation ------------------------------------------------------------------------

def test_order_publishes_invalidation(stack):
    conn = pika.BlockingConnection(connection_params(stack.cluster.settings.amqp_url))
    try:
        ch = conn.channel()
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.queue_bind(q, stack.cluster.names.invalidate_exchange_of("toystore"))
        status, body, _ = call(stack.order, "POST", "/orders", {"name": "Dolphin", "quantity": 1})
        assert status == 200, body
        got, deadline = [], time.monotonic() + 10
        while b"Dolphin" not in got and time.monotonic() < deadline:
            method, _, payload = ch.basic_get(q, auto_ack=True)
            if method is None:
                time.sleep(0.05)
            else:
                got.append(payload)
        assert b"Dolphin" in got
        # a refused order invalidates nothing
        call(stack.order, "POST", "/orders", {"name": "Dolphin", "quantity": 1000})
        time.sleep(0.5)
        assert ch.basic_get(q, auto_ack=True)[0] is None
    finally:
        conn.close()


# --- persistence ---------------------------------------------------------------------------

def test_orders_survive_restart_of_services(stack):
    rows = db_rows(stack.db, "orders")
    assert rows
    stock_before = db_rows(stack.db, "products")
    for key in ("catalog", "order"):
        stack.cluster.kill(key)
    stack.catalog = start_catalog(stack.cluster, "catalog2", STRATUS_RESTOCK_INTERVAL=3600)
    stack.order = start_order(stack.cluster, "order2")
    # a catalog restart does not reset stock
    assert db_rows(stack.db, "products") == stock_before
    for r in rows:
        status, body, _ = call(stack.order, "GET", f"/orders/{r['number']}")
        assert (status, body) == (200, {"data": r})


def test_orders_survive_restart_of_every_component(stack):
    """Workers too: stop the whole data plane and the services, start them again."""
    c = stack.cluster
    rows = db_rows(stack.db, "orders")
    products = db_rows(stack.db, "products")
    for key in ("catalog2", "order2", "s1", "w1"):
        c.kill(key)
    c.promote("w1")
    c.start_worker("w1")          # same ids, same database files
    c.wait_master("w1")
    c.start_worker("s1")
    c.wait_ready(["s1"])
    stack.catalog = start_catalog(c, "catalog3", STRATUS_RESTOCK_INTERVAL=3600)
    stack.order = start_order(c, "order3")
    for r in rows:
        status, body, _ = call(stack.order, "GET", f"/orders/{r['number']}")
        assert (status, body) == (200, {"data": r})
    assert db_rows(stack.db, "products") == products
    # numbering continues after the last order
    status, body, _ = call(stack.order, "POST", "/orders", {"name": "Tux", "quantity": 1})
    assert (status, body) == (200, {"data": {"order_number": len(rows)}})


def test_database_timeout_is_504_never_400(stack):
    """No worker answers: reads and the order write time out -> 504, and nothing is sold."""
    c = stack.cluster
    catalog = start_catalog(c, "catalog-t", STRATUS_RESTOCK_INTERVAL=3600, STRATUS_REQUEST_TIMEOUT=1)
    order = start_order(c, "order-t", STRATUS_REQUEST_TIMEOUT=1)
    products = db_rows(stack.db, "products")
    for key in ("s1", "w1"):
        c.kill(key)
    try:
        status, body, _ = call(catalog, "GET", "/products/Tux")
        assert_error(status, body, 504)
        status, body, _ = call(order, "GET", "/orders/0")
        assert_error(status, body, 504)
        status, body, _ = call(order, "POST", "/orders", {"name": "Tux", "quantity": 1})
        assert_error(status, body, 504)
    finally:
        c.start_worker("w1")
        c.wait_master("w1")
    # the timed-out order was sent (its message expired unapplied, or it was applied once)
    after = {r["name"]: r["quantity"] for r in db_rows(stack.db, "products")}
    before = {r["name"]: r["quantity"] for r in products}
    assert before["Tux"] - after["Tux"] in (0, 1)
    assert {k: v for k, v in after.items() if k != "Tux"} == {k: v for k, v in before.items() if k != "Tux"}


def test_bus_unreachable_is_503(stack):
    """An order service whose broker cannot be reached answers 503, never 400."""
    from harness import free_port
    from test_toystore_support import wait_http
    c = stack.cluster
    port = free_port()
    c.spawn("order-u", ["-m", "order"], STRATUS_ORDER_PORT=port, STRATUS_REQUEST_TIMEOUT=1,
            STRATUS_AMQP_URL=f"amqp://nobody:none@127.0.0.1:{free_port()}/%2F")
    base = f"http://127.0.0.1:{port}"
    wait_http(base, "/health", timeout=30)
    status, body, _ = call(base, "POST", "/orders", {"name": "Tux", "quantity": 1})
    assert_error(status, body, 503)
    status, body, _ = call(base, "GET", "/orders/0")
    assert_error(status, body, 503)
    # input errors are still input errors
    status, body, _ = call(base, "POST", "/orders", {"name": "Tux", "quantity": 0})
    assert_error(status, body, 400)
