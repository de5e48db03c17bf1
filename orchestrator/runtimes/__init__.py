"""Runtimes: `make_runtime(settings, kind)` picks a backend by STRATUS_RUNTIME
(`process`, `docker` or `swarm`) for units of one kind: "worker" (DB workers,
the DB controller's) or "instance" (app instances, the app controller's). See
base.py for the interface and each backend's module for its on-disk or label
layout. With `swarm`, the "instance" kind is `SwarmRoles`: an app role is one
replicated service, declared whole (its `replicated` attribute tells the app
controller), not started instance by instance."""
from __future__ import annotations

from bus.settings import Settings

from .base import (KINDS, ExitCallback, Handle, Runtime, Spec, StartError, WorkerHandle, instance_env,
                   instance_log, worker_spec)

__all__ = ["KINDS", "ExitCallback", "Handle", "Runtime", "Spec", "StartError", "WorkerHandle", "instance_env",
           "instance_log", "make_runtime", "worker_spec"]


def make_runtime(settings: Settings, kind: str = "worker"):
    if kind not in KINDS:
        raise ValueError(f"runtime kind {kind!r}: use 'worker' or 'instance'")
    backend = (settings.runtime or "process").lower()
    if backend == "process":
        from .process import ProcessRuntime
        return ProcessRuntime(settings, kind=kind)
    if backend == "docker":
        from .docker import DockerRuntime  # lazily: only the docker stage needs it
        return DockerRuntime(settings, kind=kind)
    if backend == "swarm":
        from .swarm import SwarmRoles, SwarmRuntime
        return SwarmRuntime(settings) if kind == "worker" else SwarmRoles(settings)
    raise ValueError(f"STRATUS_RUNTIME {settings.runtime!r}: use 'process', 'docker' or 'swarm'")
