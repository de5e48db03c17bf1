"""Receipts: the toy store's example of a web role handing work to a worker
role through the platform's tasks (bus/tasks.py; paas.md, Tasks).

    order (web role)      after each order: submit {"order", "name", "quantity"}
                          to the role `receipts` of its app, task id "order-<n>"
    receipts (worker)     `python -m order.receipts`: for each task, read the
                          toy's price and upsert receipts(number, name, quantity,
                          unit_price, total, written_at)

Delivery is at least once, and the upsert by order number makes a second
delivery write the same receipt again: idempotent. The submit waits for the
broker's confirm, so an acknowledged order's receipt task is on disk; if the
bus cannot take it in time the order still stands and the miss is logged
(a receipt is not worth failing a sale)."""
from __future__ import annotations

import logging
import os
import threading
import time

from bus import ops
from bus.errors import DBError
from bus.settings import Settings, load
from toystore import schema

log = logging.getLogger("stratus.order.receipts")

ROLE = "receipts"


def app_name() -> str:
    return os.environ.get("STRATUS_APP") or schema.TENANT


class Submitter:
    """The web role's side: one TaskQueue, used under its own lock."""

    def __init__(self, settings: Settings | None = None):
        from bus.tasks import TaskQueue
        self.queue = TaskQueue(settings or load(), schema.TENANT, app_name(), ROLE, timeout=2.0)

    def hand_over(self, number: int, name: str, quantity: int) -> str | None:
        try:
            return self.queue.submit({"order": number, "name": name, "quantity": quantity},
                                     task_id=f"order-{number}")
        except Exception as exc:
            log.warning("the receipt of order %d was not handed over: %r", number, exc)
            return None


def write_receipt(db, payload: dict) -> dict:
    """The worker role's handler: one idempotent upsert. Raises on a task
    that can never succeed (ValueError) or a database failure (retried)."""
    number, name, quantity = payload.get("order"), payload.get("name"), payload.get("quantity")
    if not isinstance(number, int) or not isinstance(name, str) or not isinstance(quantity, int):
        raise ValueError(f"not a receipt task: {payload!r}")
    rows = db.read(ops.select(schema.PRODUCTS, [ops.eq("name", name)], columns=["price"])).result
    if not rows:
        raise ValueError(f"order {number}: no product {name!r}")
    price = float(rows[0]["price"])
    receipt = {"number": number, "name": name, "quantity": quantity, "unit_price": price,
               "total": round(price * quantity, 2), "written_at": time.time()}
    db.write([ops.upsert(schema.RECEIPTS, receipt)])
    return receipt


def main() -> None:
    import signal

    from bus import instance
    from bus.client import shared
    from bus.service import setup_logging
    from bus.tasks import TaskQueue

    settings = load()
    setup_logging("receipts", settings.log_level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    instance.keep_heartbeat(stop)
    db = shared("receipts", schema.TENANT)
    while not stop.is_set():
        try:
            db.write([schema.receipts_table()])
            break
        except DBError as exc:
            log.warning("creating the receipts table failed (%r); retrying", exc)
            stop.wait(1.0)
    queue = TaskQueue(settings, schema.TENANT, app_name(), ROLE)

    def handle(task):
        r = write_receipt(db, task.payload)
        log.info("receipt of order %d written: %d x %s = %.2f", r["number"], r["quantity"], r["name"], r["total"])

    log.info("receipts consuming %s", queue.queue)
    queue.consume(handle, stop=stop)


if __name__ == "__main__":
    main()
