"""The toy store's tables, shared by the catalog and order services (which
never import each other). Both services create both tables at start: a
create_table with the same definition is a no-op, so any start order works.

  products(name text PK, price real, quantity integer)   owned by catalog
  orders(number integer PK, name text, quantity integer) owned by order
  receipts(number integer PK, name text, quantity integer, unit_price real,
           total real, written_at real)                   owned by the receipts worker role
  restocker(role text PK, holder text, rounds integer, restocked integer,
            last text (a JSON list of names), at real)    the restocker's status, one row
"""
from __future__ import annotations

from bus import ops

TENANT = "toystore"   # the tenant whose namespace holds these tables (paas.md, Built-in apps)

PRODUCTS = "products"
ORDERS = "orders"
RECEIPTS = "receipts"
ORDER_SEQ = "orders"      # the $seq that numbers orders from 0
RESTOCK_LEASE = "restock"  # bus.lease.Lease(..., RESTOCK_LEASE): one restocker at a time
RESTOCK_STATUS = "restocker"  # the status table: one row, role = RESTOCK_STATUS
RESTOCK_TO = 100          # a toy at 0 goes back to this quantity
MAX_ORDER_QUANTITY = 1_000_000  # larger quantities are refused before any write


def products_table() -> dict:
    return ops.create_table(PRODUCTS, [
        ops.column("name", "text", nullable=False),
        ops.column("price", "real", nullable=False),
        ops.column("quantity", "integer", nullable=False),
    ], ["name"])


def orders_table() -> dict:
    return ops.create_table(ORDERS, [
        ops.column("number", "integer", nullable=False),
        ops.column("name", "text", nullable=False),
        ops.column("quantity", "integer", nullable=False),
    ], ["number"], indexes=[["name"]])


def receipts_table() -> dict:
    return ops.create_table(RECEIPTS, [
        ops.column("number", "integer", nullable=False),
        ops.column("name", "text", nullable=False),
        ops.column("quantity", "integer", nullable=False),
        ops.column("unit_price", "real", nullable=False),
        ops.column("total", "real", nullable=False),
        ops.column("written_at", "real", nullable=False),
    ], ["number"])


def restock_status_table() -> dict:
    """Written by the restocker in the same write as each refill (catalog/restock.py)."""
    return ops.create_table(RESTOCK_STATUS, [
        ops.column("role", "text", nullable=False),
        ops.column("holder", "text", nullable=False),
        ops.column("rounds", "integer", nullable=False),
        ops.column("restocked", "integer", nullable=False),
        ops.column("last", "text", nullable=False),
        ops.column("at", "real", nullable=False),
    ], ["role"])


def create_tables(db, *, timeout: float | None = None):
    """Create both tables in one write (idempotent). Returns the Reply."""
    return db.write([products_table(), orders_table()], timeout=timeout)
