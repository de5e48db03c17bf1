"""Declares the queues and exchanges of one cluster. Every declaration of an
object lives here so its arguments never disagree (RabbitMQ refuses a
redeclaration with other arguments).

The replication log is a stream with retention by size and by age
(STRATUS_LOG_MAX_BYTES, STRATUS_LOG_MAX_AGE, whole segments of
STRATUS_LOG_SEGMENT_BYTES are removed). A stream made before retention
existed, or with other limits, keeps its own arguments: RabbitMQ answers a
redeclaration with other arguments with 406 and closes the channel, so the
stream is declared on a short-lived channel of its own and, on 406, only
checked (passive) with a warning. Retention then applies to new clusters, or
is set on the old stream with a policy (docs/operations.md).

Several broker nodes (STRATUS_BROKER_NODES > 1, docs/cluster.md): the stream
is declared with x-initial-cluster-size = STRATUS_BROKER_NODES, so a replica
of the log lives on every node and a publisher confirm means a majority of
them hold the record; the request queues (read, write, master read, dead
letters, snapshots) are quorum queues replicated on every node, so that the
loss of any one node, the stream's leader among them, loses no request and
stops nothing for longer than an election. With one node nothing changes:
the stream has no x-initial-cluster-size and the request queues stay classic.
A queue that already exists with other arguments (made before the cluster had
several nodes) is used as it is, with a warning, as for the stream."""
from __future__ import annotations

import logging
import re

import pika

from .names import Names
from .settings import Settings, load

log = logging.getLogger("stratus.topology")

# An idle client's reply queue disappears after this long (x-expires). It is
# not exclusive, so a client that reconnects within this time finds the
# replies that arrived while it was away.
RESPONSE_QUEUE_EXPIRES_MS = 120_000

_AGE_RE = re.compile(r"^[0-9]+[YMDhms]$")   # RabbitMQ's x-max-age syntax
_warned: set[str] = set()                   # streams already warned about, in this process


READ, WRITE = "read", "write"   # routing keys on the request exchange
READ_PRIMARY = "read.primary"   # a read the master answers (readQ.master): never stale


def replicated_queue_arguments(settings: Settings) -> dict:
    """The arguments that make a request queue replicated on every broker
    node (a quorum queue), or none with one node."""
    if settings.broker_nodes <= 1:
        return {}
    return {"x-queue-type": "quorum", "x-quorum-initial-group-size": settings.broker_nodes}


def _declare_keeping(ch, queue: str, arguments: dict) -> None:
    """Declare a durable queue with `arguments`; one that exists with other
    arguments (406, which closes the channel it came on: a probe channel of
    its own) is checked and used as it is, with one warning per process."""
    if not arguments:
        ch.queue_declare(queue, durable=True)
        return
    probe = ch.connection.channel()
    try:
        probe.queue_declare(queue, durable=True, arguments=arguments)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 406:
            raise
        ch.queue_declare(queue, durable=True, passive=True)
        if queue not in _warned:
            _warned.add(queue)
            log.warning("the queue %s exists with other arguments (%s): it keeps them (not replicated on "
                        "every broker node; docs/cluster.md)", queue, exc.reply_text)
    else:
        probe.close()


def declare_work_queues(ch, names: Names, settings: Settings | None = None) -> None:
    replicated = replicated_queue_arguments(settings or load())
    ch.exchange_declare(names.dead_exchange, exchange_type="fanout", durable=True)
    _declare_keeping(ch, names.dead_queue, replicated)
    ch.queue_bind(names.dead_queue, names.dead_exchange)
    dlx = {"x-dead-letter-exchange": names.dead_exchange}
    for q in (names.read_queue, names.write_queue, names.master_read_queue):
        if replicated:
            _declare_keeping(ch, q, {**dlx, **replicated})
        else:
            ch.queue_declare(q, durable=True, arguments=dlx)
    # Clients publish requests here, never to the default exchange (through
    # which a routing key reaches any queue): a tenant's account may write to
    # this exchange and to nothing else of the cluster (bus/tenancy.py).
    ch.exchange_declare(names.request_exchange, exchange_type="direct", durable=True)
    ch.queue_bind(names.read_queue, names.request_exchange, routing_key=READ)
    ch.queue_bind(names.write_queue, names.request_exchange, routing_key=WRITE)
    ch.queue_bind(names.master_read_queue, names.request_exchange, routing_key=READ_PRIMARY)


def log_arguments(settings: Settings) -> dict:
    """The replication stream's arguments: its type, its retention, and with
    several broker nodes its replication (x-initial-cluster-size: a replica
    on every node)."""
    if not _AGE_RE.match(settings.log_max_age):
        raise ValueError(f"STRATUS_LOG_MAX_AGE {settings.log_max_age!r}: a number and one unit of Y M D h m s "
                         "(7D, 12h, 30m, 90s)")
    for name, value in (("STRATUS_LOG_MAX_BYTES", settings.log_max_bytes),
                        ("STRATUS_LOG_SEGMENT_BYTES", settings.log_segment_bytes)):
        if value <= 0:
            raise ValueError(f"{name} must be a positive number of bytes, got {value}")
    if settings.broker_nodes < 1:
        raise ValueError(f"STRATUS_BROKER_NODES must be at least 1, got {settings.broker_nodes}")
    args = {"x-queue-type": "stream", "x-max-length-bytes": settings.log_max_bytes,
            "x-max-age": settings.log_max_age, "x-stream-max-segment-size-bytes": settings.log_segment_bytes}
    if settings.broker_nodes > 1:
        args["x-initial-cluster-size"] = settings.broker_nodes
    return args


