"""The process runtime: each worker is a local subprocess
`python -m worker --id ID`, in its own session so it outlives the
orchestrator (a successor adopts it by pid).

  $STRATUS_STATE_DIR/clusters/<cluster>/runtime/<id>.json   {id, pid, started}
  $STRATUS_STATE_DIR/clusters/<cluster>/logs/<id>.log       the worker's output

Deaths are reported to the exit callbacks at once: a reaper thread waits on
each child; adopted workers (not our children) are watched by a poller that
checks their pids a few times a second."""
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

from .base import ExitCallback, Runtime, WorkerHandle

log = logging.getLogger("stratus.orchestrator.runtime")

ROOT = Path(__file__).resolve().parent.parent.parent
ADOPTED_POLL = 0.2
CLOSE_DRAIN = 5.0


def pid_alive(pid: int, worker_id: str | None = None) -> bool:
    """True when `pid` runs (not a zombie) and, if given, is worker `worker_id`."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
        if worker_id is not None:
            raw = b""
            for _ in range(5):   # empty while the process is in the middle of exec()
                raw = Path(f"/proc/{pid}/cmdline").read_bytes()
                if raw:
                    break
                time.sleep(0.02)
            argv = raw.split(b"\0")
            if worker_id.encode() not in argv or b"worker" not in argv:
                return False
    except (OSError, IndexError):
        return False if worker_id is not None else True
    return True


class ProcessRuntime(Runtime):
    name = "process"

    def __init__(self, settings: Settings, *, python: str | None = None):
        self.settings = settings
        self.python = python or sys.executable
        base = settings.cluster_state_path()
        self.run_dir = base / "runtime"
        self.log_dir = base / "logs"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._handles: dict[str, WorkerHandle] = {}
        self._exited: set[str] = set()
        self._callbacks: list[ExitCallback] = []
        self._lock = threading.RLock()
        self._closed = threading.Event()
        self._poller: threading.Thread | None = None

    # --- interface -----------------------------------------------------------
    def start_worker(self, worker_id: str) -> WorkerHandle:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("STRATUS_WORKER_ID", None)
        env.pop("STRATUS_WORKER_DB", None)
        logf = open(self.log_dir / f"{worker_id}.log", "ab")
        try:
            p = subprocess.Popen([self.python, "-m", "worker", "--id", worker_id], cwd=ROOT, env=env,
                                 stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        finally:
            logf.close()
        h = WorkerHandle(id=worker_id, pid=p.pid, ref=p, started=time.time(), labels={"adopted": False})
        with self._lock:
            self._handles[worker_id] = h
        self._write_pidfile(h)
        threading.Thread(target=self._reap, args=(h,), name=f"reap-{worker_id}", daemon=True).start()
        log.info("started worker %s (pid %d)", worker_id, p.pid)
        return h

    def stop_worker(self, worker_id: str, *, timeout: float = 10.0) -> None:
        h = self._handles.get(worker_id)
        if h is None or not self._alive(h):
            return
        self._signal(h, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._alive(h):
            time.sleep(0.05)
        if self._alive(h):
            log.warning("worker %s did not drain within %gs: killing it", worker_id, timeout)
            self._signal(h, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and self._alive(h):
                time.sleep(0.05)

    def kill_worker(self, worker_id: str) -> None:
        h = self._handles.get(worker_id)
        if h is None:
            raise KeyError(worker_id)
        self._signal(h, signal.SIGKILL)

    def workers(self) -> dict[str, WorkerHandle]:
        with self._lock:
            return {i: h for i, h in self._handles.items() if self._alive(h)}

    def adopt(self) -> list[WorkerHandle]:
        adopted = []
        for f in sorted(self.run_dir.glob("*.json")):
            try:
                d = json.loads(f.read_text())
                wid, pid = str(d["id"]), int(d["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                f.unlink(missing_ok=True)
                continue
            with self._lock:
                if wid in self._handles:
                    continue
            if not pid_alive(pid, wid):
                log.info("pid file of %s: pid %d is gone; removing it", wid, pid)
                f.unlink(missing_ok=True)
                continue
            h = WorkerHandle(id=wid, pid=pid, ref=None, started=float(d.get("started", 0.0)),
                             labels={"adopted": True})
            with self._lock:
                self._handles[wid] = h
            adopted.append(h)
            log.info("adopted worker %s (pid %d)", wid, pid)
        if adopted:
            self._ensure_poller()
        return adopted

    def on_exit(self, callback: ExitCallback) -> None:
        self._callbacks.append(callback)

    def close(self, *, remove_workers: bool = True) -> None:
        self._closed.set()
        if not remove_workers:
            return
        handles = list(self.workers().values())
        # Drain in parallel, kill after CLOSE_DRAIN seconds: whoever stops us
        # (a test harness, systemd, make down) rarely waits much longer.
        threads = [threading.Thread(target=self.stop_worker, args=(h.id,), kwargs={"timeout": CLOSE_DRAIN},
                                    daemon=True) for h in handles]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        for h in handles:
            self._pidfile(h.id).unlink(missing_ok=True)

    # --- internals -------------------------------------------------------------
    def pid_of(self, worker_id: str) -> int | None:
        h = self._handles.get(worker_id)
        return h.pid if h else None

    def _pidfile(self, worker_id: str) -> Path:
        return self.run_dir / f"{worker_id}.json"

    def _write_pidfile(self, h: WorkerHandle) -> None:
        tmp = self._pidfile(h.id).with_suffix(".tmp")
        tmp.write_text(json.dumps({"id": h.id, "pid": h.pid, "started": h.started}))
        os.replace(tmp, self._pidfile(h.id))

    def _alive(self, h: WorkerHandle) -> bool:
        if h.id in self._exited:
            return False
        if h.ref is not None:
            return True  # our child: the reaper marks it exited
        return pid_alive(h.pid, h.id)

    def _signal(self, h: WorkerHandle, sig: int) -> None:
        if not self._alive(h):
            return
        try:
            os.kill(h.pid, sig)
        except ProcessLookupError:
            pass

    def _reap(self, h: WorkerHandle) -> None:
        code = h.ref.wait()
        self._exited_now(h, code)

    def _exited_now(self, h: WorkerHandle, code: int | None) -> None:
        with self._lock:
            if h.id in self._exited:
                return
            self._exited.add(h.id)
            self._handles.pop(h.id, None)
        self._pidfile(h.id).unlink(missing_ok=True)
        log.info("worker %s (pid %d) exited with %s", h.id, h.pid, code)
        for cb in list(self._callbacks):
            try:
                cb(h.id, code)
            except Exception:
                log.exception("exit callback failed")

    def _ensure_poller(self) -> None:
        if self._poller is None or not self._poller.is_alive():
            self._poller = threading.Thread(target=self._poll_adopted, name="adopted-poller", daemon=True)
            self._poller.start()

    def _poll_adopted(self) -> None:
        while not self._closed.wait(ADOPTED_POLL):
            with self._lock:
                adopted = [h for h in self._handles.values() if h.ref is None]
            for h in adopted:
                if not pid_alive(h.pid, h.id):
                    self._exited_now(h, None)
