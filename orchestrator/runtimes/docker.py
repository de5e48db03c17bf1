"""The Docker runtime: each unit is a container named
`stratus-<cluster>-<id>` (so it is reachable by that name on its network): a
DB worker on the stack's network STRATUS_DOCKER_NETWORK, an app instance on
its tenant's own network (below). Two kinds, each selected by its own labels, so a
worker runtime never sees an instance container and vice versa.

DB workers (kind "worker"): `python -m worker --id ID` from STRATUS_WORKER_IMAGE,
with a fresh named volume for its database.

  container  stratus-<cluster>-<worker id>
             labels stratus.cluster=<cluster>, stratus.role=worker,
                    stratus.worker_id=<id>, stratus.volume=<volume>
  volume     stratus-<cluster>-<worker id>-data  on /var/lib/stratus
             (the same labels), removed with its container: a replacement
             worker has a new id, so it always starts from an empty store.
  env        the orchestrator's STRATUS_* settings minus secrets and runtime
             knobs (worker_env), the id and the state dir.

App instances (kind "instance"): spec.argv in spec.image, or in an image built
from spec.context (the unpacked package):

  container  stratus-<cluster>-<instance id>
             labels stratus.cluster=<cluster>, stratus.kind=instance,
                    stratus.instance_id=<id>, stratus.port=<port> (web),
                    stratus.log=<log path>, stratus.label.<k>=<v> for each
                    spec label (tenant, app, role, digest...): adopt() rebuilds
                    the handle (labels, host, port) from them.
  host:port  the container's name and spec.port
  walls      (issue #22, docs/operations.md "Docker walls") the tenant's
             uid:gid (tenant_uid), cap_drop ALL, no-new-privileges, a
             read-only root with a tmpfs /tmp of disk_mb, mem_limit =
             memswap_limit, nano_cpus, pids_limit, a json-file log of log_mb
             (`confinement`, the limits from Limits.from_env()).
  network    stratus-<cluster>-tenant-<tenant>: internal (no route out),
             made at the tenant's first instance, the stack's services named
             by STRATUS_DOCKER_TENANT_PEERS ("service[:alias],...", compose
             services on STRATUS_DOCKER_NETWORK) joined to it, removed with
             the tenant's last instance (a stop) and by close(remove=True).
  workdir    /app for a built image; with an image of the role's own, spec.cwd
             (a path inside the image) unless it is spec.context (the
             package's directory on this host), else the image's own
  env        base.instance_env and nothing else: LANG=C.UTF-8, HOME (the
             workdir, when known), PYTHONUNBUFFERED=1, PORT
             (web), spec.env. PATH is the image's own and there is no
             PYTHONPATH: the base image has bus installed in its venv, first
             on its PATH, so `python` is that venv's interpreter.
  image      built when spec.image is None, offline (the base holds every
             dependency; no pip, build network "none"), from a generated
             Dockerfile
                 FROM <STRATUS_IMAGE_PREFIX or stratus>/app:latest
                 COPY . /app
                 WORKDIR /app
             over a build context made of the package's files (owned by root,
             world-readable) plus that Dockerfile and a .dockerignore naming it
             (the daemon drops both from the context, so /app holds exactly the
             package; a package's own .dockerignore is not used). Tagged
             stratus-app/<tenant>-<app>:<digest[7:19]>-<base id> (from the spec's labels
             tenant, app, digest), labelled stratus.cluster=<cluster>, and
             cached by tag: an existing tag is never rebuilt.
  logs       a follower thread per container streams its output (stdout and
             stderr, `docker logs --follow`) into the same file as the process
             runtime: <cluster state>/logs/<spec.log>, i.e.
             logs/instances/<tenant>/<app>/<id>.log. A runtime closed without
             removal stops writing; after adopt() its successor's follower
             resumes from the file's last modification time (`since`, to the
             microsecond), so what was written is not written again (a line in
             flight at the very moment of the takeover may be lost). The
             container keeps Docker's own json-file log as well.

Both kinds: the unit's pid is the container's main pid (State.Pid from
inspect, in the host's pid namespace). Deaths come from the Docker events
stream (`die`, filtered by the cluster's and the kind's labels), so a killed
container is reported at once, with its exit code; the dead container (and a
worker's volume) is then removed. adopt() takes over the running containers an
earlier orchestrator left with this cluster's and kind's labels and removes
the dead ones. close() stops and removes the containers (and volumes) it
started or adopted, and any dead ones of the cluster and kind, so
`docker-compose down` leaves none behind; a standby orchestrator, which runs
none, leaves the leader's alone. Built app images are kept (the tag cache).

Environment read here (besides the Settings):
  STRATUS_WORKER_IMAGE    default $STRATUS_IMAGE_PREFIX/worker:latest (prefix: stratus)
  STRATUS_IMAGE_PREFIX    the base of app images: <prefix>/app:latest
  STRATUS_DOCKER_NETWORK  default stratus
  STRATUS_DOCKER_TENANT_PEERS  the services joined to each tenant network (none by default)
  DOCKER_HOST etc.        as for the docker CLI (docker.from_env)"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tarfile
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

from bus.settings import Settings

from .base import ExitCallback, Handle, Runtime, Spec, StartError, check_id, check_log_path, instance_env
from .confine import TENANT_UIDS
from .limits import MIB, Limits

log = logging.getLogger("stratus.orchestrator.runtime")

LABEL_CLUSTER = "stratus.cluster"
LABEL_ROLE = "stratus.role"
LABEL_WORKER = "stratus.worker_id"
LABEL_VOLUME = "stratus.volume"
LABEL_KIND = "stratus.kind"
LABEL_INSTANCE = "stratus.instance_id"
LABEL_PORT = "stratus.port"
LABEL_LOG = "stratus.log"
LABEL_PREFIX = "stratus.label."
LABEL_TENANT = "stratus.tenant"
TENANT_NET = "tenant-network"
SCRATCH = "/tmp"
ROLE = "worker"
INSTANCE = "instance"
DATA_DIR = "/var/lib/stratus"
APP_DIR = "/app"
APP_REPO = "stratus-app"
DOCKERFILE = ".stratus.Dockerfile"
_STARTED_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")

# Settings a worker does not need (secrets, this runtime's own knobs, the
# state dir, which is the volume inside the container).
_NOT_PASSED = {
    "STRATUS_WORKER_IMAGE", "STRATUS_DOCKER_NETWORK", "STRATUS_DOCKER_GID", "STRATUS_WORKER_ID",
    "STRATUS_WORKER_DB", "STRATUS_STATE_DIR", "STRATUS_ADMIN_PASSWORD", "STRATUS_TOKEN_SECRET",
    "STRATUS_BIND_HOST", "STRATUS_ADVERTISE_HOST", "STRATUS_RUNTIME",
}


# --- pure helpers (unit-tested without Docker) ------------------------------------
def container_name(cluster: str, unit_id: str) -> str:
    return f"stratus-{cluster}-{unit_id}"


def volume_name(cluster: str, worker_id: str) -> str:
    return f"stratus-{cluster}-{worker_id}-data"


def worker_labels(cluster: str, worker_id: str) -> dict[str, str]:
    return {LABEL_CLUSTER: cluster, LABEL_ROLE: ROLE, LABEL_WORKER: worker_id,
            LABEL_VOLUME: volume_name(cluster, worker_id)}


def instance_labels(cluster: str, spec: Spec) -> dict[str, str]:
    """The labels of an instance container: everything adopt() needs."""
    labels = {LABEL_CLUSTER: cluster, LABEL_KIND: INSTANCE, LABEL_INSTANCE: spec.id}
    if spec.port is not None:
        labels[LABEL_PORT] = str(spec.port)
    if spec.log:
        labels[LABEL_LOG] = spec.log
    for k, v in spec.labels.items():
        labels[LABEL_PREFIX + k] = v
    return labels


def spec_labels(container_labels: Mapping[str, str]) -> dict[str, str]:
    """The spec's labels back from an instance container's labels."""
    return {k[len(LABEL_PREFIX):]: v for k, v in (container_labels or {}).items() if k.startswith(LABEL_PREFIX)}


def unit_label(kind: str) -> str:
    return LABEL_WORKER if kind == "worker" else LABEL_INSTANCE


def cluster_filters(cluster: str, kind: str = "worker") -> dict[str, list[str]]:
    """The label filter that selects this cluster's containers (and volumes) of one kind."""
    if kind == "worker":
        return {"label": [f"{LABEL_CLUSTER}={cluster}", f"{LABEL_ROLE}={ROLE}"]}
    return {"label": [f"{LABEL_CLUSTER}={cluster}", f"{LABEL_KIND}={INSTANCE}"]}


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
        # its metrics endpoint, on every interface of its container, found by
        # the container's name on the stack's network (orchestrator/discovery.py)
        "STRATUS_WORKER_METRICS_HOST": "0.0.0.0",
        "STRATUS_ADVERTISE_HOST": container_name(settings.cluster, worker_id),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def worker_secrets_env(environ: Mapping[str, str], settings: Settings) -> dict[str, str]:
    """What a worker container is given of the platform's secrets (a worker
    is the platform's; an instance never gets these): the workers' own broker
    account (broker-worker.url in the secrets directory, bus/broker_accounts.py)
    unless this orchestrator was given an explicit STRATUS_AMQP_URL, and the
    platform's ZooKeeper identity (bus/zk.py; "none" when auth is off), so a
    worker never generates an identity of its own in its own volume."""
    from bus import zk as bzk
    env: dict[str, str] = {}
    if not environ.get("STRATUS_AMQP_URL"):
        try:
            from bus.broker_accounts import url_file
            from bus.settings import secrets_dir
            url = url_file(secrets_dir(), "worker").read_text().strip()
            if url:
                env["STRATUS_AMQP_URL"] = url
        except (ImportError, OSError):
            pass
    ident = bzk.platform_identity(settings)
    env["STRATUS_ZK_AUTH"] = ident.credential if ident is not None else "none"
    return env


