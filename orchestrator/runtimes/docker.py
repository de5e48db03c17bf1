"""The Docker runtime: each worker is a container `python -m worker --id ID`
from STRATUS_WORKER_IMAGE, on the stack's network STRATUS_DOCKER_NETWORK,
with a fresh named volume for its database.

  container  stratus-<cluster>-<worker id>
             labels stratus.cluster=<cluster>, stratus.role=worker,
                    stratus.worker_id=<id>, stratus.volume=<volume>
  volume     stratus-<cluster>-<worker id>-data  on /var/lib/stratus
             (the same labels), removed with its container: a replacement
             worker has a new id, so it always starts from an empty store.

The worker's pid is the container's main pid (State.Pid from inspect, in the
host's pid namespace). Deaths come from the Docker events stream (`die`,
filtered by the cluster's labels), so a killed container is reported at once;
the dead container and its volume are then removed. adopt() takes over the
running containers an earlier orchestrator left with this cluster's labels and
removes the dead ones. close() stops and removes the containers (and volumes)
it started or adopted, and any dead ones of the cluster, so `docker-compose
down` leaves no worker behind; a standby orchestrator, which runs none, leaves
the leader's workers alone.

Environment read here (besides the Settings):
  STRATUS_WORKER_IMAGE    default $STRATUS_IMAGE_PREFIX/worker:latest (prefix: stratus)
  STRATUS_DOCKER_NETWORK  default stratus
  DOCKER_HOST etc.        as for the docker CLI (docker.from_env)"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

from bus.settings import Settings

from .base import ExitCallback, Runtime, WorkerHandle

log = logging.getLogger("stratus.orchestrator.runtime")

LABEL_CLUSTER = "stratus.cluster"
LABEL_ROLE = "stratus.role"
LABEL_WORKER = "stratus.worker_id"
LABEL_VOLUME = "stratus.volume"
ROLE = "worker"
DATA_DIR = "/var/lib/stratus"
_STARTED_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?")

# Settings a worker does not need (secrets, this runtime's own knobs, the
# state dir, which is the volume inside the container).
_NOT_PASSED = {
    "STRATUS_WORKER_IMAGE", "STRATUS_DOCKER_NETWORK", "STRATUS_DOCKER_GID", "STRATUS_WORKER_ID",
    "STRATUS_WORKER_DB", "STRATUS_STATE_DIR", "STRATUS_ADMIN_PASSWORD", "STRATUS_TOKEN_SECRET",
    "STRATUS_BIND_HOST", "STRATUS_ADVERTISE_HOST", "STRATUS_RUNTIME",
}


# --- pure helpers (unit-tested without Docker) ------------------------------------
def container_name(cluster: str, worker_id: str) -> str:
    return f"stratus-{cluster}-{worker_id}"


def volume_name(cluster: str, worker_id: str) -> str:
    return f"stratus-{cluster}-{worker_id}-data"


def worker_labels(cluster: str, worker_id: str) -> dict[str, str]:
    return {LABEL_CLUSTER: cluster, LABEL_ROLE: ROLE, LABEL_WORKER: worker_id,
            LABEL_VOLUME: volume_name(cluster, worker_id)}


def cluster_filters(cluster: str) -> dict[str, list[str]]:
    """The label filter that selects this cluster's worker containers (and volumes)."""
    return {"label": [f"{LABEL_CLUSTER}={cluster}", f"{LABEL_ROLE}={ROLE}"]}


def worker_env(environ: Mapping[str, str], settings: Settings, worker_id: str) -> dict[str, str]:
    """The worker container's environment: the orchestrator's STRATUS_* settings
    (minus secrets and runtime knobs), the connection settings as this
    orchestrator resolved them, and the worker's id and state dir."""
    env = {k: v for k, v in environ.items() if k.startswith("STRATUS_") and k not in _NOT_PASSED}
    env.update({
        "STRATUS_AMQP_URL": settings.amqp_url,
        "STRATUS_ZK_HOSTS": settings.zk_hosts,
        "STRATUS_CLUSTER": settings.cluster,
        "STRATUS_ZK_TIMEOUT": str(settings.zk_timeout),
        "STRATUS_LOG_LEVEL": settings.log_level,
        "STRATUS_STATE_DIR": DATA_DIR,
        "STRATUS_WORKER_ID": worker_id,
        "PYTHONUNBUFFERED": "1",
    })
    return env


