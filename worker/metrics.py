"""A DB worker's Prometheus metrics: its own small HTTP server
(prometheus_client's start_http_server, any path answers the text format),
separate from the bus, started before the worker joins the cluster.

Where: STRATUS_WORKER_METRICS_HOST (default STRATUS_BIND_HOST) and
STRATUS_WORKER_METRICS_PORT (default 0: any free port; a negative value: no
metrics server). The address others reach it at (STRATUS_ADVERTISE_HOST, else
the bound host, else the host's name for a wildcard bind) and the bound port
go into the worker's membership record as metrics_host and metrics_port
(bus/cluster.py), where the orchestrator's Prometheus discovery finds them.
A port that cannot be bound is logged and the worker runs without metrics.

Series (read from the worker's state when scraped; the target's labels add
cluster, component="worker" and worker=<id>):
  stratus_worker_reads_total                reads answered (slave, or master serving reads)
  stratus_worker_writes_total{outcome}      a master's writes: applied, duplicate (answered
                                            again from the remembered result), refused
  stratus_worker_log_entries_applied_total  log entries a slave applied from the stream
  stratus_worker_write_batches_total        a master's group commits appended to the log
  stratus_worker_applied_lsn                the last LSN applied
  stratus_worker_term                       a slave's highest barrier term; a master's own
  stratus_worker_replication_lag            log entries behind the master (0 on the master;
                                            absent while no master is known), the
                                            master's applied LSN read from ZooKeeper
  stratus_worker_log_backlog                log deliveries received, not applied yet
  stratus_worker_parked_reads               reads waiting for their min_lsn
  stratus_worker_ready                      1 once caught up (serving reads)
  stratus_worker_info{role,state}           1
plus the process's figures (bus/metrics.py)."""
from __future__ import annotations

import logging
import socket

from prometheus_client import start_http_server
from prometheus_client.metrics_core import Metric

from bus import metrics as bmetrics
from bus.cluster import Member, Role
from bus.settings import Settings, env_int, env_str
from bus.zk import get_json

log = logging.getLogger("stratus.worker.metrics")

_WILDCARD = ("0.0.0.0", "::", "")


def _family(name: str, kind: str, help_: str, samples) -> Metric:
    m = Metric(name, help_, kind)
    for labels, value in samples:
        m.add_sample(name + ("_total" if kind == "counter" else ""), labels, float(value))
    return m


class WorkerCollector:
    """Reads a worker.node.Worker (plain attributes, written by its main
    thread; reading them from the scrape thread is safe under the GIL)."""

    def __init__(self, worker):
        self.w = worker

    def describe(self):
        return []

    def lag(self) -> int | None:
        w = self.w
        if w.role is Role.MASTER:
            return 0
        leader = w.leader.id
        if not leader or w.zk is None:
            return None
        try:
            master = Member.from_dict(get_json(w.zk, w.paths.worker(leader)), leader)
        except Exception:
            return None
        if master.role is not Role.MASTER:
            return None
        return max(0, master.applied_lsn - w.store.applied_lsn)

    def collect(self):
        w = self.w
        yield _family("stratus_worker_reads", "counter", "Reads this worker answered.", [({}, w.reads_served)])
        yield _family("stratus_worker_writes", "counter", "Writes this worker handled as master, by outcome.",
                      [({"outcome": k}, v) for k, v in sorted(w.write_counts.items())])
        yield _family("stratus_worker_log_entries_applied", "counter", "Log entries applied from the stream.",
                      [({}, w.log_entries_applied)])
        yield _family("stratus_worker_write_batches", "counter", "Group commits appended to the log as master.",
                      [({}, w.write_batches)])
        yield _family("stratus_worker_applied_lsn", "gauge", "The last LSN this worker applied.",
                      [({}, w.store.applied_lsn)])
        yield _family("stratus_worker_term", "gauge", "A slave's highest barrier term; a master's own term.",
                      [({}, w.current_term if w.role is Role.SLAVE else w.store.term)])
        lag = self.lag()
        yield _family("stratus_worker_replication_lag", "gauge", "Log entries this worker is behind the master.",
                      [] if lag is None else [({}, lag)])
        yield _family("stratus_worker_log_backlog", "gauge", "Log deliveries received and not applied yet.",
                      [({}, len(w.log_backlog))])
        yield _family("stratus_worker_parked_reads", "gauge", "Reads waiting for the LSN they asked for.",
                      [({}, len(w.parked))])
        yield _family("stratus_worker_ready", "gauge", "1 when caught up with the log.", [({}, 1 if w.ready else 0)])
        yield _family("stratus_worker_info", "gauge", "The worker's role and state.",
                      [({"role": w.role.value, "state": w.state.value}, 1)])


def advertised(settings: Settings, host: str) -> str:
    if settings.advertise_host:
        return settings.advertise_host
    if host not in _WILDCARD:
        return host
    return socket.gethostname()


def serve(worker, settings: Settings):
    """Start the metrics server of `worker`; sets worker.metrics_addr to
    (advertised host, port). Returns the server (call stop(server) at the
    end), or None when metrics are off or the port cannot be bound."""
    port = env_int("STRATUS_WORKER_METRICS_PORT", 0)
    if port < 0:
        return None
    host = env_str("STRATUS_WORKER_METRICS_HOST", settings.bind_host)
    reg = bmetrics.registry()
    reg.register(WorkerCollector(worker))
    try:
        httpd, _ = start_http_server(port, addr=host, registry=reg)
    except OSError as exc:
        log.warning("no metrics: %s:%d cannot be bound (%s)", host, port, exc)
        return None
    bound = httpd.server_address[1]
    worker.metrics_addr = (advertised(settings, host), bound)
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return httpd


def stop(httpd) -> None:
    if httpd is None:
        return
    try:
        httpd.shutdown()
        httpd.server_close()
    except Exception:
        pass
