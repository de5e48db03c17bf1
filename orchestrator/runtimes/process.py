"""The process runtime: each unit is a local subprocess in its own session
(start_new_session: its own process group, which stop and kill signal), so it
outlives the orchestrator and a successor adopts it by its pid file.

Layout under $STRATUS_STATE_DIR/clusters/<cluster>/ (each kind its own
namespace: a worker runtime never lists runtime/instances/, an instance
runtime never lists runtime/*.json):

  runtime/<id>.json                  a DB worker: {id, kind, pid, pstart, boot, started, ...}
  runtime/instances/<id>.json        an app instance: {id, kind, pid, pstart, boot, host,
                                     port, argv, cwd, labels, log, started}
  logs/<id>.log                      a worker's output (stdout and stderr)
  logs/instances/<tenant>/<app>/<id>.log
                                     an instance's output (spec.log, relative to logs/)

`pid` is the unit's pid (its process group id too), `pstart` its start time
(field 22 of /proc/<pid>/stat, clock ticks since boot) and `boot` the kernel's
boot id: adopt() takes over a pid file's unit only when a live, non-zombie
process has that pid, that start time and that boot id (and, for a worker,
`worker` and its id on its command line), so a recycled pid is never adopted
(or signalled); a pid file that fails the check is removed. The unit's
environment is not kept in the file (it holds the tenant's credentials).

Environment: a worker inherits the orchestrator's (minus STRATUS_WORKER_ID and
STRATUS_WORKER_DB); an app instance gets only `base.instance_env`: PATH (the
orchestrator's, with its interpreter's directory first), LANG=C.UTF-8,
HOME=<its cwd>, PYTHONUNBUFFERED=1, PYTHONPATH=<repository root>, PORT (a web
instance), and spec.env. argv[0] == "python" runs the orchestrator's own
interpreter (sys.executable: the venv's packages import); any other argv[0]
runs as given, in spec.cwd.

Deaths are reported to the exit callbacks at once: a reaper thread waits on
each child and reports its exit status; units adopted from an earlier
orchestrator (not our children) are watched by a poller that checks their
pids a few times a second, and their exit is reported with code None."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from bus.settings import Settings

from .base import (ROOT, ExitCallback, Handle, Runtime, Spec, StartError, check_id, check_log_path,
                   instance_env)
from .confine import ConfinementUnavailable, Jail, inside_path

log = logging.getLogger("stratus.orchestrator.runtime")

ADOPTED_POLL = 0.2
CLOSE_DRAIN = 5.0
KILL_WAIT = 5.0


# --- /proc helpers ----------------------------------------------------------------
def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of `pid`, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])   # field 3 (state) and field 22 (starttime)
    except (OSError, IndexError, ValueError):
        return None


def proc_start_time(pid: int) -> int | None:
    st = proc_stat(pid)
    return st[1] if st else None


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def pid_alive(pid: int, worker_id: str | None = None, *, pstart: int | None = None) -> bool:
    """True when `pid` runs (not a zombie) and, if given, is worker `worker_id`
    and started at `pstart` (clock ticks since boot, as /proc/<pid>/stat says)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    st = proc_stat(pid)
    if st is None:
        return worker_id is None and pstart is None
    if st[0] in ("Z", "X"):
        return False
    if pstart is not None and st[1] != pstart:
        return False
    if worker_id is not None:
        raw = b""
        try:
            for _ in range(5):   # empty while the process is in the middle of exec()
                raw = Path(f"/proc/{pid}/cmdline").read_bytes()
                if raw:
                    break
                time.sleep(0.02)
        except OSError:
            return False
        argv = raw.split(b"\0")
        if worker_id.encode() not in argv or b"worker" not in argv:
            return False
    return True


