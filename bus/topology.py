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
is set on the old stream with a policy (docs/operations.md)."""
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


def declare_work_queues(ch, names: Names) -> None:
    ch.exchange_declare(names.dead_exchange, exchange_type="fanout", durable=True)
    ch.queue_declare(names.dead_queue, durable=True)
    ch.queue_bind(names.dead_queue, names.dead_exchange)
    dlx = {"x-dead-letter-exchange": names.dead_exchange}
    for q in (names.read_queue, names.write_queue, names.master_read_queue):
        ch.queue_declare(q, durable=True, arguments=dlx)
    # Clients publish requests here, never to the default exchange (through
    # which a routing key reaches any queue): a tenant's account may write to
    # this exchange and to nothing else of the cluster (bus/tenancy.py).
    ch.exchange_declare(names.request_exchange, exchange_type="direct", durable=True)
    ch.queue_bind(names.read_queue, names.request_exchange, routing_key=READ)
    ch.queue_bind(names.write_queue, names.request_exchange, routing_key=WRITE)


def log_arguments(settings: Settings) -> dict:
    """The replication stream's arguments: its type and its retention."""
    if not _AGE_RE.match(settings.log_max_age):
        raise ValueError(f"STRATUS_LOG_MAX_AGE {settings.log_max_age!r}: a number and one unit of Y M D h m s "
                         "(7D, 12h, 30m, 90s)")
    for name, value in (("STRATUS_LOG_MAX_BYTES", settings.log_max_bytes),
                        ("STRATUS_LOG_SEGMENT_BYTES", settings.log_segment_bytes)):
        if value <= 0:
            raise ValueError(f"{name} must be a positive number of bytes, got {value}")
    return {"x-queue-type": "stream", "x-max-length-bytes": settings.log_max_bytes,
            "x-max-age": settings.log_max_age, "x-stream-max-segment-size-bytes": settings.log_segment_bytes}


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


def declare_snapshot_queue(ch, names: Names):
    """Snapshot requests; only ready members consume it (worker/snapshot.py).
    Returns the declare-ok frame (its consumer_count: members serving now)."""
    return ch.queue_declare(names.snapshot_queue, durable=True)


INVALIDATING_TENANTS = ("toystore",)   # tenants whose app publishes cache invalidations


def declare_invalidation(ch, names: Names) -> None:
    ch.exchange_declare(names.invalidate_exchange, exchange_type="fanout", durable=True)
    for tenant in INVALIDATING_TENANTS:
        ch.exchange_declare(names.invalidate_exchange_of(tenant), exchange_type="fanout", durable=True)


def declare_all(ch, names: Names, settings: Settings | None = None) -> None:
    """Every object of a cluster; `settings` gives the log's retention
    (default: read from the environment now)."""
    declare_work_queues(ch, names)
    declare_log(ch, names, settings)
    declare_snapshot_queue(ch, names)
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