def container_instance_env(spec: Spec) -> dict[str, str]:
    """An instance container's whole environment (see the module docstring)."""
    home = APP_DIR if spec.image is None else (image_workdir(spec) or "")
    env = instance_env(spec, path=None, home=home, pythonpath=None)
    if not env["HOME"]:
        del env["HOME"]   # an image of the role's own, no cwd given: its HOME stands
    return env


def image_workdir(spec: Spec) -> str | None:
    """The working directory inside an image of the role's own: spec.cwd,
    unless that is the package's directory on the orchestrator's host
    (spec.context), which means nothing inside the container."""
    if spec.image is None or not spec.cwd or spec.cwd == spec.context:
        return None
    return spec.cwd


def tenant_uid(cluster: str, tenant: str) -> int:
    """The uid (and gid) a tenant's containers run as: fixed per (cluster,
    tenant), in the tenants' range, owning nothing in any image. One uid per
    tenant, because the kernel counts some things per uid across the whole
    host (inotify instances, keyring quotas): tenants never share those
    counters (a hash: two tenants may collide, at 1 in 100000 per pair,
    which costs nothing but that separation)."""
    h = int(hashlib.sha256(f"{cluster}/{tenant}".encode()).hexdigest()[:12], 16)
    return TENANT_UIDS[0] + h % (TENANT_UIDS[1] - TENANT_UIDS[0] + 1)


