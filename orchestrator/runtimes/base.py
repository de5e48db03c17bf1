"""The worker runtime interface: one small interface, several backends (the
way Patroni keeps one DCS interface over etcd, ZooKeeper, Consul...).
STRATUS_RUNTIME picks the backend: `process` (subprocesses) or `docker`."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

ExitCallback = Callable[[str, "int | None"], None]  # (worker_id, exit code or None)


@dataclass
class WorkerHandle:
    id: str          # the worker id (python -m worker --id ID)
    pid: int         # the process id; for Docker, the container's main pid from inspect
    ref: Any = None  # backend object: a Popen, a container id...
    started: float = 0.0
    labels: dict = field(default_factory=dict)


class Runtime(ABC):
    name = "abstract"

    @abstractmethod
    def start_worker(self, worker_id: str) -> WorkerHandle:
        """Start `python -m worker --id worker_id` for this cluster."""

    @abstractmethod
    def stop_worker(self, worker_id: str, *, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM: the worker drains, then exits); kill after timeout."""

    @abstractmethod
    def kill_worker(self, worker_id: str) -> None:
        """SIGKILL, as a crash would."""

    @abstractmethod
    def workers(self) -> dict[str, WorkerHandle]:
        """The live workers this runtime started or adopted."""

    @abstractmethod
    def adopt(self) -> list[WorkerHandle]:
        """At start: take over workers an earlier orchestrator left running
        (or clean them up when they cannot be adopted)."""

    @abstractmethod
    def on_exit(self, callback: ExitCallback) -> None:
        """Register a callback for worker deaths the runtime sees itself
        (process exit, Docker `die` event): faster than a ZooKeeper session expiry."""

    @abstractmethod
    def close(self, *, remove_workers: bool = True) -> None:
        """Clean shutdown: stop (and with Docker remove) the workers it labelled."""
