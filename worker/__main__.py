"""python -m worker --id ID  (also: stratus worker)

A worker whose SQLite store does not exist yet (new, or rebuilt) first fetches
the latest snapshot from a ready member (when STRATUS_SNAPSHOT_FETCH is on and
ZooKeeper shows a ready member), then starts as on any restart: it resumes the
log from the snapshot's stream offset. Beside the worker runs its snapshot
service (worker/snapshot.py). When the worker exits with EXIT_REBUILD (77,
diverged), its store is moved aside to `store.sqlite.diverged` (the one kept
for inspection), so the next worker started under this id is a fresh one."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import uuid
from pathlib import Path

from bus.settings import Settings, load

log = logging.getLogger("stratus.worker")


def sqlite_path(db_url: str) -> Path | None:
    """The file of a SQLite URL (sqlite:///path); None for any other store."""
    from sqlalchemy.engine import make_url
    url = make_url(db_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


def any_ready_member(settings: Settings, worker_id: str) -> bool:
    """Does ZooKeeper show a ready worker (other than us)? Quick: a fresh
    cluster answers no at once."""
    from bus.names import Paths
    from bus.zk import children_json, connect
    try:
        zk = connect(settings, start_timeout=5.0)
    except Exception as exc:
        log.warning("ZooKeeper unreachable (%r): no snapshot", exc)
        return False
    try:
        ws = children_json(zk, Paths(settings.cluster).workers)
        return any(w.get("ready") and w.get("state") != "diverged" for i, w in ws.items() if i != worker_id)
    finally:
        zk.stop()
        zk.close()


def fetch_if_new(settings: Settings, worker_id: str, path: Path | None) -> None:
    if path is None:
        log.info("the store is not a SQLite file: no snapshot, the log is replayed")
        return
    if path.exists() or not settings.snapshot_fetch:
        return
    if not any_ready_member(settings, worker_id):
        log.info("new store, no ready member: starting from the log")
        return
    from bus.names import Names
    from .snapshot import fetch_snapshot
    t0 = time.monotonic()
    info = fetch_snapshot(settings, Names(settings.cluster), path, requester=worker_id)
    if info is None:
        log.warning("no snapshot could be fetched: replaying the retained log")
    else:
        log.info("starting from the snapshot at LSN %d (fetched in %.2fs)", info["lsn"], time.monotonic() - t0)


def move_aside(path: Path) -> None:
    """Keep one diverged copy for inspection; the next start is a fresh worker."""
    aside = Path(f"{path}.diverged")
    for side in ("", "-wal", "-shm", "-journal"):
        Path(f"{aside}{side}").unlink(missing_ok=True)
    for side in ("", "-wal", "-shm", "-journal"):
        src = Path(f"{path}{side}")
        if src.exists():
            os.replace(src, f"{aside}{side}")
    log.warning("diverged: the store was moved to %s; a fresh worker will start from a snapshot", aside)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="stratus worker", description="Run one Stratus DB worker.")
    p.add_argument("--id", default=os.environ.get("STRATUS_WORKER_ID") or f"w-{uuid.uuid4().hex[:8]}")
    p.add_argument("--db", default=os.environ.get("STRATUS_WORKER_DB"),
                   help="SQLAlchemy URL of the store (default: a SQLite file in the state dir)")
    args = p.parse_args(argv)
    settings = load()
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format=f"%(asctime)s worker[{args.id}] %(levelname)s %(name)s: %(message)s")
    for noisy in ("pika", "kazoo"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    db = args.db
    if not db:
        path = settings.cluster_state_path() / "workers" / args.id / "store.sqlite"
        path.parent.mkdir(parents=True, exist_ok=True)
        db = settings.db_url.format(path=path)
    path = sqlite_path(db)
    fetch_if_new(settings, args.id, path)
    from .node import EXIT_REBUILD, Worker
    from .snapshot import SnapshotService
    worker = Worker(settings, args.id, db)
    service = None
    if path is not None:
        # A master serves snapshots only while no slave is ready: a slave's are cheaper to resume from.
        service = SnapshotService(settings, args.id, path,
                                  is_ready=lambda: worker.ready and (worker.role == "slave" or worker.master_serves_reads),
                                  applied_lsn=lambda: worker.store.applied_lsn, role=lambda: worker.role)
        service.start()
    try:
        code = worker.run()
    except Exception:
        if worker.state != "diverged":
            raise
        # Diverged, then the bus failed under it on the way out: it still needs rebuilding.
        log.exception("the worker failed after it diverged")
        code = EXIT_REBUILD
    finally:
        if service is not None:
            service.stop()
    if code == EXIT_REBUILD and path is not None:
        if service is not None:
            service.join(5)   # it may be reading the store
        worker.store.close()
        move_aside(path)
    return code


if __name__ == "__main__":
    sys.exit(main())
