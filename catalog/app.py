"""The catalog service: GET /products/{name}, the CSV seed, and the restocker.

The products table lives in the replicated DB; this service only talks to it
over the bus (bus.client). On start it creates the tables and inserts every
product of catalog/products.csv that is missing, one guarded write per
product (require not exists + insert), so a restart never resets stock and
several instances starting at once cannot insert a product twice."""
from __future__ import annotations

import atexit
import csv
import logging
import threading
from pathlib import Path

from flask import Flask

from bus import ops, web
from bus.client import DBClient, shared
from bus.errors import DBError, PreconditionFailed
from bus.service import base_app
from bus.settings import Settings, load
from toystore import schema

from .restock import Restocker

log = logging.getLogger("stratus.catalog")

CSV_PATH = Path(__file__).resolve().parent / "products.csv"
STARTUP_WAIT = 5.0  # create_app waits this long for the seed, then goes on in the background (503 until then)


def error_body(status: int, message: str) -> dict:
    return {"error": {"code": status, "message": message}}


def load_catalog(path: Path = CSV_PATH) -> list[dict]:
    """The shipped catalog: [{"name", "price", "quantity"}], checked."""
    out, seen = [], set()
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f), start=2):
            name = (row.get("name") or "").strip()
            if not name or name in seen:
                raise ValueError(f"{path}:{i}: missing or repeated product name {name!r}")
            price, quantity = float(row["price"]), int(row["quantity"])
            if price < 0 or quantity < 0:
                raise ValueError(f"{path}:{i}: price and quantity must not be negative")
            seen.add(name)
            out.append({"name": name, "price": price, "quantity": quantity})
    return out


def seed(db: DBClient, products: list[dict]) -> int:
    """Create the tables and insert the products that are missing. Returns
    how many this call inserted. Idempotent and race-free: each insert is
    guarded by a require(not exists) in the same atomic write."""
    schema.create_tables(db)
    rows, _ = web.read_all(db, ops.select(schema.PRODUCTS, columns=["name"]), ["name"])
    present = {r["name"] for r in rows}
    inserted = 0
    for p in products:
        if p["name"] in present:
            continue
        try:
            db.write([ops.require(schema.PRODUCTS, [ops.eq("name", p["name"])], exists=False, tag="exists"),
                      ops.insert(schema.PRODUCTS, p)])
            inserted += 1
        except PreconditionFailed as exc:
            if exc.tag != "exists":
                raise
    return inserted


def db_error(exc: DBError):
    return web.db_error_response(exc, not_ready="catalog not ready", unexpected_status=500)


def _start_seed(db: DBClient, products: list[dict], stop: threading.Event) -> threading.Event:
    done = threading.Event()

    def run():
        delay = 0.2
        while not stop.is_set():
            try:
                n = seed(db, products)
                log.info("catalog ready: %d products, %d inserted now", len(products), n)
                done.set()
                return
            except DBError as exc:
                log.warning("catalog seed failed (%r); retrying in %.1fs", exc, delay)
                stop.wait(delay)
                delay = min(delay * 2, 2.0)
    threading.Thread(target=run, name="catalog-seed", daemon=True).start()
    return done


def create_app(settings: Settings | None = None, *, db: DBClient | None = None,
               restocker: bool = True) -> Flask:
    settings = settings or load()
    db = db or shared("catalog", schema.TENANT)
    app = base_app("catalog", error_body=error_body)
    stop = threading.Event()
    app.extensions["toystore_stop"] = stop

    products = load_catalog()
    seeded = _start_seed(db, products, stop)
    if not seeded.wait(STARTUP_WAIT):
        log.warning("catalog not seeded after %.0fs; still trying in the background", STARTUP_WAIT)
    if restocker:
        r = Restocker(settings, db)
        r.start()
        atexit.register(r.stop)
        app.extensions["toystore_restocker"] = r

    @app.get("/products/<name>")
    def get_product(name: str):
        return web.data_row(db, ops.select(schema.PRODUCTS, [ops.eq("name", name)],
                                           columns=["name", "price", "quantity"]), "product not found", db_error)

    return app
