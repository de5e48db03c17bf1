"""The runtime interface: one small interface over "units", several backends
(the way Patroni keeps one DCS interface over etcd, ZooKeeper, Consul...).
STRATUS_RUNTIME picks the backend: `process` (subprocesses), `docker`
(containers) or `swarm` (Swarm services: swarm.py; there an app role is one
replicated service, declared whole by the app controller through
apply_role/tasks/remove_role/kill_task, not started unit by unit).

A unit is one running program described by a `Spec`. A runtime runs the units
of one *kind*, in a namespace of its own:

  kind "worker"    DB workers, `python -m worker --id w-...`, for the DB
                   cluster's controller (orchestrator/control.py);
  kind "instance"  app instances (paas.md, Apps), `i-...`, for the app
                   controller.

Two runtimes of different kinds over the same cluster never see, adopt or stop
each other's units (separate pid-file directories, separate Docker labels).

Contract of every backend:
  start(spec) -> Handle      start the unit; its exit is reported once through
                             on_exit(callback(id, code)); code is the exit
                             status (negative: killed by that signal), or None
                             when it is not known (a unit adopted from an
                             earlier orchestrator, which is not our child)
  stop(id, timeout=10)       SIGTERM (to the unit's process group), SIGKILL
                             after `timeout` seconds; returns once it is gone
                             (or after a bounded wait); an unknown id is a no-op
  kill(id)                   SIGKILL at once, as a crash; KeyError if unknown
  running() -> {id: Handle}  the live units this runtime started or adopted
  adopt() -> [Handle]        take over the units an earlier orchestrator left
                             running; their handles carry the labels, host and
                             port they were started with; what cannot be
                             adopted (dead, a recycled pid) is cleaned up
  on_exit(cb)                register an exit callback
  close(remove=True)         stop watching; with remove, stop (and with Docker
                             remove) the units it started or adopted; without,
                             leave them running for a successor to adopt

The worker API the DB controller calls (start_worker, stop_worker,
kill_worker, workers, close(remove_workers=...), pid_of) is a thin wrapper:
start_worker(id) = start(worker_spec(id)), and so on.

The environment of an app instance (`instance_env`) is built from nothing:
PATH, LANG=C.UTF-8, HOME (its working directory), PYTHONUNBUFFERED=1,
PYTHONPATH=<repository root> (process runtime only, so `bus` imports; the
Docker base image has bus installed), PORT when the spec has a port, then the
spec's own env. It never inherits the orchestrator's environment, which holds
the platform's broker password, the token secret and the admin password."""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any, Callable, Mapping

ExitCallback = Callable[[str, "int | None"], None]  # (unit id, exit code or None)

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository root
KINDS = ("worker", "instance")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class StartError(RuntimeError):
    """A unit could not be started (no such program, no image, a build that
    failed...). The message says why; nothing of the unit is left running."""


@dataclass(frozen=True)
class Spec:
    """What to run. `id` is unique in the cluster: "w-1a2b3c4d" (worker),
    "i-1a2b3c4d" (instance)."""
    id: str
    argv: tuple[str, ...]                 # the command; process: run in `cwd`
    cwd: str | None = None                # process: the app's unpacked package dir
    env: Mapping[str, str] = field(default_factory=dict)     # added to the unit's environment
    image: str | None = None              # docker: run this image...
    context: str | None = None            # ...or build one from this directory on the base image
    port: int | None = None               # web instance: the port it must serve HTTP on
    labels: Mapping[str, str] = field(default_factory=dict)  # tenant, app, role, digest...: returned on adopt
    log: str | None = None                # log file, relative to the cluster's logs dir

    def __post_init__(self):
        check_id(self.id)
        argv = tuple(str(a) for a in (self.argv or ()))
        object.__setattr__(self, "argv", argv)
        object.__setattr__(self, "env", MappingProxyType({str(k): str(v) for k, v in dict(self.env or {}).items()}))
        labels = {str(k): str(v) for k, v in dict(self.labels or {}).items()}
        for k in labels:
            if not _LABEL_KEY_RE.match(k):
                raise ValueError(f"label key {k!r}: 1-64 of letters, digits, '_', '.', '-'")
        object.__setattr__(self, "labels", MappingProxyType(labels))
        if self.port is not None:
            port = int(self.port)
            if not 0 < port < 65536:
                raise ValueError(f"port {self.port!r} is not 1-65535")
            object.__setattr__(self, "port", port)
        if self.log is not None:
            check_log_path(self.log)
        if not argv and not self.image and not self.context:
            raise ValueError(f"unit {self.id}: no command and no image")

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "argv": list(self.argv), "cwd": self.cwd, "env": dict(self.env),
                "image": self.image, "context": self.context, "port": self.port,
                "labels": dict(self.labels), "log": self.log}


