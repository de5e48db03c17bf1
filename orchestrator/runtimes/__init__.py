"""Worker runtimes: `make_runtime(settings)` picks one by STRATUS_RUNTIME."""
from __future__ import annotations

from bus.settings import Settings

from .base import Runtime, WorkerHandle

__all__ = ["Runtime", "WorkerHandle", "make_runtime"]


def make_runtime(settings: Settings) -> Runtime:
    kind = (settings.runtime or "process").lower()
    if kind == "process":
        from .process import ProcessRuntime
        return ProcessRuntime(settings)
    if kind == "docker":
        from .docker import DockerRuntime  # lazily: only the docker stage needs it
        return DockerRuntime(settings)
    raise ValueError(f"STRATUS_RUNTIME {settings.runtime!r}: use 'process' or 'docker'")