def _signal_group(pid: int, sig: int) -> None:
    """Signal the unit's process group (it is its session's leader), else the pid."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class ProcessRuntime(Runtime):
    name = "process"

    def __init__(self, settings: Settings, *, python: str | None = None, kind: str = "worker"):
        if kind not in ("worker", "instance"):
            raise ValueError(f"runtime kind {kind!r}: use 'worker' or 'instance'")
        self.settings = settings
        self.kind = kind
        self.python = python or sys.executable
        base = settings.cluster_state_path()
        self.run_dir = base / "runtime" if kind == "worker" else base / "runtime" / "instances"
        self.log_dir = base / "logs"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.host = settings.advertise_host or "127.0.0.1"
        self.boot = boot_id()
        self._handles: dict[str, Handle] = {}
        self._pstart: dict[str, int | None] = {}
        self._exited: set[str] = set()
        self._callbacks: list[ExitCallback] = []
        self._lock = threading.RLock()
        self._closed = threading.Event()
        self._detached = False     # closed without removal: a successor owns the units now
        self._poller: threading.Thread | None = None
        # App instances run inside the walls (confine.py); DB workers are the platform's own.
        self.jail = Jail(settings) if kind == "instance" else None
        self._reasons: dict[str, str] = {}   # unit id -> why the walls ended it (exit_reason)

    # --- building a unit (pure) ------------------------------------------------------
    def argv_of(self, spec: Spec) -> list[str]:
        argv = list(spec.argv)
        if not argv:
            raise StartError(f"unit {spec.id}: the process runtime needs a command")
        if argv[0] == "python":
            argv[0] = self.python
        return argv

    def env_of(self, spec: Spec) -> dict[str, str]:
        if self.kind == "worker":
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            env.pop("STRATUS_WORKER_ID", None)
            env.pop("STRATUS_WORKER_DB", None)
            env.update(spec.env)
            return env
        path = os.pathsep.join(p for p in (os.path.dirname(self.python), os.environ.get("PATH", "/usr/bin:/bin"))
                               if p)
        return instance_env(spec, path=path, home=str(spec.cwd), pythonpath=str(ROOT))

    def jailed(self, spec: Spec, argv: list[str]) -> tuple[list[str], dict[str, str]]:
        """The command line and environment of an app instance inside its walls."""
        tenant = spec.labels.get("tenant")
        if not tenant:
            raise StartError(f"unit {spec.id}: an app instance needs its tenant (label 'tenant')")
        if not self._findable(argv[0], spec.cwd):
            raise OSError(2, "No such file or directory inside the instance")
        try:
            return self.jail.wrap(spec.id, tenant, argv, self.env_of(spec), spec.cwd, self.python)
        except ConfinementUnavailable as exc:
            raise StartError(f"unit {spec.id}: {exc}") from exc
        except (OSError, subprocess.SubprocessError) as exc:
            raise StartError(f"unit {spec.id}: cannot build its walls: {exc}") from exc

    def _findable(self, program: str, package: str | None) -> bool:
        """Whether `program` exists inside the instance's walls: a path in its
        package (or absolute), or a name on its PATH (the venv's bin, /usr)."""
        if "/" in program:
            p = program if os.path.isabs(program) else os.path.join(package or "/nonexistent", program)
            return os.path.isfile(p)
        return any(os.path.isfile(os.path.join(d, program)) and os.access(os.path.join(d, program), os.X_OK)
                   for d in inside_path(self.python))

    def log_path(self, spec: Spec) -> Path:
        rel = spec.log or (f"{spec.id}.log" if self.kind == "worker" else f"instances/{spec.id}.log")
        return self.log_dir / check_log_path(rel)

    # --- interface -----------------------------------------------------------------
    def start(self, spec: Spec) -> Handle:
        check_id(spec.id)
        with self._lock:
            if spec.id in self._handles:
                raise ValueError(f"unit {spec.id} is running already")
        cwd = spec.cwd or (str(ROOT) if self.kind == "worker" else None)
        if cwd is None or not os.path.isdir(cwd):
            raise StartError(f"unit {spec.id}: working directory {cwd!r} does not exist")
        argv = self.argv_of(spec)
        logp = self.log_path(spec)
        logp.parent.mkdir(parents=True, exist_ok=True)
        if self.jail is not None:
            self._rotate(logp)
        logf = open(logp, "ab")
        try:
            if self.jail is not None:
                run_argv, env = self.jailed(spec, argv)
                run_cwd = "/"
            else:
                run_argv, env, run_cwd = argv, self.env_of(spec), cwd
            p = subprocess.Popen(run_argv, cwd=run_cwd, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            logf.write(f"stratus: cannot start {spec.id}: {exc}\n".encode())
            raise StartError(f"unit {spec.id}: cannot run {spec.argv[0]!r}: {exc.strerror or exc}") from exc
        finally:
            logf.close()
        pstart = proc_start_time(p.pid)   # fixed at fork: exec does not change it
        h = Handle(id=spec.id, pid=p.pid, host=self.host, port=spec.port, ref=p, started=time.time(),
                   labels=self._labels(spec.labels, adopted=False), adopted=False, log=str(logp))
        with self._lock:
            self._exited.discard(spec.id)
            self._handles[spec.id] = h
            self._pstart[spec.id] = pstart
        self._write_pidfile(h, spec, pstart, argv, cwd)
        threading.Thread(target=self._reap, args=(h,), name=f"reap-{spec.id}", daemon=True).start()
        log.info("started %s %s (pid %d)", self.kind, spec.id, p.pid)
        return h

    def stop(self, unit_id: str, timeout: float = 10.0) -> None:
        h = self._handles.get(unit_id)
        if h is None or not self._alive(h):
            return
        self._signal(h, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._alive(h):
            time.sleep(0.05)
        if self._alive(h):
            log.warning("%s %s did not stop within %gs: killing it", self.kind, unit_id, timeout)
            self._signal(h, signal.SIGKILL)
            deadline = time.monotonic() + KILL_WAIT
            while time.monotonic() < deadline and self._alive(h):
                time.sleep(0.05)
        if self.kind == "instance" and h.ref is not None:
            _signal_group(h.pid, signal.SIGKILL)   # what the instance left behind in its group

    def kill(self, unit_id: str) -> None:
        h = self._handles.get(unit_id)
        if h is None:
            raise KeyError(unit_id)
        self._signal(h, signal.SIGKILL)

    def running(self) -> dict[str, Handle]:
        with self._lock:
            handles = list(self._handles.items())
        return {i: h for i, h in handles if self._alive(h)}

    def adopt(self) -> list[Handle]:
        adopted = []
        for f in sorted(self.run_dir.glob("*.json")):
            try:
                d = json.loads(f.read_text())
                uid, pid = check_id(str(d["id"])), int(d["pid"])
                pstart = d.get("pstart")
                pstart = None if pstart is None else int(pstart)
                port = d.get("port")
                port = None if port is None else int(port)
                labels = {str(k): str(v) for k, v in (d.get("labels") or {}).items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                log.warning("unreadable pid file %s: removing it", f.name)
                f.unlink(missing_ok=True)
                continue
            if f.stem != uid:
                f.unlink(missing_ok=True)
                continue
            with self._lock:
                if uid in self._handles:
                    continue
            if self.kind == "instance" and pstart is None:
                ok = False   # an instance's pid file always records the start time
            elif d.get("boot") and self.boot and d["boot"] != self.boot:
                ok = False   # written before a reboot
            else:
                ok = pid_alive(pid, uid if self.kind == "worker" else None, pstart=pstart)
            if not ok:
                log.info("pid file of %s: pid %d is gone or is another process; removing it", uid, pid)
                f.unlink(missing_ok=True)
                continue
            h = Handle(id=uid, pid=pid, host=str(d.get("host") or self.host), port=port, ref=None,
                       started=float(d.get("started", 0.0)), labels=self._labels(labels, adopted=True),
                       adopted=True, log=d.get("log"))
            with self._lock:
                self._exited.discard(uid)
                self._handles[uid] = h
                self._pstart[uid] = pstart
            adopted.append(h)
            log.info("adopted %s %s (pid %d)", self.kind, uid, pid)
        if adopted:
            self._ensure_poller()
        return adopted

    def on_exit(self, callback: ExitCallback) -> None:
        self._callbacks.append(callback)

    def close(self, remove: bool = True, *, remove_workers: bool | None = None) -> None:
        if remove_workers is not None:
            remove = remove_workers
        if not remove:
            self._detached = True
            self._closed.set()
            return
        handles = list(self.running().values())
        # Stop in parallel, kill after CLOSE_DRAIN seconds: whoever stops us
        # (a test harness, systemd, make down) rarely waits much longer.
        threads = [threading.Thread(target=self.stop, args=(h.id,), kwargs={"timeout": CLOSE_DRAIN},
                                    daemon=True) for h in handles]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        self._closed.set()
        for h in handles:
            self._pidfile(h.id).unlink(missing_ok=True)

    # --- internals -------------------------------------------------------------
    def _rotate(self, logp: Path) -> None:
        """An instance's log may not grow past its limit (RLIMIT_FSIZE): once
        it holds half of it, the next start keeps it as <log>.1 and begins anew."""
        try:
            if logp.stat().st_size >= self.jail.limits.log_mb * 1024 ** 2 // 2:
                os.replace(logp, logp.with_name(logp.name + ".1"))
        except FileNotFoundError:
            pass

    def exit_reason(self, unit_id: str) -> str | None:
        """Why an app instance that exited was ended by the platform's walls
        (its memory limit), or None; asked once, by the exit callback."""
        return self._reasons.pop(unit_id, None)

    def _why(self, h: Handle) -> None:
        """Before the exit is reported: did the kernel kill it for memory?"""
        if self.jail is not None and self.jail.oom_killed(h.id):
            why = f"out of memory (limit {self.jail.limits.memory_mb} MiB)"
            self._reasons[h.id] = why
            if h.log:
                try:
                    with open(h.log, "ab") as fh:
                        fh.write(f"stratus: {h.id} was killed: {why}\n".encode())
                except OSError:
                    pass

    def _release(self, h: Handle) -> None:
        """After an app instance is gone: kill what it left in its cgroup, and
        remove its cgroups and heartbeat directory."""
        if self.jail is None:
            return
        try:
            self.jail.release(h.id, h.labels.get("heartbeat") or None, tenant=h.labels.get("tenant") or "")
        except Exception:
            log.exception("cleaning up after %s", h.id)

    def _labels(self, labels, *, adopted: bool) -> dict:
        if self.kind == "worker":
            return {"adopted": adopted}   # as control.py and the tests have always seen them
        return dict(labels)

    def _pidfile(self, unit_id: str) -> Path:
        return self.run_dir / f"{unit_id}.json"

    def _write_pidfile(self, h: Handle, spec: Spec, pstart: int | None, argv: list[str], cwd: str) -> None:
        record = {"id": h.id, "kind": self.kind, "pid": h.pid, "pstart": pstart, "boot": self.boot,
                  "started": h.started, "host": h.host, "port": h.port, "argv": argv, "cwd": cwd,
                  "labels": dict(spec.labels), "log": h.log}
        tmp = self._pidfile(h.id).with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh)
        os.replace(tmp, self._pidfile(h.id))

    def _alive(self, h: Handle) -> bool:
        if h.id in self._exited:
            return False
        if h.ref is not None:
            return True  # our child: the reaper marks it exited
        return pid_alive(h.pid, h.id if self.kind == "worker" else None, pstart=self._pstart.get(h.id))

    def _signal(self, h: Handle, sig: int) -> None:
        if not self._alive(h):
            return
        _signal_group(h.pid, sig)

    def _reap(self, h: Handle) -> None:
        code = h.ref.wait()
        self._exited_now(h, code)

    def _exited_now(self, h: Handle, code: int | None) -> None:
        if self._detached:
            return   # this orchestrator let go of its units: the successor reports them
        with self._lock:
            if h.id in self._exited or self._handles.get(h.id) is not h:
                return
            self._exited.add(h.id)
            self._handles.pop(h.id, None)
            self._pstart.pop(h.id, None)
        self._pidfile(h.id).unlink(missing_ok=True)
        self._why(h)
        if self.jail is not None:
            threading.Thread(target=self._release, args=(h,), name=f"release-{h.id}", daemon=True).start()
        log.info("%s %s (pid %d) exited with %s", self.kind, h.id, h.pid, code)
        for cb in list(self._callbacks):
            try:
                cb(h.id, code)
            except Exception:
                log.exception("exit callback failed")

    def _ensure_poller(self) -> None:
        if self._poller is None or not self._poller.is_alive():
            self._poller = threading.Thread(target=self._poll_adopted, name=f"adopted-{self.kind}-poller",
                                            daemon=True)
            self._poller.start()

    def _poll_adopted(self) -> None:
        while not self._closed.wait(ADOPTED_POLL):
            with self._lock:
                adopted = [h for h in self._handles.values() if h.ref is None]
            for h in adopted:
                if not self._alive(h):
                    self._exited_now(h, None)