def worker_image(environ: Mapping[str, str]) -> str:
    return environ.get("STRATUS_WORKER_IMAGE") or f"{environ.get('STRATUS_IMAGE_PREFIX') or 'stratus'}/worker:latest"


def parse_started(ts: str | None) -> float:
    """Docker's State.StartedAt (RFC 3339, UTC, nanoseconds) as a unix time; 0.0 when unknown."""
    m = _STARTED_RE.match(ts or "")
    if not m or m.group(1).startswith("0001-"):
        return 0.0
    dt = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    return dt.timestamp() + (float("0." + m.group(2)) if m.group(2) else 0.0)


def die_event(event: Mapping[str, Any], cluster: str) -> tuple[str, str, int | None] | None:
    """(container id, worker id, exit code) for a `die` event of one of this
    cluster's workers, else None."""
    if event.get("Type", "container") != "container":
        return None
    if (event.get("Action") or event.get("status")) != "die":
        return None
    actor = event.get("Actor") or {}
    attrs = actor.get("Attributes") or {}
    if attrs.get(LABEL_CLUSTER) != cluster or attrs.get(LABEL_ROLE) != ROLE:
        return None
    wid = attrs.get(LABEL_WORKER)
    if not wid:
        return None
    code: int | None
    try:
        code = int(attrs["exitCode"])
    except (KeyError, TypeError, ValueError):
        code = None
    return actor.get("ID") or event.get("id") or "", wid, code


