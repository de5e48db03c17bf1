"""python -m worker --id ID  (also: stratus worker)"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import uuid

from bus.settings import load


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
    from .node import Worker
    return Worker(settings, args.id, db).run()


if __name__ == "__main__":
    sys.exit(main())
