"""The toy store's web-to-worker task (order/receipts.py): every order hands
a receipt task to the `receipts` worker role, which writes one receipt per
order, idempotently, even when it is killed mid-way and the task comes again."""
from __future__ import annotations

import json
import os
import signal
import urllib.request

from bus import ops
from toystore import schema
from harness import LocalCluster, wait_for
from test_toystore_support import start_catalog, start_order

APP = {"STRATUS_TENANT": "toystore", "STRATUS_APP": "toystore"}


def post(base, path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=15) as r:
        return json.loads(r.read())


def test_every_order_gets_one_receipt(tmp_path):
    cluster = LocalCluster(tmp_path)
    try:
        cluster.bootstrap(slaves=1)
        db = cluster.client(tenant="toystore")
        catalog = start_catalog(cluster, "catalog", STRATUS_RESTOCK_INTERVAL=3600)
        # run as the platform runs the web role (STRATUS_INSTANCE: no ZooKeeper session, no
        # registration; the test calls it directly), with the toy store's tenant for its tasks
        order = start_order(cluster, "order", RECEIPTS="on", STRATUS_INSTANCE="order-1", **APP)
        numbers = [post(order, "/orders", {"name": "Tux", "quantity": q})["data"]["order_number"]
                   for q in (1, 2, 3)]
        # The worker role starts after the orders: the tasks waited, durable, in its queue.
        worker = cluster.spawn("receipts", ["-m", "order.receipts"], STRATUS_ROLE="receipts", **APP)

        def receipts():
            try:
                return db.read(ops.select(schema.RECEIPTS, order_by=["number"])).result
            except Exception:
                return None
        rows = wait_for(lambda: (r := receipts()) and len(r) == 3 and r, 30, 0.2, what="three receipts")
        price = db.read(ops.select(schema.PRODUCTS, [ops.eq("name", "Tux")])).result[0]["price"]
        assert [(r["number"], r["name"], r["quantity"]) for r in rows] == [(n, "Tux", q) for n, q in
                                                                          zip(numbers, (1, 2, 3))]
        assert [r["total"] for r in rows] == [round(price * q, 2) for q in (1, 2, 3)]
        # Killed and started again, it does not write any receipt twice (one row per order).
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(10)
        post(order, "/orders", {"name": "Fox", "quantity": 1})
        cluster.spawn("receipts2", ["-m", "order.receipts"], STRATUS_ROLE="receipts", **APP)
        rows = wait_for(lambda: (r := receipts()) and len(r) == 4 and r, 30, 0.2, what="the fourth receipt")
        assert len({r["number"] for r in rows}) == 4
        assert catalog
    finally:
        cluster.close()
