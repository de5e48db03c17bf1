"""DB client throughput and latency: reads and writes per second, p50 and
p99, with 1 and with 8 client threads, against a real local cluster (a
master and two slaves) on the local RabbitMQ and ZooKeeper.

    .venv/bin/python benchmarks/db_client.py [--seconds 8] [--tenant NAME] [--record]

With --tenant the client connects with that tenant's own broker account (made
for the run and removed after), as an app instance does; without it, as the
platform. benchmarks/tenancy.py compares the two across revisions.

Targets on a 2-core machine: 8 threads >= 1,500 reads/s and >= 500 writes/s;
read p99 < 10 ms."""
from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from _common import pct, record

from bus import ops
from harness import LocalCluster


def run(db, kind: str, threads: int, seconds: float) -> dict:
    lat: list[float] = []
    errors = 0
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    counter = [0]

    def loop(t: int):
        nonlocal errors
        mine, errs = [], 0
        i = 0
        while time.monotonic() < stop_at:
            i += 1
            t0 = time.perf_counter()
            try:
                if kind == "read":
                    db.read(ops.select("kv", [ops.eq("k", f"k{i % 100}")]))
                else:
                    db.write([ops.upsert("kv", {"k": f"w{t}-{i}", "v": i})])
            except Exception:
                errs += 1
                continue
            mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)
            errors += errs
            counter[0] += len(mine)
    started = time.monotonic()
    ts = [threading.Thread(target=loop, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(seconds + 30)
    elapsed = time.monotonic() - started
    lat.sort()
    return {"kind": kind, "threads": threads, "ops": len(lat), "per_s": len(lat) / elapsed,
            "p50_ms": pct(lat, 50) * 1000, "p99_ms": pct(lat, 99) * 1000, "errors": errors}


def tenant_client(cluster, tenant: str):
    """A DBClient on the tenant's own broker account, and how to remove the account."""
    import dataclasses

    from bus import accounts, tenancy
    from bus.broker_admin import BrokerAdmin
    from bus.client import DBClient
    admin = BrokerAdmin(cluster.settings)
    password = tenancy.new_password()
    user = admin.put_tenant(cluster.names, tenant, password)
    url = accounts.tenant_amqp_url(cluster.settings.amqp_url, cluster.name, tenant, password)
    db = DBClient(dataclasses.replace(cluster.settings, amqp_url=url), name="bench")

    def remove():
        db.close()
        admin.delete_user(user)
    return db, remove


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--slaves", type=int, default=2)
    ap.add_argument("--tenant", help="connect with this tenant's own broker account")
    ap.add_argument("--record", action="store_true", help="append the figures to docs/benchmarks.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = LocalCluster(Path(tmp), name=f"bench{int(time.time())}")
        account = None
        try:
            cluster.bootstrap(slaves=args.slaves)
            if args.tenant:
                db, account = tenant_client(cluster, args.tenant)
            else:
                db = cluster.client(name="bench")
            db.create_table("kv", [ops.column("k", "text", nullable=False), ops.column("v", "integer")], ["k"])
            db.write([ops.insert_many("kv", [{"k": f"k{i}", "v": i} for i in range(100)])])
            rows = []
            for kind in ("write", "read"):
                for threads in (1, 8):
                    r = run(db, kind, threads, args.seconds)
                    rows.append(r)
                    print(f"{kind:5} threads={threads}: {r['per_s']:8.0f}/s  p50 {r['p50_ms']:6.2f} ms  "
                          f"p99 {r['p99_ms']:6.2f} ms  ({r['ops']} ops, {r['errors']} errors)", flush=True)
        finally:
            if account is not None:
                account()
            cluster.close()
    table = ["| operation | client threads | ops/s | p50 (ms) | p99 (ms) | errors |", "|---|---|---|---|---|---|"]
    table += [f"| {r['kind']} | {r['threads']} | {r['per_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} |"
              for r in rows]
    text = (f"`benchmarks/db_client.py --seconds {args.seconds:g}`: one DBClient, a master and {args.slaves} slaves "
            "(local processes), RabbitMQ and ZooKeeper on loopback. Reads are single-row selects by primary key; "
            "writes are single-row upserts.\n\n" + "\n".join(table) +
            "\n\nTargets: 8 threads >= 1,500 reads/s and >= 500 writes/s; read p99 < 10 ms.")
    print("\n" + text)
    if args.record:
        record("DB client (data plane)", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
