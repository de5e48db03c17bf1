"""The restocker: a background role of the catalog service. Every
settings.restock_interval seconds, each toy whose quantity is 0 goes back to
100 in one write, and each restocked name is published on the invalidate
exchange (the gateway drops its cached copy).

However many catalog instances run, one restocker acts at a time: the role
is a lease on the bus (bus/lease.py: the exclusive queue
Names.lease_queue("toystore", "restock"), declared with the tenant's own
broker account; the others are refused with 405 RESOURCE_LOCKED). Its holder
keeps it until its process or its broker connection ends; another instance
then takes it over within a second. The holder checks before every round
that it still holds the lease, so a holder whose connection died stops
acting at once. It needs nothing but the broker: no ZooKeeper, which an app
instance cannot reach.

Observable: a log line "restock role taken by <id>" when an instance takes
the role, "restocked N toys: [...]" per round that refilled something, and
the row of the tenant's table `restocker` (toystore/schema.py) =
{"role": "restocker", "holder", "rounds", "restocked", "last" (a JSON list),
"at"}, written by the holder in the same write as every refill."""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Callable

from bus import ops, web
from bus.client import DBClient
from bus.errors import DBError
from bus.lease import Lease
from bus.names import Names
from bus.settings import Settings
from toystore import schema

log = logging.getLogger("stratus.catalog.restock")


def read_status(db: DBClient, *, min_lsn: int | None = None, primary: bool = False) -> dict | None:
    """The restocker's status row ("last" decoded), or None before the first refill."""
    try:
        rows = db.read(ops.select(schema.RESTOCK_STATUS, [ops.eq("role", schema.RESTOCK_STATUS)]),
                       min_lsn=min_lsn, primary=primary).result
    except DBError as exc:
        if exc.code == "unknown_table":
            return None
        raise
    if not rows:
        return None
    return {**rows[0], "last": json.loads(rows[0]["last"])}


def restock_once(db: DBClient, names: Names, status: Callable[[list[str]], dict] | None = None) -> list[str]:
    """One round: find the toys at 0 and set them back to RESTOCK_TO in one
    write; publish each restocked name. Returns the names restocked. With
    `status`, the same write stores status(names) as the status row.

    Only the restocker ever raises a quantity, so a toy seen at 0 is still at
    0 when the write runs; the write's `quantity = 0` guard keeps it exact
    even if two restockers ever overlapped. A toy that reaches 0 after the
    read waits for the next round."""
    rows, _ = web.read_all(db, ops.select(schema.PRODUCTS, [["quantity", "=", 0]], columns=["name"]), ["name"])
    empty = [r["name"] for r in rows]
    if not empty:
        return []
    write = [ops.update(schema.PRODUCTS, [["name", "in", empty], ["quantity", "=", 0]],
                        set={"quantity": schema.RESTOCK_TO})]
    if status is not None:
        row = {**status(empty), "role": schema.RESTOCK_STATUS, "last": json.dumps(empty), "at": time.time()}
        write += [schema.restock_status_table(), ops.upsert(schema.RESTOCK_STATUS, row)]
    reply = db.write(write)
    for name in empty:
        try:
            db.publish(names.invalidate_exchange_of(schema.TENANT), name.encode())
        except DBError as exc:
            log.warning("invalidation of %s not published: %r", name, exc)
    log.info("restocked %d toys: %s (lsn %d)", reply.result[0]["rowcount"], empty, reply.lsn)
    return empty


class Restocker(threading.Thread):
    def __init__(self, settings: Settings, db: DBClient):
        super().__init__(name="restocker", daemon=True)
        self.settings = settings
        self.db = db
        self.names = Names(settings.cluster)
        self.id = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
        self.stop_event = threading.Event()
        self.rounds = 0
        self.restocked = 0
        self.holding = False
        self.interval = max(0.1, float(settings.restock_interval))
        self.lease = Lease(settings, schema.RESTOCK_LEASE, tenant=schema.TENANT, holder=self.id)

    def stop(self) -> None:
        """Stop acting and give the role up now (the next instance need not
        wait for the broker to notice this one's connection is gone)."""
        self.stop_event.set()
        self.lease.release()

    def run(self) -> None:
        self.lease.start()
        while not self.stop_event.is_set():
            if self.lease.held.wait(0.5) and not self.stop_event.is_set():
                self._act(self.lease.term)

    def _still_holding(self, term: int) -> bool:
        return self.lease.held.is_set() and self.lease.term == term

    def _status(self, done: list[str]) -> dict:
        return {"holder": self.id, "rounds": self.rounds + 1, "restocked": self.restocked + len(done)}

    def _act(self, term: int) -> None:
        self.holding = True
        log.info("restock role taken by %s (every %gs)", self.id, self.interval)
        try:
            while not self.stop_event.wait(self.interval):  # a round every interval, the first one after it
                if not self._still_holding(term):
                    log.warning("restock role lost by %s", self.id)
                    return
                try:
                    done = restock_once(self.db, self.names, self._status)
                except DBError as exc:
                    log.warning("restock round failed: %r", exc)
                    done = []
                self.rounds += 1
                self.restocked += len(done)
        finally:
            self.holding = False


def main() -> None:
    """`python -m catalog.restock`: the restocker alone, as the toy store's
    worker role (toystore/manifest.json). It keeps a heartbeat
    (bus.instance) and stops on SIGTERM, giving the role up at once."""
    import signal

    from bus import instance
    from bus.client import shared
    from bus.service import setup_logging
    from bus.settings import load

    settings = load()
    setup_logging("restocker", settings.log_level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    db = shared("restocker", schema.TENANT)
    r = Restocker(settings, db)
    r.start()
    instance.keep_heartbeat(stop)
    log.info("restocker %s running (every %gs)", r.id, r.interval)
    stop.wait()
    r.stop()
    log.info("restocker %s stopped", r.id)


if __name__ == "__main__":
    main()
