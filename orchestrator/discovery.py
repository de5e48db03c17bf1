"""Prometheus file service discovery, written by the leading orchestrator.

The file: <settings.prometheus_sd_dir, else $STRATUS_STATE_DIR/prometheus/targets>/<cluster>.json,
read by Prometheus's file_sd_configs (etc/prometheus.yml: targets/*.json).
It is a JSON list of target groups, sorted, one group per label set:

    [{"targets": ["127.0.0.1:8080"], "labels": {"cluster": "default", "component": "gateway"}},
     {"targets": ["127.0.0.1:8081"], "labels": {"cluster": "default", "component": "orchestrator"}},
     {"targets": ["127.0.0.1:41733"], "labels": {"cluster": "default", "component": "worker", "worker": "w-1a2b3c4d"}},
     {"targets": ["127.0.0.1:8082"], "labels": {"cluster": "default", "component": "app",
                                                "tenant": "rideshare", "app": "rideshare", "role": "users"}},
     ...]

Where the targets come from (ZooKeeper, read every DISCOVER_EVERY seconds):
  gateway, dashboard, orchestrator   the registry services of those names (the
                                     orchestrator registers only while it leads:
                                     standbys are not scraped); their /metrics is
                                     known to exist
  worker                             every worker membership record with a
                                     metrics_port (bus/cluster.py), one group each
  app                                the registry services app.<tenant>.<app>.<role>:
                                     the web instances of tenants' apps, one group
                                     per role
  service                            any other registry service (a service started
                                     outside the platform, e.g. `python -m users`),
                                     label service=<name>
An app or other service instance is listed only once GET /metrics on it has
answered 200 with the Prometheus text's content type (text/plain or
OpenMetrics; probed once per instance, PROBE_TIMEOUT; an instance that
answers anything else is never scraped, one that cannot be reached is probed
again after PROBE_RETRY): a tenant's app that serves no /metrics is not
scraped every 5 s for nothing, nor its log filled with 404s.

Every target is labelled cluster=<cluster> and component=<kind> (Prometheus
copies component into job, etc/prometheus.yml), and the labels above where
they apply. The file is written atomically (a temporary file renamed over
it) and only when its content changes (the file on disk is compared, so a
file removed by someone else is written again). On a clean stop of the
orchestrator the file is removed; on a mere loss of leadership it is left for
the next leader, which rewrites it. `running(controller)` wraps the leader's
control loop (orchestrator/control.py).

Housekeeping: several clusters may share the directory (tests do). When it
starts leading, and every PRUNE_EVERY seconds, the writer removes the file
of any cluster whose ZooKeeper root (/stratus/<cluster>) no longer exists: a
cluster deleted without a clean stop leaves no targets behind."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from kazoo.exceptions import NoNodeError

from bus import zk as bzk
from bus.cluster import Member, workers
from bus.names import Paths
from bus.settings import Settings

log = logging.getLogger("stratus.orchestrator.discovery")

DISCOVER_EVERY = 2.0     # seconds between two reads of the registry
PROBE_TIMEOUT = 1.0      # seconds for GET /metrics on an app instance
PROBE_RETRY = 10.0       # seconds before an unreachable instance is probed again
PRUNE_EVERY = 60.0       # seconds between two looks for files of clusters that are gone
KNOWN = {"gateway": "gateway", "dashboard": "dashboard", "orchestrator": "orchestrator"}
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # never through a proxy


def sd_dir(settings: Settings) -> Path:
    return Path(settings.prometheus_sd_dir) if settings.prometheus_sd_dir else \
        settings.state_path / "prometheus" / "targets"


def sd_file(settings: Settings) -> Path:
    return sd_dir(settings) / f"{settings.cluster}.json"


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port(v) -> int | None:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 65536:
        return None
    return v


def target_groups(cluster: str, services: dict[str, dict[str, dict]], members: dict[str, Member],
                  has_metrics: Callable[[str, str, dict], bool] = lambda *_: True) -> list[dict]:
    """The file's content (pure). services: {registry service: {instance id:
    its record}}; members: the workers' membership records; has_metrics(service,
    instance id, record): whether an app's or other service's instance serves
    /metrics (the platform's own components are not asked)."""
    groups: dict[tuple, set[str]] = {}

    def add(labels: dict, host, port) -> None:
        port = _port(port)
        if not isinstance(host, str) or not host or port is None:
            return
        key = tuple(sorted({"cluster": cluster, **labels}.items()))
        groups.setdefault(key, set()).add(address(host, port))

    for name, instances in services.items():
        for iid, rec in instances.items():
            if not isinstance(rec, dict):
                continue
            if name in KNOWN:
                add({"component": KNOWN[name]}, rec.get("host"), rec.get("port"))
                continue
            parts = name.split(".")
            if len(parts) == 4 and parts[0] == "app":
                labels = {"component": "app", "tenant": parts[1], "app": parts[2], "role": parts[3]}
            else:
                labels = {"component": "service", "service": name}
            if has_metrics(name, iid, rec):
                add(labels, rec.get("host"), rec.get("port"))
    for wid, m in members.items():
        if m.metrics_port is not None:
            add({"component": "worker", "worker": m.id or wid}, m.metrics_host or m.host, m.metrics_port)
    out = [{"targets": sorted(targets), "labels": dict(key)} for key, targets in groups.items()]
    out.sort(key=lambda g: (g["labels"]["component"], sorted(g["labels"].items())))
    return out


def render(groups: list[dict]) -> str:
    return json.dumps(groups, indent=1, sort_keys=True) + "\n"


def write_if_changed(path: Path, text: str) -> bool:
    """Write `text` to `path` atomically unless the file already holds it."""
    try:
        if path.read_text() == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True


class Prober:
    """Remembers which app and service instances serve /metrics."""

    def __init__(self, timeout: float = PROBE_TIMEOUT, retry: float = PROBE_RETRY):
        self.timeout, self.retry = timeout, retry
        self.known: dict[tuple, bool] = {}          # (service, id, host, port) -> serves /metrics
        self.unreachable: dict[tuple, float] = {}   # -> when to probe again (monotonic)

    def __call__(self, service: str, iid: str, rec: dict) -> bool:
        host, port = rec.get("host"), _port(rec.get("port"))
        if not isinstance(host, str) or port is None:
            return False
        key = (service, iid, host, port)
        if key in self.known:
            return self.known[key]
        if self.unreachable.get(key, 0.0) > time.monotonic():
            return False
        try:
            with _OPENER.open(f"http://{address(host, port)}/metrics", timeout=self.timeout) as r:
                kind = r.headers.get("Content-Type", "")
                ok = r.status == 200 and kind.startswith(("text/plain", "application/openmetrics-text"))
        except urllib.error.HTTPError:
            ok = False   # it answered: no /metrics there
        except (OSError, ValueError):
            self.unreachable[key] = time.monotonic() + self.retry
            return False
        self.known[key] = ok
        self.unreachable.pop(key, None)
        log.info("%s instance %s at %s: %s", service, iid, address(host, port),
                 "serves /metrics: scraped" if ok else "serves no /metrics: not scraped")
        return ok

    def forget_except(self, present: set[tuple]) -> None:
        for key in [k for k in self.known if k not in present]:
            del self.known[key]
        for key in [k for k in self.unreachable if k not in present]:
            del self.unreachable[key]


def read_registry(zk, paths: Paths) -> dict[str, dict[str, dict]]:
    out = {}
    try:
        names = zk.get_children(paths.services)
    except NoNodeError:
        return out
    for name in names:
        out[name] = bzk.children_json(zk, paths.service(name))
    return out


class Discovery:
    """The writer thread of one leadership."""

    def __init__(self, settings: Settings, zk, *, every: float = DISCOVER_EVERY, prober: Prober | None = None):
        self.settings = settings
        self.zk = zk
        self.paths = Paths(settings.cluster)
        self.path = sd_file(settings)
        self.every = every
        self.prober = prober or Prober()
        self.stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def once(self) -> bool:
        """One read of ZooKeeper and, if the targets changed, one write."""
        services = read_registry(self.zk, self.paths)
        members = workers(self.zk, self.paths)
        groups = target_groups(self.settings.cluster, services, members, self.prober)
        self.prober.forget_except({(s, i, r.get("host"), r.get("port")) for s, insts in services.items()
                                   for i, r in insts.items() if isinstance(r, dict)})
        changed = write_if_changed(self.path, render(groups))
        if changed:
            log.info("Prometheus targets written to %s: %d target(s) in %d group(s)", self.path,
                     sum(len(g["targets"]) for g in groups), len(groups))
        return changed

    def prune(self) -> list[str]:
        """Remove the files of clusters that have no ZooKeeper root any more."""
        removed = []
        try:
            files = sorted(self.path.parent.glob("*.json"))
        except OSError:
            return removed
        for f in files:
            name = f.name[:-len(".json")]
            if name == self.settings.cluster:
                continue
            try:
                if self.zk.exists(Paths(name).root) is None:
                    f.unlink()
                    removed.append(name)
            except ValueError:   # not a cluster's name: not ours to touch
                continue
            except FileNotFoundError:
                continue
        if removed:
            log.info("removed the Prometheus targets of clusters that are gone: %s", ", ".join(removed))
        return removed

    def _run(self) -> None:
        next_prune = 0.0
        while not self.stopped.is_set():
            try:
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + PRUNE_EVERY
                    self.prune()
                self.once()
                if self._failing:
                    log.info("Prometheus discovery works again")
                self._failing = False
            except Exception as exc:
                if not self._failing:
                    log.warning("Prometheus discovery: %r (retrying)", exc)
                self._failing = True
            self.stopped.wait(self.every)

    def start(self) -> "Discovery":
        self._thread = threading.Thread(target=self._run, name="prometheus-discovery", daemon=True)
        self._thread.start()
        return self

    def stop(self, *, remove: bool) -> None:
        self.stopped.set()
        if self._thread is not None:
            self._thread.join(PROBE_TIMEOUT * 5 + 5)
        if remove:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
                log.info("Prometheus targets file %s removed", self.path)


@contextlib.contextmanager
def running(controller):
    """While the block runs (the leader's control loop), keep the targets
    file current; on leaving it, stop, and remove the file if the
    orchestrator is stopping cleanly (controller.stopping is set)."""
    d = Discovery(controller.settings, controller.zk).start()
    try:
        yield d
    finally:
        d.stop(remove=controller.stopping.is_set())
