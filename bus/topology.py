"""Declares the queues and exchanges of one cluster. Every declaration of an
object lives here so its arguments never disagree (RabbitMQ refuses a
redeclaration with other arguments)."""
from __future__ import annotations

from .names import Names

# An idle client's reply queue disappears after this long (x-expires). It is
# not exclusive, so a client that reconnects within this time finds the
# replies that arrived while it was away.
RESPONSE_QUEUE_EXPIRES_MS = 120_000


def declare_work_queues(ch, names: Names) -> None:
    ch.exchange_declare(names.dead_exchange, exchange_type="fanout", durable=True)
    ch.queue_declare(names.dead_queue, durable=True)
    ch.queue_bind(names.dead_queue, names.dead_exchange)
    dlx = {"x-dead-letter-exchange": names.dead_exchange}
    for q in (names.read_queue, names.write_queue, names.master_read_queue):
        ch.queue_declare(q, durable=True, arguments=dlx)


def declare_log(ch, names: Names) -> None:
    ch.exchange_declare(names.sync_exchange, exchange_type="fanout", durable=True)
    # A stream keeps every record, so a brand-new slave can replay from the first.
    ch.queue_declare(names.log_stream, durable=True, arguments={"x-queue-type": "stream"})
    ch.queue_bind(names.log_stream, names.sync_exchange)


def declare_invalidation(ch, names: Names) -> None:
    ch.exchange_declare(names.invalidate_exchange, exchange_type="fanout", durable=True)


def declare_all(ch, names: Names) -> None:
    declare_work_queues(ch, names)
    declare_log(ch, names)
    declare_invalidation(ch, names)


def declare_response_queue(ch, names: Names, client_id: str) -> str:
    q = names.response_queue(client_id)
    ch.queue_declare(q, durable=False, auto_delete=False, arguments={"x-expires": RESPONSE_QUEUE_EXPIRES_MS})
    return q


def delete_cluster(ch, names: Names) -> None:
    """Remove a cluster's objects (tests clean up what they made)."""
    for q in (names.read_queue, names.write_queue, names.master_read_queue, names.log_stream, names.dead_queue):
        ch.queue_delete(q)
    for x in (names.sync_exchange, names.dead_exchange, names.invalidate_exchange):
        ch.exchange_delete(x)
