"""Helpers for the toy store tests (no tests here): real HTTP over
http.client, and starting catalog/order (and the gateway) on a LocalCluster."""
from __future__ import annotations

import http.client
import json
import time
from pathlib import Path
from urllib.parse import urlsplit

from harness import ROOT, free_port, wait_for


def call(base: str, method: str, path: str, body=None, *, raw: bytes | None = None,
         headers: dict | None = None, timeout: float = 30.0):
    """One request on a fresh connection: (status, parsed JSON or None, headers)."""
    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        h = {"Content-Type": "application/json"} if data is not None else {}
        h.update(headers or {})
        conn.request(method, path, body=data, headers=h)
        resp = conn.getresponse()
        payload = resp.read()
        try:
            parsed = json.loads(payload) if payload else None
        except ValueError:
            parsed = None
        return resp.status, parsed, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def wait_http(base: str, path: str, timeout: float = 45.0, ok=(200,)):
    def probe():
        try:
            return call(base, "GET", path, timeout=5)[0] in ok
        except OSError:
            return False
    wait_for(probe, timeout, interval=0.2, what=f"{base}{path}")


def start_catalog(cluster, key: str, **env) -> str:
    port = free_port()
    cluster.spawn(key, ["-m", "catalog"], STRATUS_CATALOG_PORT=port, **env)
    base = f"http://127.0.0.1:{port}"
    wait_http(base, "/products/Tux")
    return base


def start_order(cluster, key: str, **env) -> str:
    port = free_port()
    cluster.spawn(key, ["-m", "order"], STRATUS_ORDER_PORT=port, **env)
    base = f"http://127.0.0.1:{port}"
    wait_http(base, "/orders/0", ok=(200, 404))
    return base


def gateway_available() -> bool:
    return (ROOT / "gateway" / "__main__.py").exists()


def start_gateway(cluster, key: str = "gw", **env) -> str:
    from kits.testkit import route_builtins
    route_builtins(cluster)
    port = free_port()
    cluster.spawn(key, ["-m", "gateway"], STRATUS_GATEWAY_PORT=port, **env)
    base = f"http://127.0.0.1:{port}"
    wait_http(base, "/products/Tux", timeout=45)
    return base


def stock(base: str, name: str) -> int:
    status, body, _ = call(base, "GET", f"/products/{name}")
    assert status == 200, (status, body)
    return body["data"]["quantity"]


def set_stock(db, name: str, quantity: int) -> int:
    """Set a product's stock directly in the DB (test setup); returns the LSN."""
    from bus import ops
    return db.write([ops.update("products", [ops.eq("name", name)], set={"quantity": quantity}, expect=1)]).lsn


def db_rows(db, table: str) -> list[dict]:
    from bus import ops
    # read from whatever serves reads, after every write so far (min_lsn of a no-op)
    return db.read(ops.select(table, order_by=[[_pk(table), "asc"]]), min_lsn=_last_lsn(db)).result


def _pk(table: str) -> str:
    return {"products": "name", "orders": "number"}[table]


def _last_lsn(db) -> int:
    """The LSN of a fresh, harmless write: any read with this min_lsn sees everything before."""
    from toystore import schema
    return schema.create_tables(db).lsn


def log_text(cluster, key: str) -> str:
    p = Path(cluster.log_dir) / f"{key}.log"
    return p.read_text(errors="replace") if p.exists() else ""


def deadline(seconds: float) -> float:
    return time.monotonic() + seconds