def tenant_network_name(cluster: str, tenant: str) -> str:
    """stratus-<cluster>-tenant-<tenant>: the tenant's instances, the broker
    and the gateway's path to them, nothing else (see the module docstring)."""
    return f"stratus-{cluster}-tenant-{tenant or 'none'}"


def tenant_network_labels(cluster: str, tenant: str) -> dict[str, str]:
    return {LABEL_CLUSTER: cluster, LABEL_KIND: TENANT_NET, LABEL_TENANT: tenant or "none"}


def parse_peers(raw: str | None) -> list[tuple[str, str | None]]:
    """STRATUS_DOCKER_TENANT_PEERS: "service[:alias],..." -> [(service, alias)],
    the stack's compose services joined to every tenant network (an alias
    makes the service reachable by that name there: the broker's host name
    in the instances' STRATUS_AMQP_URL)."""
    out = []
    for item in (raw or "").split(","):
        item = item.strip()
        if not item:
            continue
        svc, _, alias = item.partition(":")
        out.append((svc.strip(), alias.strip() or None))
    return out


def log_options(limits: Limits) -> dict[str, str]:
    """json-file options keeping at most limits.log_mb of an instance's output (two files)."""
    return {"max-size": f"{max(1, limits.log_mb * 1024 // 2)}k", "max-file": "2"}


def confinement(limits: Limits, uid: int) -> dict[str, Any]:
    """The create() arguments that wall an instance container in (issue #22,
    docs/operations.md "Docker walls"): an unprivileged uid:gid, no
    capabilities, no_new_privs, a read-only root with a tmpfs /tmp of
    disk_mb, and the engine's limits (memory with no swap beyond it, CPU,
    processes, log volume)."""
    return dict(
        user=f"{uid}:{uid}",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges:true"],
        read_only=True,
        tmpfs={SCRATCH: f"rw,nosuid,nodev,size={limits.disk_mb}m,mode=1777"},
        mem_limit=f"{limits.memory_mb}m",
        memswap_limit=f"{limits.memory_mb}m",
        nano_cpus=int(round(limits.cpus * 1e9)),
        pids_limit=limits.pids,
        log_config={"type": "json-file", "config": log_options(limits)},
    )


def worker_image(environ: Mapping[str, str]) -> str:
    return environ.get("STRATUS_WORKER_IMAGE") or f"{environ.get('STRATUS_IMAGE_PREFIX') or 'stratus'}/worker:latest"


def app_base_image(environ: Mapping[str, str]) -> str:
    return f"{environ.get('STRATUS_IMAGE_PREFIX') or 'stratus'}/app:latest"


