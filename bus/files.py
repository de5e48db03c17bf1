"""Files that must survive a crash once written: the directory entry of a
file installed by rename is durable only after its directory is fsynced
(worker snapshots, stored app packages)."""
from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
