"""python -m worker --id ID  (also: stratus worker)

A worker whose SQLite store does not exist yet (new, or rebuilt) first fetches
the latest snapshot from a ready member (when STRATUS_SNAPSHOT_FETCH is on and
ZooKeeper shows a ready member that has applied something), then starts as on
any restart: it resumes the log from the snapshot's stream offset. Beside the
worker runs its snapshot service (worker/snapshot.py).

When the worker exits with EXIT_REBUILD (77, diverged), its store is left as it
is for inspection and marked `store.sqlite.rebuild`; the next start under this
id moves it aside to `store.sqlite.diverged` (the one copy kept) and starts
fresh, from a snapshot.

The worker serves its Prometheus metrics on a port of its own
(worker/metrics.py: STRATUS_WORKER_METRICS_PORT, 0 = any), announced in its
membership record."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path

from bus.settings import Settings, load, set_component

log = logging.getLogger("stratus.worker")


def sqlite_path(db_url: str) -> Path | None:
    """The file of a SQLite URL (sqlite:///path); None for any other store."""
    from sqlalchemy.engine import make_url
    url = make_url(db_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


def ready_members_lsn(settings: Settings, worker_id: str) -> int | None:
    """The highest applied LSN of a ready worker (other than us) in ZooKeeper,
    None when none is ready. Quick: a fresh cluster answers at once."""
    from bus.names import Paths
    from bus.zk import children_json, connect
    try:
        zk = connect(settings, start_timeout=5.0)
    except Exception as exc:
        log.warning("ZooKeeper unreachable (%r): no snapshot", exc)
        return None
    try:
        ws = children_json(zk, Paths(settings.cluster).workers)
        lsns = [int(w.get("applied_lsn") or 0) for i, w in ws.items() if i != worker_id and w.get("ready")]
        return max(lsns) if lsns else None
    finally:
        zk.stop()
        zk.close()


def fetch_if_new(settings: Settings, worker_id: str, path: Path | None) -> None:
    if path is None:
        log.info("the store is not a SQLite file: no snapshot, the log is replayed")
        return
    if path.exists() or not settings.snapshot_fetch:
        return
    lsn = ready_members_lsn(settings, worker_id)
    if not lsn:   # none ready, or nothing written yet: the log is all there is
        log.info("new store, no ready member with data: starting from the log")
        return
    from bus.names import Names
    from .snapshot import fetch_snapshot
    t0 = time.monotonic()
    info = fetch_snapshot(settings, Names(settings.cluster), path, requester=worker_id)
    if info is None:
        log.warning("no snapshot could be fetched: replaying the retained log")
    else:
        log.info("starting from the snapshot at LSN %d (fetched in %.2fs)", info["lsn"], time.monotonic() - t0)


def rebuild_mark(path: Path) -> Path:
    return Path(f"{path}.rebuild")


def move_aside(path: Path) -> None:
    """Keep one diverged copy for inspection; the next start is a fresh worker."""
    aside = Path(f"{path}.diverged")
    for side in ("", "-wal", "-shm", "-journal"):
        Path(f"{aside}{side}").unlink(missing_ok=True)
    for side in ("", "-wal", "-shm", "-journal"):
        src = Path(f"{path}{side}")
        if src.exists():
            os.replace(src, f"{aside}{side}")
    log.warning("the diverged store was moved to %s: starting fresh", aside)


def main(argv: list[str] | None = None) -> int:
    set_component("worker")   # its own broker account (bus/broker_accounts.py)
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
    if path is not None and rebuild_mark(path).exists():
        move_aside(path)
        rebuild_mark(path).unlink()
    fetch_if_new(settings, args.id, path)
    from bus.cluster import Role, State
    from . import metrics
    from .node import EXIT_REBUILD, Worker
    from .snapshot import SnapshotService
    worker = Worker(settings, args.id, db)
    metrics_server = metrics.serve(worker, settings)
    service = None
    if path is not None:
        # A master serves snapshots only while no slave is ready: a slave's are cheaper to resume from.
        service = SnapshotService(settings, args.id, path,
                                  is_ready=lambda: worker.ready and (worker.role is Role.SLAVE or worker.master_serves_reads),
                                  applied_lsn=lambda: worker.store.applied_lsn, role=lambda: worker.role.value)
        service.start()
    try:
        code = worker.run()
    except Exception:
        if worker.state is not State.DIVERGED:
            raise
        # Diverged, then the bus failed under it on the way out: it still needs rebuilding.
        log.exception("the worker failed after it diverged")
        code = EXIT_REBUILD
    finally:
        if service is not None:
            service.stop()
        metrics.stop(metrics_server)
    if code == EXIT_REBUILD and path is not None:
        rebuild_mark(path).write_text(json.dumps({"at": time.time(), "reason": worker.reason}) + "\n")
        log.warning("diverged: the next start under this id rebuilds the store from a snapshot (%s)",
                    rebuild_mark(path))
    return code


if __name__ == "__main__":
    sys.exit(main())
