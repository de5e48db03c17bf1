"""The health monitor (paas.md, Behaviour the platform keeps: Health).

Web instances: their `health` path is probed over HTTP, every
STRATUS_HEALTH_INTERVAL seconds (2) once they run, and every STARTING_EVERY
seconds while they start, so a new instance joins the gateway's pool as soon
as it answers. A probe passes on a 200 within the probe timeout (the
interval, at most PROBE_TIMEOUT seconds). Worker instances: the platform
gives each a heartbeat file (STRATUS_HEARTBEAT_FILE; bus.instance.heartbeat
touches it); once the file exists, a check fails when it is older than
three intervals. An instance that never beats is judged by its process alone.

Each outcome goes to AppController.mark: the first pass makes a starting
instance `running`; 3 failures in a row make a running one `unhealthy`
(it leaves the pool and is replaced). An instance still `starting` after
STRATUS_START_TIMEOUT seconds (60) is replaced too. Probes run on a small
thread pool, at most one in flight per instance."""
from __future__ import annotations

import http.client
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from bus.settings import env_float

log = logging.getLogger("stratus.orchestrator.health")

STARTING_EVERY = 0.1
PROBE_TIMEOUT = 1.0
FAILS = 3


def probe(host: str, port: int, path: str, timeout: float) -> tuple[bool, str]:
    """(passed, why) for one GET of the health path."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "stratus-health"})
        resp = conn.getresponse()
        resp.read(64 * 1024)
        return resp.status == 200, f"health answered {resp.status}"
    except (OSError, http.client.HTTPException) as exc:
        return False, f"health probe failed: {type(exc).__name__}"
    finally:
        conn.close()


class HealthMonitor:
    def __init__(self, controller):
        self.c = controller
        self.interval = max(0.2, controller.health_interval)
        self.start_timeout = env_float("STRATUS_START_TIMEOUT", 60.0)
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="probe")
        self._inflight: set[str] = set()
        self._due: dict[str, float] = {}
        self._lock = threading.Lock()
        self._woken = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="health-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._woken.set()
        if self._thread is not None:
            self._thread.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def wake(self) -> None:
        self._woken.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._woken.wait(STARTING_EVERY)
            self._woken.clear()
            if not self.c.active:
                continue
            now = time.time()
            with self.c.lock:
                insts = [i for i in self.c.insts.values() if not i.retiring and i.state in ("starting", "running")]
            live = {i.id for i in insts}
            with self._lock:
                for gone in set(self._due) - live:
                    del self._due[gone]
            for inst in insts:
                with self._lock:
                    if inst.id in self._inflight or now < self._due.get(inst.id, 0.0):
                        continue
                    starting = inst.state == "starting"
                    self._due[inst.id] = now + (STARTING_EVERY if starting else self.interval)
                    if inst.kind == "web" and inst.port:
                        self._inflight.add(inst.id)
                        self._pool.submit(self._probe, inst.id, inst.host, inst.port, inst.health, starting,
                                          inst.started)
                        continue
                if inst.heartbeat and not starting:
                    self._beat(inst.id, inst.heartbeat)

    def _probe(self, iid: str, host: str, port: int, path: str, starting: bool, started: float) -> None:
        try:
            ok, why = probe(host, port, path, min(PROBE_TIMEOUT, self.interval))
            if starting and not ok:
                if time.time() - started > self.start_timeout:
                    self.c.mark(iid, False, f"not healthy {self.start_timeout:g}s after its start", fatal=True)
                return   # a starting instance is not failing yet
            self.c.mark(iid, ok, why)
        except Exception:
            log.exception("probe of %s failed", iid)
        finally:
            with self._lock:
                self._inflight.discard(iid)

    def _beat(self, iid: str, path: str) -> None:
        try:
            age = time.time() - os.stat(path).st_mtime
        except FileNotFoundError:
            return          # it has not beaten yet: its process alone tells
        except OSError:
            return
        if age > FAILS * self.interval:
            self.c.mark(iid, False, f"no heartbeat for {age:.1f}s")
        else:
            self.c.mark(iid, True)