@dataclass
class Handle:
    """A running unit. `pid` is the host's pid (for Docker, the container's
    main pid from inspect); `host`/`port` is where a web instance serves;
    `labels` are the spec's labels (workers: {"adopted": bool, ...} as before);
    `ref` is the backend's object (a Popen, a container id)."""
    id: str
    pid: int
    host: str = "127.0.0.1"
    port: int | None = None
    started: float = 0.0
    labels: dict = field(default_factory=dict)
    ref: Any = None
    adopted: bool = False
    log: str | None = None     # the log file's path (absolute), when the runtime captures one


WorkerHandle = Handle  # the name orchestrator/control.py and older code use


def check_id(unit_id: str) -> str:
    if not isinstance(unit_id, str) or not ID_RE.match(unit_id):
        raise ValueError(f"unit id {unit_id!r}: 1-64 of letters, digits, '_', '.', '-', "
                         "starting with a letter or digit")
    return unit_id


def check_log_path(rel: str) -> PurePosixPath:
    """A log path relative to the logs dir that stays inside it."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or any(part in ("", ".", "..") for part in rel.split("/")):
        raise ValueError(f"log path {rel!r} must be relative, without '.' or '..' parts")
    return p


def instance_log(tenant: str, app: str, instance_id: str) -> str:
    """The log path (relative to the cluster's logs dir) of an app instance."""
    return f"instances/{tenant}/{app}/{instance_id}.log"


def worker_spec(worker_id: str) -> Spec:
    """The spec of DB worker `worker_id`: `python -m worker --id ID` from the repository."""
    return Spec(id=worker_id, argv=("python", "-m", "worker", "--id", worker_id), cwd=str(ROOT),
                log=f"{worker_id}.log")


def instance_env(spec: Spec, *, path: str | None, home: str, pythonpath: str | None) -> dict[str, str]:
    """The whole environment of an app instance (see the module docstring):
    built from nothing, never from the orchestrator's own environment."""
    env: dict[str, str] = {}
    if path:
        env["PATH"] = path
    env["LANG"] = "C.UTF-8"
    env["HOME"] = home
    env["PYTHONUNBUFFERED"] = "1"
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    if spec.port is not None:
        env["PORT"] = str(spec.port)
    env.update(spec.env)
    return env


class Runtime(ABC):
    name = "abstract"
    kind = "worker"

    # --- the unit interface ---------------------------------------------------------
    @abstractmethod
    def start(self, spec: Spec) -> Handle:
        """Start the unit `spec` describes."""

    @abstractmethod
    def stop(self, unit_id: str, timeout: float = 10.0) -> None:
        """Graceful stop: SIGTERM (a worker drains, then exits), SIGKILL after timeout."""

    @abstractmethod
    def kill(self, unit_id: str) -> None:
        """SIGKILL, as a crash would. KeyError for an id this runtime does not run."""

    @abstractmethod
    def running(self) -> dict[str, Handle]:
        """The live units this runtime started or adopted."""

    @abstractmethod
    def adopt(self) -> list[Handle]:
        """At start: take over units an earlier orchestrator left running
        (or clean them up when they cannot be adopted)."""

    @abstractmethod
    def on_exit(self, callback: ExitCallback) -> None:
        """Register a callback for unit deaths the runtime sees itself
        (process exit, Docker `die` event): faster than a ZooKeeper session expiry."""

    @abstractmethod
    def close(self, remove: bool = True, *, remove_workers: bool | None = None) -> None:
        """Clean shutdown: with `remove` (alias `remove_workers`), stop (and with
        Docker remove) the units it started or adopted."""

    def pid_of(self, unit_id: str) -> int | None:
        h = self.running().get(unit_id)
        return h.pid if h else None

    # --- the worker API (orchestrator/control.py) ----------------------------------------
    def start_worker(self, worker_id: str) -> Handle:
        """Start `python -m worker --id worker_id` for this cluster."""
        return self.start(worker_spec(worker_id))

    def stop_worker(self, worker_id: str, *, timeout: float = 10.0) -> None:
        self.stop(worker_id, timeout=timeout)

    def kill_worker(self, worker_id: str) -> None:
        self.kill(worker_id)

    def workers(self) -> dict[str, Handle]:
        return self.running()
