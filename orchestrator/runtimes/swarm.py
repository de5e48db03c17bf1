"""The Swarm runtime (STRATUS_RUNTIME=swarm): DB workers and app roles as
Docker Swarm services, so that they spread over every node of a swarm. The
orchestrator runs on a manager node (it talks to the engine's socket there).

DB workers (kind "worker", `SwarmRuntime`): each worker is a service of ONE
replica, so it keeps its id and its own volume. Swarm never restarts it
(restart condition none): a dead worker is replaced by the DB controller
with a NEW worker (a new id, an empty store), as with the other runtimes.

  service    stratus-<cluster>-<worker id>   (docker.container_name), 1 replica,
             on STRATUS_DOCKER_NETWORK (an attachable overlay network);
             the service's name is the worker's address on that network,
             announced as STRATUS_ADVERTISE_HOST: DNS round robin (one task,
             so its own address), not a virtual IP, which forwards no port
             the service does not publish (its metrics port is its own pick)
             labels     the service and its container: docker.worker_labels
                        (stratus.cluster, stratus.role=worker, stratus.worker_id,
                        stratus.volume)
  volume     stratus-<cluster>-<worker id>-data on /var/lib/stratus, made by
             the engine of the node the task runs on (labelled as above)
  env        docker.worker_env (the orchestrator's STRATUS_* settings minus
             secrets and runtime knobs, the id, the state dir)
  life       start() returns once the task runs (bounded: START_TIMEOUT);
             a task that cannot run (no image on its node, no network) is a
             StartError with the engine's reason, and the service is removed.
             Deaths are seen by polling the tasks (POLL seconds, every node's),
             and reported with the container's exit code. The dead worker's
             service and (on this node) its volume are then removed.
  kill(id)   SIGKILL of the task's container when it runs on this node (a crash,
             as `docker kill`); on another node the engine cannot signal it from
             here, so the service is removed (SIGTERM, SIGKILL after 1 s).
  stop(id)   scale to 0 (SIGTERM, SIGKILL after `timeout`), then remove.
  adopt()    the services of this cluster's workers whose task runs; the rest
             (dead tasks, a removal interrupted) are removed.

App roles (kind "instance", `SwarmRoles`): an app role is ONE replicated
service, `replicas` = the role's instance count. Swarm owns the role's
tasks: it places them, restarts a task that exits (restart condition any,
1 s delay, no backoff growth: Swarm's own policy), rolls a new config out
one task at a time, the new task first (update order start-first), and
removes tasks when scaled down. The app controller declares each role
(apply_role) and observes its tasks (tasks): one task is one instance.

  service    stratus-<cluster>-<tenant>-<app>-<role> (a hash stands in for the
             tail when that is over 63 characters), on STRATUS_DOCKER_NETWORK
             labels     stratus.cluster, stratus.kind=role, stratus.role_id=<unit id>,
                        stratus.config=<the role's config hash>, stratus.port,
                        stratus.label.<k>=<v> for each spec label (tenant, app, role...)
             image      the role's own, or built from the package on
                        <prefix>/app:latest as the Docker runtime builds it
                        (docker.build_app_image; on one node: with several
                        nodes the image must be pushed to a registry they reach)
             env        base.instance_env, with STRATUS_INSTANCE={{.Task.ID}} (Swarm's
                        template: each task knows its own id)
             walls      service_confinement: what a service can have of the
                        Docker runtime's (no no-new-privileges, no swap limit on
                        API 1.41; still the stack's network: docs/operations.md)
  a task     id = the task's id (the instance id the API shows), slot = Swarm's
             slot - 1, host = its address on the network, port = the role's
             (every task of a role listens on the same port: each has its own
             address). Its output is followed into
             logs/instances/<tenant>/<app>/<task id>.log while it runs on this node.
  kill_task  SIGKILL of a task's container on this node (an unhealthy instance:
             Swarm starts another in its slot).

Environment read here (besides the Settings): as the Docker runtime
(STRATUS_WORKER_IMAGE, STRATUS_IMAGE_PREFIX, STRATUS_DOCKER_NETWORK, DOCKER_HOST)."""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from bus.settings import Settings