def declare_log(ch, names: Names, settings: Settings | None = None) -> None:
    """The log's fanout entry and its stream (a brand-new slave replays the
    retained part; what fell off is covered by a snapshot, worker/snapshot.py)."""
    args = log_arguments(settings or load())
    ch.exchange_declare(names.sync_exchange, exchange_type="fanout", durable=True)
    probe = ch.connection.channel()
    try:
        probe.queue_declare(names.log_stream, durable=True, arguments=args)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 406:
            raise
        ch.queue_declare(names.log_stream, durable=True, passive=True)   # it exists: use it as it is
        if names.log_stream not in _warned:
            _warned.add(names.log_stream)
            log.warning("the log stream %s exists with other arguments (%s): it keeps them; the retention "
                        "settings apply to new clusters, or set them on this stream with a policy "
                        "(docs/operations.md)", names.log_stream, exc.reply_text)
    else:
        probe.close()
    ch.queue_bind(names.log_stream, names.sync_exchange)


def declare_snapshot_queue(ch, names: Names, settings: Settings | None = None):
    """Snapshot requests; only ready members consume it (worker/snapshot.py).
    Returns the declare-ok frame (its consumer_count: members serving now)."""
    replicated = replicated_queue_arguments(settings or load())
    if replicated:
        _declare_keeping(ch, names.snapshot_queue, replicated)
    return ch.queue_declare(names.snapshot_queue, durable=True, passive=bool(replicated))


INVALIDATING_TENANTS = ("toystore",)   # tenants whose app publishes cache invalidations


def declare_invalidation(ch, names: Names) -> None:
    ch.exchange_declare(names.invalidate_exchange, exchange_type="fanout", durable=True)
    for tenant in INVALIDATING_TENANTS:
        ch.exchange_declare(names.invalidate_exchange_of(tenant), exchange_type="fanout", durable=True)


def declare_all(ch, names: Names, settings: Settings | None = None) -> None:
    """Every object of a cluster; `settings` gives the log's retention
    (default: read from the environment now)."""
    settings = settings or load()
    declare_work_queues(ch, names, settings)
    declare_log(ch, names, settings)
    declare_snapshot_queue(ch, names, settings)
    declare_invalidation(ch, names)


def declare_response_queue(ch, names: Names, client_id: str) -> str:
    q = names.response_queue(client_id)
    ch.queue_declare(q, durable=False, auto_delete=False, arguments={"x-expires": RESPONSE_QUEUE_EXPIRES_MS})
    return q


# A task's deliveries, counted by the broker (quorum queue, x-delivery-count):
# past this many returns (a worker that died or gave it back) the broker
# dead-letters it, so no task is retried forever (bus/tasks.py).
TASK_DELIVERY_LIMIT = 10


def declare_task_queues(ch, names: Names, tenant: str, app: str, role: str) -> tuple[str, str]:
    """One worker role's task queue and dead-letter queue, bound to the
    tenant's own task exchange under their own names. Returns (queue, dead)."""
    x = names.task_exchange(tenant)
    q, dead = names.task_queue(tenant, app, role), names.task_dead_queue(tenant, app, role)
    ch.exchange_declare(x, exchange_type="direct", durable=True)
    ch.queue_declare(dead, durable=True)
    ch.queue_bind(dead, x, routing_key=dead)
    ch.queue_declare(q, durable=True, arguments={
        "x-queue-type": "quorum", "x-delivery-limit": TASK_DELIVERY_LIMIT,
        "x-dead-letter-exchange": x, "x-dead-letter-routing-key": dead})
    ch.queue_bind(q, x, routing_key=q)
    return q, dead


def delete_task_queues(ch, names: Names, tenant: str, app: str, role: str) -> None:
    """Remove one role's task queues (its tenant's exchange stays)."""
    ch.queue_delete(names.task_queue(tenant, app, role))
    ch.queue_delete(names.task_dead_queue(tenant, app, role))


def _task_objects(names: Names) -> tuple[list[str], list[str]]:
    """The cluster's task queues and exchanges, listed by the management API
    (their names hold tenants, apps and roles that no AMQP call can list);
    nothing when that API cannot be reached."""
    from .broker_admin import BrokerAdmin, BrokerAdminError
    admin = BrokerAdmin(load(), timeout=5)
    found = []
    for kind in ("queues", "exchanges"):
        try:
            found.append(admin.names(kind, names.task_prefix))
        except BrokerAdminError:
            found.append([])
    return found[0], found[1]


def delete_cluster(ch, names: Names) -> None:
    """Remove a cluster's objects (tests clean up what they made)."""
    queues, exchanges = _task_objects(names)
    for q in queues:
        ch.queue_delete(q)
    for x in exchanges:
        ch.exchange_delete(x)
    for q in (names.read_queue, names.write_queue, names.master_read_queue, names.log_stream, names.dead_queue,
              names.snapshot_queue):
        ch.queue_delete(q)
    for x in (names.sync_exchange, names.dead_exchange, names.invalidate_exchange, names.request_exchange,
              *(names.invalidate_exchange_of(t) for t in INVALIDATING_TENANTS)):
        ch.exchange_delete(x)
