"""The load client (stratus load toystore) against real services: no
mismatches with 5 clients at p = 0.5, and no order lost or doubled when the
master is killed in the middle of a run."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter

import pytest

from bus.cluster import choose_master
from harness import ROOT, wait_for
from test_toystore_support import (db_rows, gateway_available, start_catalog, start_gateway, start_order)

pytestmark = pytest.mark.timeout(300)


def run_client(cluster, out, *args, timeout=120, cli=False):
    """The client as a process: `python -m stratus.load_toystore`, or with
    cli=True the real command line, `stratus load toystore` (stratus.cli)."""
    entry = ["stratus.cli", "load", "toystore"] if cli else ["stratus.load_toystore"]
    cmd = [sys.executable, "-m", *entry, "--quiet", "--json", str(out), *args]
    p = subprocess.run(cmd, cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, json.loads(out.read_text()) if out.exists() else None, p.stdout + p.stderr


def assert_orders_in_table(db, summary):
    """Every order the client was given a number for is in the table, as ordered."""
    table = {r["number"]: r for r in db_rows(db, "orders")}
    for o in summary["orders"]:
        assert table.get(o["number"]) == o, (o, table.get(o["number"]))
    return table


def check_run(cluster, db, tmp_path, *urls, cli=False):
    rc, summary, output = run_client(cluster, tmp_path / "load.json", *urls, "--clients", "5", "--p", "0.5",
                                     "--duration", "4", "--seed", "7", cli=cli)
    assert rc == 0, output
    assert summary["mismatches"] == [], output
    assert summary["orders_placed"] > 0, output
    assert summary["types"]["check"]["ok"] == summary["orders_placed"]
    assert summary["types"]["query"]["errors"] == 0 and summary["types"]["order"]["errors"] == 0, output
    for t in ("query", "order", "check"):
        assert summary["types"][t]["p50_ms"] is not None and summary["types"][t]["p99_ms"] >= summary["types"][t]["p50_ms"]
    assert "p50 ms" in output and "mismatches 0" in output
    assert_orders_in_table(db, summary)
    return summary


def test_five_clients_half_order_no_mismatch(cluster, tmp_path):
    cluster.bootstrap(slaves=1)
    db = cluster.client(tenant="toystore")
    catalog = start_catalog(cluster, "catalog", STRATUS_RESTOCK_INTERVAL=1)
    order = start_order(cluster, "order")
    check_run(cluster, db, tmp_path, "--url", catalog, "--orders-url", order)
    if gateway_available():
        gw = start_gateway(cluster, "gw")
        (tmp_path / "load.json").unlink()
        check_run(cluster, db, tmp_path, "--url", gw, cli=True)


def test_client_reports_a_mismatch(cluster, tmp_path):
    """A client that is told a wrong story notices: orders are checked for real."""
    cluster.bootstrap(slaves=0)
    db = cluster.client(tenant="toystore")
    catalog = start_catalog(cluster, "catalog", STRATUS_RESTOCK_INTERVAL=3600)
    order = start_order(cluster, "order")
    from stratus import load_toystore as lt
    summary = lt.run(catalog, orders_url=order, clients=1, p=1.0, requests=3, seed=1, progress=False)
    assert summary["orders_placed"] == 3 and summary["mismatches"] == []
    # rewrite one order behind the client's back, then check its orders again
    from bus import ops
    first = summary["orders"][0]
    db.write([ops.update("orders", [ops.eq("number", first["number"])], set={"quantity": first["quantity"] + 7})])
    sim = lt.SimClient(0, catalog, 1.0, ["Tux"], lt.Stats(), stop_at=None, iterations=0, seed=1, timeout=10,
                       stop=__import__("threading").Event(), orders_url=order)
    sim.placed = list(summary["orders"]) + [{"number": 10**6, "name": "Tux", "quantity": 1}]
    sim.check_all()
    whys = sorted(m["why"] for m in sim.mismatches)
    assert len(whys) == 2 and "not found (404)" in whys and any("service has" in w for w in whys)


def test_master_killed_during_a_run_loses_and_doubles_nothing(cluster, tmp_path):
    cluster.bootstrap(slaves=2)
    db = cluster.client(tenant="toystore")
    catalog = start_catalog(cluster, "catalog", STRATUS_RESTOCK_INTERVAL=3600)
    order = start_order(cluster, "order")
    # enough stock that the clients keep ordering through the whole run (no restocker here)
    from bus import ops
    db.write([ops.update("products", [], set={"quantity": 5000})])
    out = tmp_path / "load.json"
    cmd = [sys.executable, "-m", "stratus.load_toystore", "--quiet", "--json", str(out), "--url", catalog,
           "--orders-url", order, "--clients", "5", "--p", "0.3", "--duration", "10", "--seed", "3"]
    client = subprocess.Popen(cmd, cwd=ROOT, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        time.sleep(4)
        cluster.kill("w1")
        new = choose_master([w for w in cluster.workers().values() if w["id"] != "w1"])
        assert new is not None
        cluster.promote(new["id"])
        cluster.wait_master(new["id"])
        at_promotion = len(db_rows(db, "orders"))
        output, _ = client.communicate(timeout=150)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)
    summary = json.loads(out.read_text())
    print(output)
    assert client.returncode == 0, output
    assert summary["mismatches"] == [], output
    assert summary["orders_placed"] > 0
    numbers = [o["number"] for o in summary["orders"]]
    assert len(numbers) == len(set(numbers))           # no number handed out twice
    table = assert_orders_in_table(db, summary)         # none lost
    assert len(table) > at_promotion                    # the run went on with the new master
    assert sorted(table) == list(range(len(table)))     # gap-free, no number doubled
    # none doubled: each product's stock went down by exactly what its orders hold
    sold = Counter()
    for r in table.values():
        sold[r["name"]] += r["quantity"]
    for p in db_rows(db, "products"):
        assert p["quantity"] == 5000 - sold[p["name"]], (p, sold[p["name"]])
    # and every worker left holds the same orders
    wait_for(lambda: all(w["applied_lsn"] == cluster.workers()[new["id"]]["applied_lsn"]
                         for w in cluster.workers().values()), 20, what="slaves caught up")