from . import docker as d
from .base import ExitCallback, Handle, Runtime, Spec, StartError, check_id, check_log_path, instance_env
from .limits import Limits

log = logging.getLogger("stratus.orchestrator.runtime")

POLL = 0.5              # seconds between looks at the tasks
START_TIMEOUT = 90.0    # a worker's task must run within this
LABEL_KIND_ROLE = "role"
LABEL_ROLE_ID = "stratus.role_id"
LABEL_CONFIG = "stratus.config"
LIVE_STATES = ("new", "allocated", "pending", "assigned", "accepted", "preparing", "ready", "starting", "running")
DEAD_STATES = ("complete", "failed", "shutdown", "rejected", "orphaned", "remove")
INSTANCE_TEMPLATE = "{{.Task.ID}}"


# --- pure helpers (unit-tested without Docker) ------------------------------------
def role_service_name(cluster: str, tenant: str, app: str, role: str) -> str:
    """stratus-<cluster>-<tenant>-<app>-<role>, or its first 54 characters and
    a hash of the whole when that is over 63 (Swarm's limit)."""
    name = f"stratus-{cluster}-{tenant}-{app}-{role}".lower().replace("_", "-").replace(".", "-")
    if len(name) <= 63:
        return name
    return f"{name[:54].rstrip('-')}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def role_labels(cluster: str, spec: Spec, config: str) -> dict[str, str]:
    labels = {d.LABEL_CLUSTER: cluster, d.LABEL_KIND: LABEL_KIND_ROLE, LABEL_ROLE_ID: spec.id,
              LABEL_CONFIG: config}
    if spec.port is not None:
        labels[d.LABEL_PORT] = str(spec.port)
    for k, v in spec.labels.items():
        labels[d.LABEL_PREFIX + k] = v
    return labels


def task_state(task: Mapping[str, Any]) -> str:
    return ((task.get("Status") or {}).get("State") or "").lower()


def task_exit_code(task: Mapping[str, Any]) -> int | None:
    cs = (task.get("Status") or {}).get("ContainerStatus") or {}
    code = cs.get("ExitCode")
    return int(code) if isinstance(code, int) else None


def task_container(task: Mapping[str, Any]) -> str | None:
    return ((task.get("Status") or {}).get("ContainerStatus") or {}).get("ContainerID") or None


def task_address(task: Mapping[str, Any], network: str) -> str | None:
    """The task's address on the network named `network` (its first, without the prefix length)."""
    for att in task.get("NetworksAttachments") or ():
        net = att.get("Network") or {}
        if (net.get("Spec") or {}).get("Name") == network:
            for addr in att.get("Addresses") or ():
                return addr.split("/", 1)[0]
    return None


def task_error(task: Mapping[str, Any]) -> str:
    st = task.get("Status") or {}
    return st.get("Err") or st.get("Message") or task_state(task)


