"""What one app instance may use, in every runtime (issue #22,
docs/security.md): memory, CPU, processes, disk written, log volume. Each a
setting with a default; the app's answer shows them (orchestrator/apps/routes.py).
The process runtime enforces them with cgroups, a tmpfs and RLIMIT_FSIZE
(confine.py); the Docker and Swarm runtimes with the engine's own limits."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from bus.settings import env_float, env_int

MIB = 1024 ** 2


@dataclass(frozen=True)
class Limits:
    """What one instance may use (settings, paas.md: Apps; shown in the app's
    answer). memory and disk in MiB, cpus in cores, pids processes and
    threads, log in MiB."""
    memory_mb: int = 256
    cpus: float = 1.0
    pids: int = 128
    disk_mb: int = 64
    log_mb: int = 64

    @classmethod
    def from_env(cls) -> "Limits":
        lim = cls(memory_mb=env_int("STRATUS_INSTANCE_MEMORY_MB", cls.memory_mb),
                  cpus=env_float("STRATUS_INSTANCE_CPUS", cls.cpus),
                  pids=env_int("STRATUS_INSTANCE_PIDS", cls.pids),
                  disk_mb=env_int("STRATUS_INSTANCE_DISK_MB", cls.disk_mb),
                  log_mb=env_int("STRATUS_INSTANCE_LOG_MB", cls.log_mb))
        lim.check()
        return lim

    def check(self) -> None:
        if self.memory_mb < 32 or self.pids < 8 or self.disk_mb < 1 or self.log_mb < 1 or not self.cpus > 0:
            raise ValueError(f"instance limits {self.to_dict()}: at least 32 MiB of memory, 8 processes, "
                             "1 MiB of disk and of log, and more than 0 CPUs")

    def to_dict(self) -> dict:
        return asdict(self)
