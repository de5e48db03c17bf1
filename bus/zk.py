"""ZooKeeper access: one kazoo client factory with Stratus' short session
timeout, and small JSON helpers over znodes."""
from __future__ import annotations

import json
import logging
from typing import Any

from kazoo.client import KazooClient
from contextlib import contextmanager

from kazoo.exceptions import KazooException, LockTimeout, NodeExistsError, NoNodeError
from kazoo.retry import KazooRetry

from .settings import Settings

log = logging.getLogger("stratus.zk")


def connect(settings: Settings, *, timeout: float | None = None, start_timeout: float = 15.0) -> KazooClient:
    """A started kazoo client. The session timeout decides how fast a dead
    process's ephemeral znodes vanish; the ensemble's own config must allow it
    (etc/zoo.cfg sets minSessionTimeout=400ms)."""
    zk = KazooClient(
        hosts=settings.zk_hosts,
        timeout=timeout if timeout is not None else settings.zk_timeout,
        connection_retry=KazooRetry(max_tries=-1, delay=0.1, max_delay=1.0),
        command_retry=KazooRetry(max_tries=3, delay=0.05, max_delay=0.5),
    )
    zk.start(timeout=start_timeout)
    return zk


class LockBusy(Exception):
    """Another holder kept the lock past the wait."""


@contextmanager
def held_lock(zk: KazooClient, path: str, timeout: float):
    """Hold the kazoo Lock at `path`, waiting at most `timeout` seconds
    (LockBusy past it). A release that fails means our session is gone, and
    the lock node with it."""
    lock = zk.Lock(path)
    try:
        acquired = lock.acquire(timeout=timeout)
    except LockTimeout:
        acquired = False
    if not acquired:
        raise LockBusy(f"{path} is still held after {timeout:g}s")
    try:
        yield
    finally:
        try:
            lock.release()
        except KazooException:
            pass


def get_json(zk: KazooClient, path: str, default: Any = None) -> Any:
    try:
        data, _ = zk.get(path)
    except NoNodeError:
        return default
    try:
        return json.loads(data) if data else default
    except ValueError:
        return default


def put_json(zk: KazooClient, path: str, value: Any, *, ephemeral: bool = False) -> None:
    data = json.dumps(value, separators=(",", ":")).encode()
    try:
        zk.set(path, data)
    except NoNodeError:
        try:
            zk.create(path, data, ephemeral=ephemeral, makepath=True)
        except NodeExistsError:
            zk.set(path, data)


def children_json(zk: KazooClient, path: str) -> dict[str, Any]:
    """{child name: parsed data} for every child that still exists."""
    out = {}
    try:
        names = zk.get_children(path)
    except NoNodeError:
        return out
    for name in names:
        value = get_json(zk, f"{path}/{name}")
        if value is not None:
            out[name] = value
    return out