# --- the runtime ------------------------------------------------------------------
class DockerRuntime(Runtime):
    name = "docker"

    def __init__(self, settings: Settings, *, client_factory: Callable[[], Any] | None = None,
                 environ: Mapping[str, str] | None = None):
        self.settings = settings
        self.cluster = settings.cluster
        self.environ = dict(os.environ if environ is None else environ)
        self.image = worker_image(self.environ)
        self.network = self.environ.get("STRATUS_DOCKER_NETWORK") or "stratus"
        if client_factory is None:
            import docker

            def client_factory():
                return docker.from_env(timeout=60)
        self._client_factory = client_factory
        self.client = client_factory()
        self._handles: dict[str, WorkerHandle] = {}
        self._exited: set[str] = set()
        self._callbacks: list[ExitCallback] = []
        self._lock = threading.RLock()
        self._closed = threading.Event()
        self._events_thread: threading.Thread | None = None
        self._stream = None
        self._subscribed = threading.Event()

    # --- interface -----------------------------------------------------------------
    def start_worker(self, worker_id: str) -> WorkerHandle:
        self._ensure_events()
        labels = worker_labels(self.cluster, worker_id)
        vol = volume_name(self.cluster, worker_id)
        self.client.volumes.create(name=vol, labels=labels)
        kwargs = dict(
            command=["python", "-m", "worker", "--id", worker_id],
            name=container_name(self.cluster, worker_id),
            hostname=worker_id,
            labels=labels,
            environment=worker_env(self.environ, self.settings, worker_id),
            network=self.network,
            volumes={vol: {"bind": DATA_DIR, "mode": "rw"}},
            log_config={"type": "json-file", "config": {"max-size": "10m", "max-file": "3"}},
        )
        container = None
        try:
            # create + start, not run(): a missing image is an error here, never a pull.
            container = self.client.containers.create(self.image, **kwargs)
            container.start()
        except Exception:
            if container is not None:
                self._remove(container.id, None)
            self._remove_volume(vol)
            raise
        container.reload()
        state = container.attrs.get("State") or {}
        h = WorkerHandle(id=worker_id, pid=int(state.get("Pid") or 0), ref=container.id,
                         started=time.time(), labels={"adopted": False, "container": container.name})
        with self._lock:
            self._exited.discard(worker_id)
            self._handles[worker_id] = h
        if not state.get("Running", True):
            # It died before we looked: the die event may have come before the handle existed.
            self._reap(container.id, worker_id, state.get("ExitCode"))
        log.info("started worker %s (container %s, pid %d, image %s)", worker_id, container.name, h.pid,
                 self.image)
        return h

    def stop_worker(self, worker_id: str, *, timeout: float = 10.0) -> None:
        h = self._handles.get(worker_id)
        if h is None:
            return
        try:
            c = self.client.containers.get(h.ref)
            c.stop(timeout=max(1, int(round(timeout))))  # SIGTERM, SIGKILL after timeout
        except Exception as exc:
            if not _not_found(exc):
                raise
        # The die event reaps it; make sure even when the events stream lags.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and worker_id in self.workers():
            time.sleep(0.05)
        if worker_id in self.workers():
            self._reap(h.ref, worker_id, None)

    def kill_worker(self, worker_id: str) -> None:
        h = self._handles.get(worker_id)
        if h is None:
            raise KeyError(worker_id)
        try:
            self.client.containers.get(h.ref).kill(signal="SIGKILL")
        except Exception as exc:
            if not _not_found(exc) and "is not running" not in str(exc):
                raise

    def workers(self) -> dict[str, WorkerHandle]:
        with self._lock:
            return {i: h for i, h in self._handles.items() if i not in self._exited}

    def adopt(self) -> list[WorkerHandle]:
        self._ensure_events()
        adopted = []
        for c in self.client.containers.list(all=True, filters=cluster_filters(self.cluster)):
            labels = c.labels or {}
            wid = labels.get(LABEL_WORKER)
            if not wid:
                continue
            with self._lock:
                if wid in self._handles:
                    continue
            state = c.attrs.get("State") or {}
            if state.get("Status") != "running" or not state.get("Pid"):
                log.info("worker container %s is %s: removing it", c.name, state.get("Status"))
                self._remove(c.id, labels.get(LABEL_VOLUME))
                continue
            h = WorkerHandle(id=wid, pid=int(state["Pid"]), ref=c.id, started=parse_started(state.get("StartedAt")),
                             labels={"adopted": True, "container": c.name})
            with self._lock:
                self._handles[wid] = h
            adopted.append(h)
            log.info("adopted worker %s (container %s, pid %d)", wid, c.name, h.pid)
        # Volumes whose container is gone (an orchestrator killed between the two removals).
        self._remove_orphan_volumes()
        return adopted

    def on_exit(self, callback: ExitCallback) -> None:
        self._callbacks.append(callback)

    def close(self, *, remove_workers: bool = True) -> None:
        self._closed.set()
        stream = self._stream
        if stream is not None:
            try:
                stream.close()
            except Exception:
                pass
        if self._events_thread is not None:
            self._events_thread.join(5)
        if not remove_workers:
            return
        with self._lock:
            mine = set(self._handles)
        try:
            # The workers this runtime started or adopted, and dead leftovers; a
            # running worker it never adopted belongs to another (leading) orchestrator.
            containers = [c for c in self.client.containers.list(all=True, filters=cluster_filters(self.cluster))
                          if (c.labels or {}).get(LABEL_WORKER) in mine
                          or (c.attrs.get("State") or {}).get("Status") != "running"]
        except Exception:
            log.exception("cannot list the worker containers to remove them")
            return
        threads = [threading.Thread(target=self._stop_and_remove, args=(c,), daemon=True) for c in containers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self._remove_orphan_volumes()
        with self._lock:
            self._handles.clear()
        log.info("removed %d worker containers", len(containers))

    # --- internals -----------------------------------------------------------------
    def pid_of(self, worker_id: str) -> int | None:
        h = self._handles.get(worker_id)
        return h.pid if h else None

    def _stop_and_remove(self, c) -> None:
        try:
            if (c.attrs.get("State") or {}).get("Status") == "running":
                c.stop(timeout=10)
        except Exception as exc:
            if not _not_found(exc):
                log.warning("stopping %s: %s", c.name, exc)
        self._remove(c.id, (c.labels or {}).get(LABEL_VOLUME))

    def _remove(self, container_id: str, volume: str | None) -> None:
        try:
            self.client.containers.get(container_id).remove(force=True)
        except Exception as exc:
            if not _not_found(exc) and "already in progress" not in str(exc):
                log.warning("removing container %s: %s", container_id[:12], exc)
        if volume:
            self._remove_volume(volume)

    def _remove_volume(self, name: str) -> None:
        for _ in range(20):
            try:
                self.client.volumes.get(name).remove(force=True)
                return
            except Exception as exc:
                if _not_found(exc):
                    return
                if "in use" not in str(exc):
                    log.warning("removing volume %s: %s", name, exc)
                    return
            time.sleep(0.25)  # the container is still being removed

    def _remove_orphan_volumes(self) -> None:
        try:
            vols = self.client.volumes.list(filters=cluster_filters(self.cluster))
            live = {(c.labels or {}).get(LABEL_VOLUME)
                    for c in self.client.containers.list(all=True, filters=cluster_filters(self.cluster))}
        except Exception as exc:
            log.warning("listing worker volumes: %s", exc)
            return
        for v in vols:
            if v.name not in live:
                self._remove_volume(v.name)

    def _reap(self, container_id: str, worker_id: str, code) -> None:
        with self._lock:
            h = self._handles.get(worker_id)
            if h is None or (container_id and h.ref and container_id != h.ref) or worker_id in self._exited:
                return
            self._exited.add(worker_id)
            self._handles.pop(worker_id, None)
        log.info("worker %s (container %s, pid %d) exited with %s", worker_id, str(h.ref)[:12], h.pid, code)
        for cb in list(self._callbacks):
            try:
                cb(worker_id, code)
            except Exception:
                log.exception("exit callback failed")
        # A dead worker's container and its store are not reused: remove them.
        threading.Thread(target=self._remove, args=(h.ref, volume_name(self.cluster, worker_id)),
                         name=f"remove-{worker_id}", daemon=True).start()

    def _ensure_events(self) -> None:
        if self._closed.is_set():
            return
        if self._events_thread is None or not self._events_thread.is_alive():
            self._subscribed.clear()
            self._events_thread = threading.Thread(target=self._watch_events, name="docker-events", daemon=True)
            self._events_thread.start()
            # Subscribe before acting, so no death is missed (bounded wait).
            self._subscribed.wait(5)

    def _watch_events(self) -> None:
        client = self._client_factory()
        filters = {"type": "container", "event": "die", **cluster_filters(self.cluster)}
        while not self._closed.is_set():
            try:
                self._stream = client.events(decode=True, filters=filters)
                self._subscribed.set()
                self._check_handles()
                for event in self._stream:
                    if self._closed.is_set():
                        break
                    hit = die_event(event, self.cluster)
                    if hit:
                        self._reap(*hit)
            except Exception as exc:
                if not self._closed.is_set():
                    log.warning("docker events stream broke (%r); reconnecting", exc)
            self._closed.wait(1.0)
        try:
            client.close()
        except Exception:
            pass

    def _check_handles(self) -> None:
        """After (re)subscribing: any worker that died while we were not listening."""
        for wid, h in list(self.workers().items()):
            try:
                state = self.client.containers.get(h.ref).attrs.get("State") or {}
                if state.get("Status") != "running":
                    self._reap(h.ref, wid, state.get("ExitCode"))
            except Exception as exc:
                if _not_found(exc):
                    self._reap(h.ref, wid, None)


def _not_found(exc: Exception) -> bool:
    try:
        from docker.errors import NotFound
        if isinstance(exc, NotFound):
            return True
    except ImportError:
        pass
    return getattr(exc, "status_code", None) == 404 or "No such" in str(exc)
