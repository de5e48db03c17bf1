"""Generated secrets kept in the state directory, readable by their owner
alone (0600): the admin password and the token signing key. A value from the
environment always wins; otherwise the file is read, or created once."""
from __future__ import annotations

import os
import secrets as _rand
from pathlib import Path


def load_or_create(path: Path, *, nbytes: int = 24) -> str:
    """The secret stored at `path`, generating it on first use. Creation is
    atomic (O_EXCL), so two gateways starting together agree on one value."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        value = path.read_text().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    value = _rand.token_urlsafe(nbytes)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{_rand.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (value + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if someone else created it meanwhile
    except FileExistsError:
        value = path.read_text().strip()
    finally:
        os.unlink(tmp)
    os.chmod(path, 0o600)
    return value
