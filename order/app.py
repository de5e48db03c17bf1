"""The order service: POST /orders and GET /orders/{n}.

An order is ONE atomic write on the master:
  1. require   products where name = N                     (tag no_product -> 404)
  2. update    products add quantity -q
               where name = N and quantity >= q, expect 1  (tag stock -> 400)
  3. insert    orders {number: $seq("orders", start 0), name, quantity}
If a precondition fails, nothing is written. The order number is taken from
the sequence inside the write, so numbers start at 0 and are gap-free and
unique however many order instances run. The write's bus request id comes
from the HTTP request's X-Request-Id and the order (web.write_id); if the
reply is lost (Timeout) or the bus was down (Unavailable) the service sends
the same write again with the same id, which the workers deduplicate, so a
retry can never place an order twice. A client (or the gateway) that sends
the same POST again with the same X-Request-Id gets the first attempt's
order number, and the stock is taken once."""
from __future__ import annotations

import json
import logging
import os
import threading

from flask import Flask, jsonify, request

from bus import ops, web
from bus.client import DBClient, shared
from bus.errors import DBError, PreconditionFailed
from bus.service import base_app, json_error
from bus.settings import Settings, load
from bus.names import Names
from toystore import schema

log = logging.getLogger("stratus.order")

STARTUP_WAIT = 5.0  # then the tables are created in the background (503 until then)
WRITE_ATTEMPTS = 3       # the same write (same request id) after a Timeout or Unavailable
MAX_ORDER_NUMBER = 2**63 - 1


def error_body(status: int, message: str) -> dict:
    return {"error": {"code": status, "message": message}}


class Invalid(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def parse_order(raw: bytes) -> tuple[str, int]:
    """The checked (name, quantity) of a POST /orders body, or Invalid(400)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise Invalid(400, "request body must be JSON") from None
    if not isinstance(body, dict):
        raise Invalid(400, "request body must be a JSON object")
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise Invalid(400, "name must be a non-empty string")
    q = body.get("quantity")
    if not isinstance(q, int) or isinstance(q, bool) or q <= 0:
        raise Invalid(400, "quantity must be a positive integer")
    if q > schema.MAX_ORDER_QUANTITY:
        raise Invalid(400, f"quantity must be at most {schema.MAX_ORDER_QUANTITY}")
    return name, q


def order_ops(name: str, quantity: int) -> list[dict]:
    return [
        ops.require(schema.PRODUCTS, [ops.eq("name", name)], tag="no_product"),
        ops.update(schema.PRODUCTS, [ops.eq("name", name), ["quantity", ">=", quantity]],
                   add={"quantity": -quantity}, expect=1, tag="stock"),
        ops.insert(schema.ORDERS, {"number": ops.seq(schema.ORDER_SEQ, start=0), "name": name,
                                   "quantity": quantity}),
    ]


def place_order(db: DBClient, name: str, quantity: int, *, attempts: int = WRITE_ATTEMPTS):
    """The order write of the current HTTP request; retried with the same
    request id after a lost reply. Returns (order number, lsn). Raises
    PreconditionFailed or the last DBError."""
    reply = web.write(db, order_ops(name, quantity), attempts=attempts)
    return reply.result[2]["values"]["number"], reply.lsn


def db_error(exc: DBError):
    return web.db_error_response(exc, not_ready="order service not ready", unexpected_status=500)


def _start_setup(db: DBClient, stop: threading.Event) -> threading.Event:
    done = threading.Event()

    def run():
        delay = 0.2
        while not stop.is_set():
            try:
                schema.create_tables(db)
                log.info("order tables ready")
                done.set()
                return
            except DBError as exc:
                log.warning("creating the order tables failed (%r); retrying in %.1fs", exc, delay)
                stop.wait(delay)
                delay = min(delay * 2, 2.0)
    threading.Thread(target=run, name="order-setup", daemon=True).start()
    return done


def create_app(settings: Settings | None = None, *, db: DBClient | None = None) -> Flask:
    settings = settings or load()
    db = db or shared("order", schema.TENANT)
    names = Names(settings.cluster)
    app = base_app("order", error_body=error_body)
    stop = threading.Event()
    app.extensions["toystore_stop"] = stop
    # Deployed as the toy store's app (RECEIPTS=on in its manifest), every
    # order hands a receipt task to the `receipts` worker role (order/receipts.py).
    receipts = None
    if os.environ.get("RECEIPTS", "off") == "on":
        from .receipts import Submitter
        receipts = Submitter(settings)
    if not _start_setup(db, stop).wait(STARTUP_WAIT):
        log.warning("order tables not created after %.0fs; still trying in the background", STARTUP_WAIT)

    @app.post("/orders")
    def post_order():
        try:
            name, quantity = parse_order(request.get_data(cache=False))
        except Invalid as exc:
            return json_error(exc.status, exc.message)
        try:
            number, lsn = place_order(db, name, quantity)
        except PreconditionFailed as exc:
            if exc.tag == "no_product":
                return json_error(404, "product not found")
            if exc.tag == "stock":
                return json_error(400, "not enough stock")
            log.error("unexpected precondition failure: %r", exc)
            return json_error(500, f"database error: {exc.message}")
        except DBError as exc:
            return db_error(exc)
        try:
            db.publish(names.invalidate_exchange_of(schema.TENANT), name.encode())
        except DBError as exc:  # the order stands; the cache entry ages out
            log.warning("invalidation of %s not published: %r", name, exc)
        if receipts is not None:
            receipts.hand_over(number, name, quantity)
        resp = jsonify({"data": {"order_number": number}})
        resp.headers["X-Stratus-LSN"] = str(lsn)
        return resp, 200

    @app.get("/orders/<raw>")
    def get_order(raw: str):
        if not (raw.isascii() and raw.isdigit()) or int(raw) > MAX_ORDER_NUMBER:
            return json_error(404, "order not found")
        return web.data_row(db, ops.select(schema.ORDERS, [ops.eq("number", int(raw))],
                                           columns=["number", "name", "quantity"]), "order not found", db_error)

    return app