def current_task(tasks: list[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """A one-replica service's task: the live one, else the newest."""
    if not tasks:
        return None
    live = [t for t in tasks if task_state(t) in LIVE_STATES and (t.get("DesiredState") or "running") == "running"]
    pool = live or list(tasks)
    return max(pool, key=lambda t: t.get("CreatedAt") or "")


def service_confinement(limits: Limits, uid: int) -> dict[str, Any]:
    """services.create()'s arguments that wall a role's tasks in, as far as a
    Swarm service can on API 1.41 (Docker 20.10; docs/operations.md "Docker
    walls"): the tenant's unprivileged uid:gid, every capability dropped
    (cap_drop, API 1.41), a read-only root with a tmpfs /tmp of disk_mb, memory
    and CPU limits, the number of processes (Resources.Limits.Pids, API 1.41:
    the SDK has no argument for it, so it is set in the dict), and the log
    volume. A service cannot set no-new-privileges (no such field before API
    1.44) nor a swap limit: the base image holds no setuid program instead
    (docker/Dockerfile.base), and swap is the host's to disable."""
    from docker.types import Mount, Resources
    res = Resources(cpu_limit=int(round(limits.cpus * 1e9)), mem_limit=limits.memory_mb * d.MIB)
    res.setdefault("Limits", {})["Pids"] = limits.pids
    return dict(
        user=f"{uid}:{uid}", cap_drop=["ALL"], read_only=True, resources=res,
        mounts=[Mount(target=d.SCRATCH, source="", type="tmpfs", tmpfs_size=limits.disk_mb * d.MIB,
                      tmpfs_mode=0o1777)],
        log_driver="json-file", log_driver_options=d.log_options(limits))


def _env_list(env: Mapping[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in env.items()]


class _Engine:
    """The engine connection and what the two kinds share: the tasks of
    this cluster's services, read once per look."""

    def __init__(self, settings: Settings, client_factory: Callable[[], Any] | None, environ: Mapping[str, str] | None):
        self.settings = settings
        self.cluster = settings.cluster
        self.environ = dict(os.environ if environ is None else environ)
        self.network = self.environ.get("STRATUS_DOCKER_NETWORK") or "stratus"
        self.log_dir = settings.cluster_state_path() / "logs"
        if client_factory is None:
            import docker

            def client_factory():
                return docker.from_env(timeout=60)
        self._client_factory = client_factory
        self.client = client_factory()
        self._pids: dict[str, int] = {}

    def services(self, kind_labels: list[str]) -> list[Any]:
        return self.client.services.list(filters={"label": [f"{d.LABEL_CLUSTER}={self.cluster}", *kind_labels]})

    def tasks_of(self, service_ids: list[str]) -> dict[str, list[dict]]:
        """Every task of these services, by service id (one call)."""
        out: dict[str, list[dict]] = {sid: [] for sid in service_ids}
        if not service_ids:
            return out
        for t in self.client.api.tasks(filters={"service": list(service_ids)}):
            if t.get("ServiceID") in out:
                out[t["ServiceID"]].append(t)
        return out

    def kill_container(self, container_id: str | None) -> bool:
        """SIGKILL a task's container if it is on this node; False when it is not here."""
        if not container_id:
            return False
        try:
            self.client.containers.get(container_id).kill(signal="SIGKILL")
            return True
        except Exception as exc:
            if "is not running" in str(exc):
                return True
            if d._not_found(exc):
                return False
            raise

    def container_pid(self, container_id: str | None) -> int:
        """The host pid of a task's container on this node (0 elsewhere), asked once per container."""
        if not container_id:
            return 0
        if container_id in self._pids:
            return self._pids[container_id]
        try:
            pid = int((self.client.containers.get(container_id).attrs.get("State") or {}).get("Pid") or 0)
        except Exception:
            pid = 0
        if len(self._pids) > 4096:
            self._pids.clear()
        self._pids[container_id] = pid
        return pid

    def scale(self, service_id: str, replicas: int) -> None:
        """Set a service's replicas and nothing else: its own spec sent back
        with Mode changed. (The SDK's Service.scale re-sends a spec of its own
        making, whose networks differ from the engine's: Swarm then sees a new
        task template and replaces every task.)"""
        api = self.client.api
        current = api.inspect_service(service_id)
        spec = current["Spec"]
        spec["Mode"] = {"Replicated": {"Replicas": int(replicas)}}
        url = api._url("/services/{0}/update", service_id)
        api._raise_for_status(api._post_json(url, data=spec, params={"version": current["Version"]["Index"]}))

    def remove_service(self, service) -> None:
        try:
            service.remove()
        except Exception as exc:
            if not d._not_found(exc):
                log.warning("removing service %s: %s", getattr(service, "name", service), exc)

    def remove_volume(self, name: str) -> None:
        for _ in range(40):
            try:
                self.client.volumes.get(name).remove(force=True)
                return
            except Exception as exc:
                if d._not_found(exc):
                    return
                if "in use" not in str(exc):
                    log.warning("removing volume %s: %s", name, exc)
                    return
            time.sleep(0.25)   # the task's container is still being removed


# --- DB workers --------------------------------------------------------------------
class SwarmRuntime(Runtime):
    """DB workers as one-replica services (see the module docstring)."""
    name = "swarm"

    def __init__(self, settings: Settings, *, client_factory: Callable[[], Any] | None = None,
                 environ: Mapping[str, str] | None = None, kind: str = "worker"):
        if kind != "worker":
            raise ValueError("SwarmRuntime runs DB workers; app roles are SwarmRoles")
        self.kind = kind
        self.settings = settings
        self.engine = _Engine(settings, client_factory, environ)
        self.cluster = settings.cluster
        self.image = d.worker_image(self.engine.environ)
        self._handles: dict[str, Handle] = {}
        self._services: dict[str, Any] = {}      # worker id -> service
        self._callbacks: list[ExitCallback] = []
        self._lock = threading.RLock()
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None

    # --- interface -----------------------------------------------------------------
    def start(self, spec: Spec) -> Handle:
        check_id(spec.id)
        with self._lock:
            if spec.id in self._handles:
                raise ValueError(f"unit {spec.id} is running already")
        wid = spec.id
        labels = d.worker_labels(self.cluster, wid)
        vol = d.volume_name(self.cluster, wid)
        from docker.types import EndpointSpec, Mount, RestartPolicy, ServiceMode
        env = {**d.worker_env(self.engine.environ, self.settings, wid),
               **d.worker_secrets_env(self.engine.environ, self.settings), **spec.env,
               "STRATUS_ADVERTISE_HOST": d.container_name(self.cluster, wid)}
        image = spec.image or self.image
        try:
            service = self.engine.client.services.create(
                image, args=list(spec.argv), name=d.container_name(self.cluster, wid), hostname=wid,
                labels=labels, container_labels=labels, env=_env_list(env), networks=[self.engine.network],
                mounts=[Mount(target=d.DATA_DIR, source=vol, type="volume", labels=labels)],
                restart_policy=RestartPolicy(condition="none"), mode=ServiceMode("replicated", replicas=1),
                endpoint_spec=EndpointSpec(mode="dnsrr"), stop_grace_period=10 * 10**9, log_driver="json-file",
                log_driver_options={"max-size": "10m", "max-file": "3"})
        except Exception as exc:
            raise StartError(f"worker {wid}: cannot create its service: {exc}") from exc
        task = self._wait_running(service)
        if task is None or task_state(task) != "running":
            why = task_error(task) if task else "no task within the time allowed"
            self.engine.remove_service(service)
            self.engine.remove_volume(vol)
            raise StartError(f"worker {wid}: its task did not run on image {image}: {why}")
        h = Handle(id=wid, pid=self.engine.container_pid(task_container(task)), host=service.name, ref=service.id,
                   started=time.time(), labels={"adopted": False, "service": service.name}, adopted=False)
        with self._lock:
            self._handles[wid] = h
            self._services[wid] = service
        self._ensure_watcher()
        log.info("started worker %s (service %s, task %s, pid %d)", wid, service.name, task["ID"][:12], h.pid)
        return h

    def _wait_running(self, service) -> dict | None:
        deadline = time.monotonic() + START_TIMEOUT
        task = None
        while time.monotonic() < deadline:
            task = current_task(self.engine.tasks_of([service.id]).get(service.id, []))
            if task is not None and task_state(task) in ("running", *DEAD_STATES):
                return task
            time.sleep(0.2)
        return task

    def stop(self, unit_id: str, timeout: float = 10.0) -> None:
        service = self._services.get(unit_id)
        if service is None:
            return
        try:
            self.engine.scale(service.id, 0)   # SIGTERM, SIGKILL after the service's grace period (10 s)
        except Exception as exc:
            if not d._not_found(exc):
                log.warning("scaling %s to 0: %s", unit_id, exc)
        deadline = time.monotonic() + timeout + 10
        while time.monotonic() < deadline and unit_id in self.running():
            self._look()
            if unit_id in self.running():
                time.sleep(0.2)
        if unit_id in self.running():
            self._reap(unit_id, None)

    def kill(self, unit_id: str) -> None:
        service = self._services.get(unit_id)
        if service is None:
            raise KeyError(unit_id)
        task = current_task(self.engine.tasks_of([service.id]).get(service.id, []))
        if task is not None and self.engine.kill_container(task_container(task)):
            return
        # Not on this node: the engine cannot signal it from here.
        self.engine.remove_service(service)

    def running(self) -> dict[str, Handle]:
        with self._lock:
            return dict(self._handles)

    def adopt(self) -> list[Handle]:
        adopted = []
        services = self.engine.services([f"{d.LABEL_ROLE}={d.ROLE}"])
        tasks = self.engine.tasks_of([s.id for s in services])
        for s in services:
            labels = (s.attrs.get("Spec") or {}).get("Labels") or {}
            wid = labels.get(d.LABEL_WORKER)
            if not wid:
                continue
            with self._lock:
                if wid in self._handles:
                    continue
            task = current_task(tasks.get(s.id, []))
            if task is None or task_state(task) != "running":
                log.info("worker service %s has no running task: removing it", s.name)
                self.engine.remove_service(s)
                self.engine.remove_volume(labels.get(d.LABEL_VOLUME) or d.volume_name(self.cluster, wid))
                continue
            h = Handle(id=wid, pid=self.engine.container_pid(task_container(task)), host=s.name, ref=s.id,
                       started=time.time(), labels={"adopted": True, "service": s.name}, adopted=True)
            with self._lock:
                self._handles[wid] = h
                self._services[wid] = s
            adopted.append(h)
            log.info("adopted worker %s (service %s)", wid, s.name)
        self._ensure_watcher()
        return adopted

    def on_exit(self, callback: ExitCallback) -> None:
        self._callbacks.append(callback)

    def close(self, remove: bool = True, *, remove_workers: bool | None = None) -> None:
        if remove_workers is not None:
            remove = remove_workers
        self._closed.set()
        if self._watcher is not None:
            self._watcher.join(5)
        if not remove:
            return
        with self._lock:
            mine = dict(self._services)
            self._handles.clear()
            self._services.clear()
        for wid, s in mine.items():
            self.engine.remove_service(s)
        for wid in mine:
            self.engine.remove_volume(d.volume_name(self.cluster, wid))
        log.info("removed %d worker services", len(mine))

    # --- watching ----------------------------------------------------------------------
    def _ensure_watcher(self) -> None:
        if self._closed.is_set():
            return
        if self._watcher is None or not self._watcher.is_alive():
            self._watcher = threading.Thread(target=self._watch, name="swarm-workers", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        while not self._closed.wait(POLL):
            try:
                self._look()
            except Exception as exc:
                log.warning("looking at the worker tasks failed: %r", exc)

    def _look(self) -> None:
        with self._lock:
            services = dict(self._services)
        if not services:
            return
        tasks = self.engine.tasks_of([s.id for s in services.values()])
        for wid, s in services.items():
            task = current_task(tasks.get(s.id, []))
            if task is None or task_state(task) in DEAD_STATES:
                self._reap(wid, task_exit_code(task) if task else None)

    def _reap(self, wid: str, code: int | None) -> None:
        with self._lock:
            h = self._handles.pop(wid, None)
            service = self._services.pop(wid, None)
        if h is None:
            return
        log.info("worker %s (service %s) exited with %s", wid, h.host, code)
        for cb in list(self._callbacks):
            try:
                cb(wid, code)
            except Exception:
                log.exception("exit callback failed")

        def remove():
            if service is not None:
                self.engine.remove_service(service)
            self.engine.remove_volume(d.volume_name(self.cluster, wid))
        threading.Thread(target=remove, name=f"remove-{wid}", daemon=True).start()


# --- app roles -----------------------------------------------------------------------
@dataclass
class Task:
    """One running task of a role's service: one app instance."""
    id: str
    role_id: str
    slot: int                  # Swarm's slot - 1: 0, 1, ...
    host: str | None
    port: int | None
    state: str
    started: float
    pid: int = 0
    exit_code: int | None = None
    labels: dict = field(default_factory=dict)


class SwarmRoles:
    """App roles as replicated services (see the module docstring). The
    app controller calls apply_role / remove_role / tasks / kill_task."""
    name = "swarm"
    kind = "instance"
    replicated = True       # the controller hands whole roles to this runtime

    def __init__(self, settings: Settings, *, client_factory: Callable[[], Any] | None = None,
                 environ: Mapping[str, str] | None = None):
        self.settings = settings
        self.engine = _Engine(settings, client_factory, environ)
        self.cluster = settings.cluster
        self.base_image = d.app_base_image(self.engine.environ)
        self.limits = Limits.from_env()
        self._build_locks: dict[str, threading.Lock] = {}
        self._lock = threading.RLock()
        self._followers: dict[str, threading.Thread] = {}
        self._closed = threading.Event()

    # --- declaring ---------------------------------------------------------------------
    def apply_role(self, spec: Spec, replicas: int, config: str) -> str | None:
        """Make the role's service run `spec` with `replicas` tasks. Returns
        what it did ("created", "updated", "scaled to N") or None."""
        name = role_service_name(self.cluster, spec.labels.get("tenant", ""), spec.labels.get("app", ""),
                                 spec.labels.get("role", spec.id))
        existing = self._service(spec.id)
        if existing is not None:
            labels = (existing.attrs.get("Spec") or {}).get("Labels") or {}
            if labels.get(LABEL_CONFIG) == config:
                have = (((existing.attrs.get("Spec") or {}).get("Mode") or {}).get("Replicated") or {}).get("Replicas")
                if have != replicas:
                    self.engine.scale(existing.id, replicas)
                    return f"scaled to {replicas}"
                return None
        image = spec.image or d.build_app_image(self.engine.client, spec, self.base_image, self.cluster,
                                                self._build_lock)
        kwargs = self._service_kwargs(spec, name, replicas, config)
        if existing is None:
            try:
                self.engine.client.services.create(image, **kwargs)
            except Exception as exc:
                raise StartError(f"role {spec.id}: cannot create its service {name}: {exc}") from exc
            return "created"
        try:
            existing.update(image=image, **kwargs)
        except Exception as exc:
            raise StartError(f"role {spec.id}: cannot update its service {name}: {exc}") from exc
        return "updated"

    def _service_kwargs(self, spec: Spec, name: str, replicas: int, config: str) -> dict:
        from docker.types import RestartPolicy, ServiceMode, UpdateConfig
        home = d.APP_DIR if spec.image is None else (d.image_workdir(spec) or "")
        env = instance_env(spec, path=None, home=home, pythonpath=None)
        if not env["HOME"]:
            del env["HOME"]
        env["STRATUS_INSTANCE"] = INSTANCE_TEMPLATE
        labels = role_labels(self.cluster, spec, config)
        kwargs: dict[str, Any] = dict(
            name=name, labels=labels, container_labels=labels, env=_env_list(env), networks=[self.engine.network],
            mode=ServiceMode("replicated", replicas=replicas),
            restart_policy=RestartPolicy(condition="any", delay=10**9, max_attempts=0),
            update_config=UpdateConfig(parallelism=1, order="start-first", failure_action="continue",
                                       monitor=2 * 10**9),
            stop_grace_period=10 * 10**9, **service_confinement(self.limits, d.tenant_uid(
                self.cluster, spec.labels.get("tenant", ""))))
        if spec.argv:
            kwargs["args"] = list(spec.argv)
        if spec.image is None:
            kwargs["workdir"] = d.APP_DIR
        elif d.image_workdir(spec):
            kwargs["workdir"] = d.image_workdir(spec)
        return kwargs

    def _build_lock(self, tag: str) -> threading.Lock:
        with self._lock:
            return self._build_locks.setdefault(tag, threading.Lock())

    def remove_role(self, role_id: str) -> bool:
        s = self._service(role_id)
        if s is None:
            return False
        self.engine.remove_service(s)
        return True

    def roles(self) -> dict[str, dict[str, str]]:
        """{role unit id: its spec labels} of every role service of this cluster."""
        out = {}
        for s in self.engine.services([f"{d.LABEL_KIND}={LABEL_KIND_ROLE}"]):
            labels = (s.attrs.get("Spec") or {}).get("Labels") or {}
            if labels.get(LABEL_ROLE_ID):
                out[labels[LABEL_ROLE_ID]] = d.spec_labels(labels) | {"config": labels.get(LABEL_CONFIG, "")}
        return out

    def _service(self, role_id: str):
        found = self.engine.services([f"{d.LABEL_KIND}={LABEL_KIND_ROLE}", f"{LABEL_ROLE_ID}={role_id}"])
        return found[0] if found else None

    # --- observing ---------------------------------------------------------------------
    def tasks(self) -> dict[str, list[Task]]:
        """{role unit id: its running tasks} (a task that ended is not there)."""
        services = self.engine.services([f"{d.LABEL_KIND}={LABEL_KIND_ROLE}"])
        tasks = self.engine.tasks_of([s.id for s in services])
        out: dict[str, list[Task]] = {}
        for s in services:
            labels = (s.attrs.get("Spec") or {}).get("Labels") or {}
            rid = labels.get(LABEL_ROLE_ID)
            if not rid:
                continue
            try:
                port = int(labels[d.LABEL_PORT]) if labels.get(d.LABEL_PORT) else None
            except ValueError:
                port = None
            lst = out.setdefault(rid, [])
            for t in tasks.get(s.id, []):
                if task_state(t) != "running" or (t.get("DesiredState") or "running") != "running":
                    continue
                tlabels = d.spec_labels(((t.get("Spec") or {}).get("ContainerSpec") or {}).get("Labels") or labels)
                tlabels["config"] = (((t.get("Spec") or {}).get("ContainerSpec") or {}).get("Labels")
                                     or labels).get(LABEL_CONFIG, "")
                task = Task(id=t["ID"], role_id=rid, slot=max(0, int(t.get("Slot") or 1) - 1),
                            host=task_address(t, self.engine.network), port=port, state="running",
                            started=d.parse_started((t.get("Status") or {}).get("Timestamp")) or time.time(),
                            labels=tlabels)
                cid = task_container(t)
                task.pid = self.engine.container_pid(cid)
                lst.append(task)
                self._follow(task, cid)
        return out

    def task_exit(self, task_id: str) -> int | None:
        """The exit code of an ended task (None when unknown)."""
        try:
            return task_exit_code(self.engine.client.api.inspect_task(task_id))
        except Exception:
            return None

    def kill_task(self, task_id: str) -> bool:
        """SIGKILL the task's container (on this node); Swarm starts another in its slot."""
        try:
            t = self.engine.client.api.inspect_task(task_id)
        except Exception:
            return False
        return self.engine.kill_container(task_container(t))

    # --- logs --------------------------------------------------------------------------
    def log_file(self, labels: Mapping[str, str], task_id: str) -> str | None:
        t, a = labels.get("tenant"), labels.get("app")
        if not t or not a:
            return None
        try:
            return str(self.engine.log_dir / check_log_path(f"instances/{t}/{a}/{task_id}.log"))
        except ValueError:
            return None

    def _follow(self, task: Task, container_id: str | None) -> None:
        if not container_id or self._closed.is_set():
            return
        with self._lock:
            t = self._followers.get(task.id)
            if t is not None and t.is_alive():
                return
            path = self.log_file(task.labels, task.id)
            if not path:
                return
            t = threading.Thread(target=self._follow_logs, args=(container_id, Path(path)), name=f"logs-{task.id[:12]}",
                                 daemon=True)
            self._followers[task.id] = t
        t.start()

    def _follow_logs(self, container_id: str, path: Path) -> None:
        client = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            kw = {"stream": True, "follow": True, "stdout": True, "stderr": True}
            if path.exists():
                kw["since"] = path.stat().st_mtime
            client = self.engine._client_factory()
            with open(path, "ab") as out:
                for chunk in client.containers.get(container_id).logs(**kw):
                    if self._closed.is_set():
                        break
                    out.write(chunk)
                    out.flush()
        except Exception as exc:
            if not d._not_found(exc):
                log.warning("following the output of container %s: %s", container_id[:12], exc)
        finally:
            if client is not None:
                try:
                    client.close()
                except Exception:
                    pass

    # --- the unit interface the controller also calls ---------------------------------
    def adopt(self) -> list:
        return []      # the services outlive an orchestrator; the controller observes their tasks

    def running(self) -> dict:
        return {}

    def on_exit(self, callback) -> None:
        pass           # exits are observed by the controller's tick (tasks())

    def close(self, remove: bool = True, *, remove_workers: bool | None = None) -> None:
        if remove_workers is not None:
            remove = remove_workers
        self._closed.set()
        if remove:
            for s in self.engine.services([f"{d.LABEL_KIND}={LABEL_KIND_ROLE}"]):
                self.engine.remove_service(s)