def app_image_tag(tenant: str, app: str, digest: str, base_id: str = "") -> str:
    """stratus-app/<tenant>-<app>:<digest[7:19]>[-<base id[7:15]>] for a package
    digest "sha256:<64 hex>" built on the base image `base_id`: a rebuilt base
    makes a new tag, so an app never keeps running an old base's code."""
    if not _NAME_RE.match(tenant or "") or not _NAME_RE.match(app or ""):
        raise ValueError(f"tenant {tenant!r} and app {app!r} must be lower-case names")
    if not _DIGEST_RE.match(digest or ""):
        raise ValueError(f"digest {digest!r} is not sha256:<64 hex digits>")
    base = base_id.split(":", 1)[-1][:8] if base_id else ""
    return f"{APP_REPO}/{tenant}-{app}:{digest[7:19]}" + (f"-{base}" if base else "")


def dockerfile_text(base_image: str) -> str:
    return f"FROM {base_image}\nCOPY . {APP_DIR}\nWORKDIR {APP_DIR}\n"


def build_context(context_dir: str | os.PathLike, base_image: str, out) -> None:
    """Write the build context (an uncompressed tar) to the file `out`: the
    package's files (root-owned, world-readable: the base image runs as an
    unprivileged user), the generated Dockerfile and a .dockerignore naming it."""
    root = Path(context_dir)
    if not root.is_dir():
        raise StartError(f"build context {str(root)!r} is not a directory")

    def norm(ti: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if not (ti.isfile() or ti.isdir()):
            return None   # packages hold no links or devices (orchestrator/apps/packages.py)
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = "root"
        ti.mode = 0o755 if ti.isdir() or ti.mode & 0o111 else 0o644
        return ti

    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if rel in (DOCKERFILE, ".dockerignore"):
                continue
            tar.add(path, arcname=rel, recursive=False, filter=norm)
        generated = ((DOCKERFILE, dockerfile_text(base_image)), (".dockerignore", f"{DOCKERFILE}\n.dockerignore\n"))
        for name, text in generated:
            data = text.encode()
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, int(time.time())
            tar.addfile(ti, io.BytesIO(data))


def parse_started(ts: str | None) -> float:
    """Docker's State.StartedAt (RFC 3339, UTC, nanoseconds) as a unix time; 0.0 when unknown."""
    m = _STARTED_RE.match(ts or "")
    if not m or m.group(1).startswith("0001-"):
        return 0.0
    dt = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    return dt.timestamp() + (float("0." + m.group(2)) if m.group(2) else 0.0)


def die_event(event: Mapping[str, Any], cluster: str, kind: str = "worker") -> tuple[str, str, int | None] | None:
    """(container id, unit id, exit code) for a `die` event of one of this
    cluster's units of `kind`, else None."""
    if event.get("Type", "container") != "container":
        return None
    if (event.get("Action") or event.get("status")) != "die":
        return None
    actor = event.get("Actor") or {}
    attrs = actor.get("Attributes") or {}
    if attrs.get(LABEL_CLUSTER) != cluster:
        return None
    if kind == "worker" and attrs.get(LABEL_ROLE) != ROLE:
        return None
    if kind == INSTANCE and attrs.get(LABEL_KIND) != INSTANCE:
        return None
    uid = attrs.get(unit_label(kind))
    if not uid:
        return None
    code: int | None
    try:
        code = int(attrs["exitCode"])
    except (KeyError, TypeError, ValueError):
        code = None
    return actor.get("ID") or event.get("id") or "", uid, code


def build_app_image(client, spec: Spec, base_image: str, cluster: str,
                    lock_for: Callable[[str], threading.Lock]) -> str:
    """The tag of an instance's (or a Swarm role's) image, built from
    spec.context on `base_image` unless that tag exists already (see the
    module docstring); `lock_for(tag)` serialises builds of one tag."""
    if not spec.context:
        raise StartError(f"instance {spec.id}: no image and no build context")
    try:
        base_id = client.images.get(base_image).id
    except Exception as exc:
        raise StartError(f"instance {spec.id}: the base image {base_image} is not here: {exc}") from None
    try:
        tag = app_image_tag(spec.labels.get("tenant", ""), spec.labels.get("app", ""),
                            spec.labels.get("digest", ""), base_id)
    except ValueError as exc:
        raise StartError(f"instance {spec.id}: cannot name its image: {exc}") from None
    with lock_for(tag):   # instances of one app starting together build it once
        try:
            client.images.get(tag)
            return tag
        except Exception as exc:
            if not _not_found(exc):
                raise StartError(f"instance {spec.id}: inspecting {tag}: {exc}") from exc
        t0 = time.monotonic()
        with tempfile.TemporaryFile() as ctx:
            build_context(spec.context, base_image, ctx)
            ctx.seek(0)
            try:
                client.images.build(fileobj=ctx, custom_context=True, dockerfile=DOCKERFILE, tag=tag,
                                    labels={LABEL_CLUSTER: cluster}, rm=True, forcerm=True,
                                    pull=False, network_mode="none")
            except Exception as exc:
                raise StartError(f"instance {spec.id}: building {tag} on {base_image} failed: "
                                 f"{_build_error(exc)}") from exc
        log.info("built %s on %s in %.1fs", tag, base_image, time.monotonic() - t0)
        return tag


# --- the runtime ------------------------------------------------------------------
class DockerRuntime(Runtime):
    name = "docker"

    def __init__(self, settings: Settings, *, client_factory: Callable[[], Any] | None = None,
                 environ: Mapping[str, str] | None = None, kind: str = "worker"):
        if kind not in ("worker", INSTANCE):
            raise ValueError(f"runtime kind {kind!r}: use 'worker' or 'instance'")
        self.settings = settings
        self.kind = kind
        self.cluster = settings.cluster
        self.environ = dict(os.environ if environ is None else environ)
        self.image = worker_image(self.environ)
        self.base_image = app_base_image(self.environ)
        self.network = self.environ.get("STRATUS_DOCKER_NETWORK") or "stratus"
        self.log_dir = settings.cluster_state_path() / "logs"
        if client_factory is None:
            import docker

            def client_factory():
                return docker.from_env(timeout=60)
        self._client_factory = client_factory
        self.client = client_factory()
        self._handles: dict[str, Handle] = {}
        self._exited: set[str] = set()
        self._callbacks: list[ExitCallback] = []
        self._lock = threading.RLock()
        self._closed = threading.Event()
        self._events_thread: threading.Thread | None = None
        self._stream = None
        self._subscribed = threading.Event()
        self._build_locks: dict[str, threading.Lock] = {}
        self._followers: dict[str, threading.Thread] = {}
        self._detached = False     # closed without removal: a successor owns the units now
        # Instances: what each may use, and the stack's services joined to every tenant network.
        self.limits = Limits.from_env() if kind == INSTANCE else None
        self.peers = parse_peers(self.environ.get("STRATUS_DOCKER_TENANT_PEERS"))
        self._net_lock = threading.Lock()

    # --- interface -----------------------------------------------------------------
    def start(self, spec: Spec) -> Handle:
        check_id(spec.id)
        with self._lock:
            if spec.id in self._handles:
                raise ValueError(f"unit {spec.id} is running already")
        self._ensure_events()
        if self.kind == "worker":
            return self._start_worker(spec)
        return self._start_instance(spec)

    def stop(self, unit_id: str, timeout: float = 10.0) -> None:
        h = self._handles.get(unit_id)
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
        while time.monotonic() < deadline and unit_id in self.running():
            time.sleep(0.05)
        if unit_id in self.running():
            self._reap(h.ref, unit_id, None)
        if self.kind == INSTANCE:
            # A stopped instance is not restarted: its tenant's network goes
            # with its last instance (the container first: it holds the network).
            self._remove(h.ref, None)
            self._prune_tenant_networks((h.labels or {}).get("tenant", ""))

    def kill(self, unit_id: str) -> None:
        h = self._handles.get(unit_id)
        if h is None:
            raise KeyError(unit_id)
        try:
            self.client.containers.get(h.ref).kill(signal="SIGKILL")
        except Exception as exc:
            if not _not_found(exc) and "is not running" not in str(exc):
                raise

    def running(self) -> dict[str, Handle]:
        with self._lock:
            return {i: h for i, h in self._handles.items() if i not in self._exited}

    def adopt(self) -> list[Handle]:
        self._ensure_events()
        adopted = []
        for c in self.client.containers.list(all=True, filters=cluster_filters(self.cluster, self.kind)):
            labels = c.labels or {}
            uid = labels.get(unit_label(self.kind))
            if not uid:
                continue
            with self._lock:
                if uid in self._handles:
                    continue
            state = c.attrs.get("State") or {}
            if state.get("Status") != "running" or not state.get("Pid"):
                log.info("%s container %s is %s: removing it", self.kind, c.name, state.get("Status"))
                self._remove(c.id, labels.get(LABEL_VOLUME) if self.kind == "worker" else None)
                continue
            started = parse_started(state.get("StartedAt"))
            if self.kind == "worker":
                h = Handle(id=uid, pid=int(state["Pid"]), host=c.name, ref=c.id, started=started,
                           labels={"adopted": True, "container": c.name}, adopted=True)
            else:
                try:
                    port = int(labels[LABEL_PORT]) if labels.get(LABEL_PORT) else None
                except ValueError:
                    port = None
                h = Handle(id=uid, pid=int(state["Pid"]), host=c.name, port=port, ref=c.id, started=started,
                           labels=spec_labels(labels), adopted=True, log=self._log_file(labels.get(LABEL_LOG)))
            with self._lock:
                self._exited.discard(uid)
                self._handles[uid] = h
            adopted.append(h)
            if self.kind == INSTANCE:
                self._follow(h, resume=True)
            log.info("adopted %s %s (container %s, pid %d)", self.kind, uid, c.name, h.pid)
        if self.kind == "worker":
            # Volumes whose container is gone (an orchestrator killed between the two removals).
            self._remove_orphan_volumes()
        return adopted

    def on_exit(self, callback: ExitCallback) -> None:
        self._callbacks.append(callback)

    def close(self, remove: bool = True, *, remove_workers: bool | None = None) -> None:
        if remove_workers is not None:
            remove = remove_workers
        self._closed.set()
        stream = self._stream
        if stream is not None:
            try:
                stream.close()
            except Exception:
                pass
        if self._events_thread is not None:
            self._events_thread.join(5)
        if not remove:
            self._detached = True
            return
        with self._lock:
            mine = set(self._handles)
        try:
            # The units this runtime started or adopted, and dead leftovers; a
            # running unit it never adopted belongs to another (leading) orchestrator.
            containers = [c for c in self.client.containers.list(all=True,
                                                                 filters=cluster_filters(self.cluster, self.kind))
                          if (c.labels or {}).get(unit_label(self.kind)) in mine
                          or (c.attrs.get("State") or {}).get("Status") != "running"]
        except Exception:
            log.exception("cannot list the %s containers to remove them", self.kind)
            return
        threads = [threading.Thread(target=self._stop_and_remove, args=(c,), daemon=True) for c in containers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        if self.kind == "worker":
            self._remove_orphan_volumes()
        else:
            self._prune_tenant_networks(None)
        with self._lock:
            self._handles.clear()
        log.info("removed %d %s containers", len(containers), self.kind)

    # --- starting --------------------------------------------------------------------
    def _start_worker(self, spec: Spec) -> Handle:
        worker_id = spec.id
        labels = worker_labels(self.cluster, worker_id)
        vol = volume_name(self.cluster, worker_id)
        self.client.volumes.create(name=vol, labels=labels)
        kwargs = dict(
            command=list(spec.argv),
            name=container_name(self.cluster, worker_id),
            hostname=worker_id,
            labels=labels,
            environment={**worker_env(self.environ, self.settings, worker_id),
                         **worker_secrets_env(self.environ, self.settings), **spec.env},
            network=self.network,
            volumes={vol: {"bind": DATA_DIR, "mode": "rw"}},
            log_config={"type": "json-file", "config": {"max-size": "10m", "max-file": "3"}},
        )
        container = None
        try:
            # create + start, not run(): a missing image is an error here, never a pull.
            container = self.client.containers.create(spec.image or self.image, **kwargs)
            container.start()
        except Exception:
            if container is not None:
                self._remove(container.id, None)
            self._remove_volume(vol)
            raise
        return self._started(spec, container, {"adopted": False, "container": container.name}, None,
                             spec.image or self.image)

    def instance_kwargs(self, spec: Spec, network: str) -> dict[str, Any]:
        """containers.create()'s arguments for an instance (unit-tested)."""
        tenant = spec.labels.get("tenant", "")
        kwargs: dict[str, Any] = dict(
            name=container_name(self.cluster, spec.id),
            hostname=spec.id,
            labels=instance_labels(self.cluster, spec),
            environment=container_instance_env(spec),
            network=network,
            **confinement(self.limits or Limits.from_env(), tenant_uid(self.cluster, tenant)),
        )
        if spec.argv:
            kwargs["command"] = list(spec.argv)
        if spec.image is None:
            kwargs["working_dir"] = APP_DIR
        elif image_workdir(spec):
            kwargs["working_dir"] = image_workdir(spec)
        return kwargs

    def _start_instance(self, spec: Spec) -> Handle:
        image = spec.image or self.build_image(spec)
        tenant = spec.labels.get("tenant", "")
        container = None
        try:
            # The network and the container under one lock: a stop() of the
            # tenant's last instance does not remove the network in between.
            with self._net_lock:
                network = self._tenant_network(tenant)
                container = self.client.containers.create(image, **self.instance_kwargs(spec, network))
            container.start()
        except Exception as exc:
            if container is not None:
                self._remove(container.id, None)
            raise StartError(f"instance {spec.id}: cannot start a container of {image}: {exc}") from exc
        return self._started(spec, container, dict(spec.labels), self._log_file(spec.log), image)

    def _started(self, spec: Spec, container, labels: dict, logfile: str | None, image: str) -> Handle:
        container.reload()
        state = container.attrs.get("State") or {}
        h = Handle(id=spec.id, pid=int(state.get("Pid") or 0), host=container.name, port=spec.port,
                   ref=container.id, started=time.time(), labels=labels, adopted=False, log=logfile)
        with self._lock:
            self._exited.discard(spec.id)
            self._handles[spec.id] = h
        if self.kind == INSTANCE:
            self._follow(h, resume=False)
        if not state.get("Running", True):
            # It died before we looked: the die event may have come before the handle existed.
            self._reap(container.id, spec.id, state.get("ExitCode"))
        log.info("started %s %s (container %s, pid %d, image %s)", self.kind, spec.id, container.name, h.pid, image)
        return h

    # --- tenant networks -------------------------------------------------------------
    def _tenant_network(self, tenant: str) -> str:
        """The tenant's network (internal: no route out), made on first use,
        with the peers (the broker, the gateway...) joined to it. Called
        under _net_lock."""
        name = tenant_network_name(self.cluster, tenant)
        try:
            net = self.client.networks.get(name)
        except Exception as exc:
            if not _not_found(exc):
                raise
            try:
                net = self.client.networks.create(name, driver="bridge", internal=True, check_duplicate=True,
                                                  labels=tenant_network_labels(self.cluster, tenant))
                log.info("made the network %s for tenant %s", name, tenant)
            except Exception as exc:
                if "already exists" not in str(exc):
                    raise
                net = self.client.networks.get(name)   # another orchestrator was first
        self._join_peers(net)
        return name

    def _join_peers(self, net) -> None:
        """Connect the peers (compose services on the stack's network, by
        STRATUS_DOCKER_TENANT_PEERS) not connected to `net` yet: a gateway
        scaled up later joins at the next instance start."""
        if not self.peers:
            return
        wanted = dict(self.peers)
        try:
            candidates = self.client.containers.list(filters={"network": self.network,
                                                              "label": ["com.docker.compose.service"]})
            net.reload()
        except Exception as exc:
            log.warning("listing the peers for %s: %s", net.name, exc)
            return
        joined = set((net.attrs.get("Containers") or {}).keys())
        for c in candidates:
            svc = (c.labels or {}).get("com.docker.compose.service")
            if svc not in wanted or c.id in joined:
                continue
            alias = wanted[svc]
            try:
                net.connect(c, aliases=[alias] if alias else None)
                log.info("joined %s (%s) to %s", c.name, svc, net.name)
            except Exception as exc:
                if "already exists" not in str(exc):
                    log.warning("joining %s to %s: %s", c.name, net.name, exc)

    def _prune_tenant_networks(self, tenant: str | None) -> None:
        """Remove the tenant's network (all of this cluster's with None) when
        no instance container of it is left: the peers are disconnected first."""
        filters = {"label": [f"{LABEL_CLUSTER}={self.cluster}", f"{LABEL_KIND}={TENANT_NET}"]}
        if tenant is not None:
            filters["label"].append(f"{LABEL_TENANT}={tenant or 'none'}")
        with self._net_lock:
            try:
                nets = self.client.networks.list(filters=filters)
                live = {(c.labels or {}).get(LABEL_PREFIX + "tenant") or "none"
                        for c in self.client.containers.list(all=True, filters=cluster_filters(self.cluster, INSTANCE))}
            except Exception as exc:
                log.warning("listing the tenant networks: %s", exc)
                return
            for n in nets:
                if ((n.attrs.get("Labels") or {}).get(LABEL_TENANT) or "none") in live:
                    continue
                try:
                    n.reload()
                    for cid in list((n.attrs.get("Containers") or {}).keys()):
                        try:
                            n.disconnect(cid, force=True)
                        except Exception as exc:
                            if not _not_found(exc):
                                log.warning("disconnecting %s from %s: %s", cid[:12], n.name, exc)
                    n.remove()
                    log.info("removed the network %s", n.name)
                except Exception as exc:
                    if not _not_found(exc):
                        log.warning("removing the network %s: %s", n.name, exc)

    def build_image(self, spec: Spec) -> str:
        """The tag of the instance's image, built from spec.context unless that
        tag exists already (see the module docstring)."""
        return build_app_image(self.client, spec, self.base_image, self.cluster, self._build_lock)

    def _build_lock(self, tag: str) -> threading.Lock:
        with self._lock:
            return self._build_locks.setdefault(tag, threading.Lock())

    # --- logs --------------------------------------------------------------------------
    def _log_file(self, rel: str | None) -> str | None:
        if not rel:
            return None
        try:
            return str(self.log_dir / check_log_path(rel))
        except ValueError:
            return None

    def _follow(self, h: Handle, *, resume: bool) -> None:
        if not h.log:
            return
        t = threading.Thread(target=self._follow_logs, args=(h, resume), name=f"logs-{h.id}", daemon=True)
        with self._lock:
            self._followers[h.id] = t
        t.start()

    def _follow_logs(self, h: Handle, resume: bool) -> None:
        path = Path(h.log)
        client = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            since = None
            if resume and path.exists():
                since = path.stat().st_mtime   # a float: the API takes fractions of a second
            client = self._client_factory()
            kw = {"stream": True, "follow": True, "stdout": True, "stderr": True}
            if since is not None:
                kw["since"] = since
            stream = client.containers.get(h.ref).logs(**kw)
            # The log volume limit: the file is rotated (one old file kept,
            # <log>.1) at half of log_mb, so both together stay within it.
            cap = (self.limits or Limits.from_env()).log_mb * MIB // 2
            out = open(path, "ab")
            try:
                for chunk in stream:
                    if self._detached:
                        break   # a successor follows it now
                    out.write(chunk)
                    out.flush()
                    if out.tell() >= cap:
                        out.close()
                        os.replace(path, path.with_name(path.name + ".1"))
                        out = open(path, "ab")
            finally:
                out.close()
        except Exception as exc:
            if not _not_found(exc):
                log.warning("following the output of %s: %s", h.id, exc)
        finally:
            if client is not None and client is not self.client:
                try:
                    client.close()
                except Exception:
                    pass

    # --- internals -----------------------------------------------------------------
    def _stop_and_remove(self, c) -> None:
        try:
            if (c.attrs.get("State") or {}).get("Status") == "running":
                c.stop(timeout=10)
        except Exception as exc:
            if not _not_found(exc):
                log.warning("stopping %s: %s", c.name, exc)
        uid = (c.labels or {}).get(unit_label(self.kind))
        follower = self._followers.get(uid) if uid else None
        if follower is not None:
            follower.join(5)   # the rest of its output first
        self._remove(c.id, (c.labels or {}).get(LABEL_VOLUME) if self.kind == "worker" else None)

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

    def _reap(self, container_id: str, unit_id: str, code) -> None:
        with self._lock:
            h = self._handles.get(unit_id)
            if h is None or (container_id and h.ref and container_id != h.ref) or unit_id in self._exited:
                return
            self._exited.add(unit_id)
            self._handles.pop(unit_id, None)
            follower = self._followers.pop(unit_id, None)
        log.info("%s %s (container %s, pid %d) exited with %s", self.kind, unit_id, str(h.ref)[:12], h.pid, code)
        for cb in list(self._callbacks):
            try:
                cb(unit_id, code)
            except Exception:
                log.exception("exit callback failed")
        # A dead unit's container (and a worker's store) is not reused: remove them,
        # once its output is all in its log file.
        volume = volume_name(self.cluster, unit_id) if self.kind == "worker" else None

        def remove():
            if follower is not None:
                follower.join(5)
            self._remove(h.ref, volume)
        threading.Thread(target=remove, name=f"remove-{unit_id}", daemon=True).start()

    def _ensure_events(self) -> None:
        if self._closed.is_set():
            return
        if self._events_thread is None or not self._events_thread.is_alive():
            self._subscribed.clear()
            self._events_thread = threading.Thread(target=self._watch_events, name=f"docker-events-{self.kind}",
                                                   daemon=True)
            self._events_thread.start()
            # Subscribe before acting, so no death is missed (bounded wait).
            self._subscribed.wait(5)

    def _watch_events(self) -> None:
        client = self._client_factory()
        filters = {"type": "container", "event": "die", **cluster_filters(self.cluster, self.kind)}
        while not self._closed.is_set():
            try:
                self._stream = client.events(decode=True, filters=filters)
                self._subscribed.set()
                self._check_handles()
                for event in self._stream:
                    if self._closed.is_set():
                        break
                    hit = die_event(event, self.cluster, self.kind)
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
        """After (re)subscribing: any unit that died while we were not listening."""
        for uid, h in list(self.running().items()):
            try:
                state = self.client.containers.get(h.ref).attrs.get("State") or {}
                if state.get("Status") != "running":
                    self._reap(h.ref, uid, state.get("ExitCode"))
            except Exception as exc:
                if _not_found(exc):
                    self._reap(h.ref, uid, None)


def _build_error(exc: Exception) -> str:
    """The last lines of a failed build's log, when the SDK gives them."""
    lines = []
    for item in getattr(exc, "build_log", None) or ():
        if isinstance(item, dict) and (item.get("stream") or item.get("error")):
            lines.append(str(item.get("stream") or item.get("error")).strip())
    tail = " | ".join(x for x in lines[-5:] if x)
    return f"{exc} ({tail})" if tail else str(exc)


def _not_found(exc: Exception) -> bool:
    try:
        from docker.errors import ImageNotFound, NotFound
        if isinstance(exc, (NotFound, ImageNotFound)):
            return True
    except ImportError:
        pass
    return getattr(exc, "status_code", None) == 404 or "No such" in str(exc)
