"""The service registry in ZooKeeper: tenant service instances register an
ephemeral znode {host, port, health} under their cluster; the gateway watches
the children and keeps a live list (discovery by watches, not polling)."""
from __future__ import annotations

import json
import logging
import socket
import threading
import uuid
from typing import Callable

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import NoNodeError
from kazoo.recipe.watchers import ChildrenWatch

from .names import Paths
from .settings import Settings
from .zk import get_json

log = logging.getLogger("stratus.registry")


def advertise_host(settings: Settings) -> str:
    if settings.advertise_host:
        return settings.advertise_host
    if settings.bind_host not in ("0.0.0.0", "::", ""):
        return settings.bind_host
    return socket.gethostname()


class Registration:
    """One service instance's ephemeral znode. It is re-created when a new
    ZooKeeper session starts, and deleted on a clean shutdown."""

    def __init__(self, zk: KazooClient, settings: Settings, service: str, host: str, port: int,
                 health: str = "/health", extra: dict | None = None):
        self.zk = zk
        self.paths = Paths(settings.cluster)
        self.service = service
        self.instance_id = f"{host}:{port}-{uuid.uuid4().hex[:6]}"
        self.path = f"{self.paths.service(service)}/{self.instance_id}"
        self.data = {"host": host, "port": port, "health": health, "service": service, **(extra or {})}
        self._closed = False
        zk.add_listener(self._on_state)
        self._create()

    def _create(self) -> None:
        payload = json.dumps(self.data).encode()
        try:
            self.zk.create(self.path, payload, ephemeral=True, makepath=True)
        except Exception as exc:
            if type(exc).__name__ == "NodeExistsError":
                self.zk.set(self.path, payload)
            else:
                raise

    def _on_state(self, state) -> None:
        # A new session after expiry lost our ephemeral node: put it back.
        if state == KazooState.CONNECTED and not self._closed:
            threading.Thread(target=self._recreate, daemon=True).start()

    def _recreate(self) -> None:
        if self._closed:
            return
        try:
            if not self.zk.exists(self.path):
                self._create()
        except Exception as exc:
            log.warning("re-registering %s failed: %s", self.path, exc)

    def close(self) -> None:
        self._closed = True
        try:
            self.zk.remove_listener(self._on_state)
            self.zk.delete(self.path)
        except (NoNodeError, Exception):
            pass


def register(zk: KazooClient, settings: Settings, service: str, port: int, *, health: str = "/health",
             extra: dict | None = None) -> Registration:
    return Registration(zk, settings, service, advertise_host(settings), port, health, extra)


class ServiceWatch:
    """The live instances of one service, kept current by a children watch.
    `on_change(instances)` is called with {instance_id: data} on every change."""

    def __init__(self, zk: KazooClient, settings: Settings, service: str,
                 on_change: Callable[[dict], None] | None = None):
        self.zk = zk
        self.path = Paths(settings.cluster).service(service)
        self.service = service
        self.instances: dict[str, dict] = {}
        self._on_change = on_change
        self._lock = threading.Lock()
        zk.ensure_path(self.path)
        ChildrenWatch(zk, self.path, self._children)

    def _children(self, children: list[str]) -> None:
        current = {}
        for child in children:
            data = get_json(self.zk, f"{self.path}/{child}")
            if data:
                current[child] = data
        with self._lock:
            self.instances = current
        if self._on_change:
            try:
                self._on_change(dict(current))
            except Exception:
                log.exception("service watch callback failed")

    def snapshot(self) -> dict[str, dict]:
        with self._lock:
            return dict(self.instances)
