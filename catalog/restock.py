"""The restocker: a background role of the catalog service. Every
settings.restock_interval seconds, each toy whose quantity is 0 goes back to
100 in one write, and each restocked name is published on the invalidate
exchange (the gateway drops its cached copy).

However many catalog instances run, one restocker acts at a time: the role
is a ZooKeeper lock (kazoo Lock at Paths(cluster).lock("restock")). Its holder
keeps it until its process or its ZooKeeper session ends; another instance
then takes it over. The holder checks before every round that its lock node
still exists, so a holder whose session expired stops acting at once.

Observable: a log line "restock role taken by <id>" when an instance takes
the role, "restocked N toys: [...]" per round that refilled something, and the
znode <cluster root>/toystore/restocker = {"holder", "rounds", "restocked",
"last", "at"} updated by the holder after every round that restocked."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from kazoo.client import KazooState

from bus import ops, web
from bus import zk as bzk
from bus.client import DBClient
from bus.errors import DBError
from bus.names import Names, Paths
from bus.settings import Settings
from toystore import schema

log = logging.getLogger("stratus.catalog.restock")


def status_path(paths: Paths) -> str:
    return f"{paths.root}/toystore/restocker"


def restock_once(db: DBClient, names: Names) -> list[str]:
    """One round: find the toys at 0 and set them back to RESTOCK_TO in one
    write; publish each restocked name. Returns the names restocked.

    Only the restocker ever raises a quantity, so a toy seen at 0 is still at
    0 when the write runs; the write's `quantity = 0` guard keeps it exact
    even if two restockers ever overlapped. A toy that reaches 0 after the
    read waits for the next round."""
    rows, _ = web.read_all(db, ops.select(schema.PRODUCTS, [["quantity", "=", 0]], columns=["name"]), ["name"])
    empty = [r["name"] for r in rows]
    if not empty:
        return []
    reply = db.write([ops.update(schema.PRODUCTS, [["name", "in", empty], ["quantity", "=", 0]],
                                 set={"quantity": schema.RESTOCK_TO})])
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
        self.paths = Paths(settings.cluster)
        self.id = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
        self.stop_event = threading.Event()
        self.rounds = 0
        self.restocked = 0
        self.holding = False
        self.interval = max(0.1, float(settings.restock_interval))
        self._zk = None
        self._lock = None

    def stop(self) -> None:
        """Stop acting and give the role up now (the next instance need not
        wait for this one's ZooKeeper session to expire)."""
        self.stop_event.set()
        lock, zk = self._lock, self._zk
        try:
            if lock is not None:
                lock.release()
            if zk is not None:
                zk.stop()
        except Exception:
            pass

    def run(self) -> None:
        while not self.stop_event.is_set():
            zk = None
            try:
                zk = self._zk = bzk.connect(self.settings, timeout=max(self.settings.zk_timeout, 2.0))
                lost = threading.Event()

                def on_state(state):
                    if state in (KazooState.SUSPENDED, KazooState.LOST):
                        lost.set()
                zk.add_listener(on_state)
                self._hold_role(zk, lost)
            except Exception as exc:
                log.warning("restocker: %r; retrying", exc)
            finally:
                self.holding = False
                self._zk = self._lock = None
                if zk is not None:
                    try:
                        zk.stop()
                        zk.close()
                    except Exception:
                        pass
            self.stop_event.wait(1.0)

    def _hold_role(self, zk, lost: threading.Event) -> None:
        lock = self._lock = zk.Lock(self.paths.lock(schema.RESTOCK_LOCK), identifier=self.id)
        while not self.stop_event.is_set() and not lost.is_set():
            if lock.acquire(timeout=1.0):
                break
        else:
            return
        try:
            me = f"{lock.path}/{lock.node}"
            self.holding = True
            log.info("restock role taken by %s (every %gs)", self.id, self.interval)
            while not self.stop_event.wait(self.interval):  # a round every interval, the first one after it
                if lost.is_set() or not zk.exists(me):
                    log.warning("restock role lost by %s", self.id)
                    return
                try:
                    done = restock_once(self.db, self.names)
                except DBError as exc:
                    log.warning("restock round failed: %r", exc)
                    done = []
                self.rounds += 1
                if done:
                    self.restocked += len(done)
                    bzk.put_json(zk, status_path(self.paths), {
                        "holder": self.id, "rounds": self.rounds, "restocked": self.restocked,
                        "last": done, "at": time.time()})
        finally:
            self.holding = False
            try:
                lock.release()
            except Exception:
                pass


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
