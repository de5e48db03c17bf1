"""Tasks: a web role hands a task to a worker role of its app (paas.md, Tasks).

Objects (bus/names.py, declared in bus/topology.py by whoever uses them first):

    tasks.<tenant>                     the tenant's own direct exchange
    tasks.<tenant>.<app>.<role>        the role's task queue: a durable quorum
                                       queue, bound under its own name
    tasks.<tenant>.<app>.<role>.dead   its dead-letter queue (durable)

Why a per-tenant exchange: RabbitMQ cannot limit the routing keys a user
publishes with on a direct exchange, and through the default exchange a
routing key reaches any queue. A tenant's account (bus/tenancy.permissions)
may configure, write and read only names under `tasks.<tenant>`, so it can
publish only to its own exchange, bind to it only its own queues (a bind
needs write on the queue), and consume only its own queues: tenant A can
neither hand a task to B's workers, nor take B's tasks, nor read B's dead
letters (the broker answers 403 and closes the channel).

A task is one persistent message, body JSON:

    {"v": 1, "id": "<task id>", "payload": {...}, "submitted": <unix time>}

with the AMQP `user_id` of the submitting tenant (validated by the broker)
and `message_id` = the task id. `submit` publishes with publisher confirms and
mandatory routing: it returns only once the broker has the task (on disk),
and raises Unavailable when it could not hand it over in time.

Delivery is at least once. A worker acks a task after its handler returned.
A handler that raises: the task goes back to the queue (nack, requeue) and
the broker counts the delivery (`x-delivery-count`); at the `max_attempts`-th
failure (default 5) the worker publishes the task to the dead-letter queue
with the error (headers `x-stratus-error`, `x-stratus-attempts`), confirmed,
and only then acks it. A worker that dies mid-task (connection lost before
the ack): the broker gives the task to another worker, and counts that too;
past TASK_DELIVERY_LIMIT returns the broker itself dead-letters it (quorum
queue `x-delivery-limit`), so not even a task that kills every worker is
retried forever. Handlers must be idempotent: a task may run more than once.

Threads: pika is not thread-safe. A TaskQueue's submitting connection is used
under a lock, by one thread at a time; `consume` opens its own connection and
runs in the calling thread (one connection per consumer thread), with the
handler on a helper thread so that heartbeats go on during a long task.
Every wait is bounded; connections are reopened when they drop."""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import pika

from . import tenancy
from .client import connection_params
from .errors import BadRequest, Forbidden, Unavailable
from .names import Names
from .settings import Settings, load
from .topology import TASK_DELIVERY_LIMIT, declare_task_queues

log = logging.getLogger("stratus.tasks")

MAX_ATTEMPTS = 5
ERROR_HEADER, ATTEMPTS_HEADER = "x-stratus-error", "x-stratus-attempts"
MAX_ERROR_CHARS = 2000


@dataclass
class Task:
    id: str
    payload: dict
    attempt: int = 1            # 1 for the first delivery, 2 for the first retry...
    submitted: float = 0.0
    submitted_by: str | None = None   # the broker-validated user_id
    error: str | None = None    # only on a dead letter: the last error
    headers: dict = field(default_factory=dict, repr=False)


def encode(task_id: str, payload: dict) -> bytes:
    if not isinstance(payload, dict):
        raise BadRequest("a task's payload is a JSON object")
    try:
        return json.dumps({"v": 1, "id": task_id, "payload": payload, "submitted": time.time()},
                          separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"a task's payload must be JSON: {exc}") from None


def decode(body: bytes, props=None, attempt: int = 1) -> Task:
    """A delivered task; BadRequest for a body that is not one."""
    try:
        d = json.loads(body)
        ok = isinstance(d, dict) and d.get("v") == 1 and isinstance(d.get("id"), str) \
            and isinstance(d.get("payload"), dict)
    except (ValueError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise BadRequest("not a task: expected {\"v\": 1, \"id\": str, \"payload\": {...}}")
    headers = dict(getattr(props, "headers", None) or {})
    err = headers.get(ERROR_HEADER)
    if err is None and headers.get("x-death"):   # dead-lettered by the broker itself
        err = "delivery limit reached: the task's workers died or gave it back"
    return Task(id=d["id"], payload=d["payload"], attempt=attempt, submitted=float(d.get("submitted") or 0),
                submitted_by=getattr(props, "user_id", None),
                error=err.decode() if isinstance(err, bytes) else err, headers=headers)


def attempt_of(props) -> int:
    """This delivery's number: 1 + the broker's count of earlier deliveries."""
    n = (getattr(props, "headers", None) or {}).get("x-delivery-count") or 0
    return 1 + int(n)


def should_dead_letter(attempt: int, max_attempts: int) -> bool:
    return attempt >= max_attempts


class TaskQueue:
    """The task queue of one worker role: `submit` from a web role, `consume`
    in the worker role. With a tenant's own credentials (STRATUS_AMQP_URL)
    it acts for that tenant only; with the platform's it names the tenant."""

    def __init__(self, settings: Settings | None, tenant: str | None, app: str, role: str, *,
                 max_attempts: int = MAX_ATTEMPTS, timeout: float = 10.0):
        self.settings = settings or load()
        tenant = tenant or self.settings.tenant   # an app instance's own (STRATUS_TENANT)
        self.names = Names(self.settings.cluster)
        if not 1 <= max_attempts <= TASK_DELIVERY_LIMIT:
            raise ValueError(f"max_attempts must be 1..{TASK_DELIVERY_LIMIT}")
        account = tenancy.platform_user(self.settings.amqp_url)
        own = tenancy.tenant_of(account, cluster=self.settings.cluster, platform="")
        if own is not None and own != tenant:
            raise ValueError(f"credentials of {own} act for {own} only, not {tenant}")
        self.tenant, self.app, self.role = tenant, app, role
        self.user_id = tenancy.broker_user(self.settings.cluster, tenant)
        self.exchange = self.names.task_exchange(tenant)
        self.queue = self.names.task_queue(tenant, app, role)
        self.dead_queue = self.names.task_dead_queue(tenant, app, role)
        self.max_attempts = max_attempts
        self.timeout = timeout
        self._lock = threading.Lock()
        self._conn = None
        self._ch = None

    # --- connections -------------------------------------------------------
    def _open(self):
        conn = pika.BlockingConnection(connection_params(self.settings.amqp_url, heartbeat=15))
        try:
            ch = conn.channel()
            declare_task_queues(ch, self.names, self.tenant, self.app, self.role)
            ch.confirm_delivery()
        except Exception:
            _close(conn)
            raise
        return conn, ch

    def _channel(self):
        if self._ch is None or not self._ch.is_open:
            _close(self._conn)
            self._conn = self._ch = None
            self._conn, self._ch = self._open()
        return self._ch

    def close(self) -> None:
        with self._lock:
            _close(self._conn)
            self._conn = self._ch = None

    # --- submitting ----------------------------------------------------------
    def submit(self, payload: dict, *, task_id: str | None = None) -> str:
        """Hand a task to the role; returns its id once the broker has it.
        Unavailable: it was not taken (safe to submit again with the same id);
        Forbidden: this account may not use the queue (403)."""
        task_id = task_id or uuid.uuid4().hex
        body = encode(task_id, payload)
        props = pika.BasicProperties(delivery_mode=2, content_type="application/json", message_id=task_id,
                                     user_id=self.user_id)
        deadline = time.monotonic() + self.timeout
        last = None
        with self._lock:
            while True:
                try:
                    self._channel().basic_publish(self.exchange, self.queue, body, props, mandatory=True)
                    return task_id
                except pika.exceptions.ChannelClosedByBroker as exc:
                    if exc.reply_code == 403:
                        raise Forbidden(f"the broker refused the task: {exc.reply_text}") from None
                    last = exc
                except (pika.exceptions.AMQPError, OSError) as exc:
                    last = exc
                _close(self._conn)
                self._conn = self._ch = None
                if time.monotonic() + 0.5 > deadline:
                    raise Unavailable(f"the task was not taken by the bus ({last!r}); it may be submitted again")
                time.sleep(0.5)

    # --- consuming -----------------------------------------------------------
    def consume(self, handler: Callable[[Task], None], *, prefetch: int = 1,
                stop: threading.Event | None = None) -> None:
        """Run `handler(task)` for each task until `stop` is set, on a
        connection of this thread's own, reconnecting when it drops."""
        stop = stop or threading.Event()
        backoff = 0.2
        while not stop.is_set():
            conn = None
            try:
                conn, ch = self._open()
                ch.basic_qos(prefetch_count=prefetch)
                backoff = 0.2
                for method, props, body in ch.consume(self.queue, inactivity_timeout=0.5):
                    if stop.is_set():
                        break
                    if method is not None:
                        self._deliver(conn, ch, method, props, body, handler)
            except Exception as exc:
                if not stop.is_set():
                    log.warning("task consumer on %s: %s; reconnecting", self.queue, exc)
                    stop.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
            finally:
                _close(conn)

    def _deliver(self, conn, ch, method, props, body, handler) -> None:
        attempt = attempt_of(props)
        try:
            task = decode(body, props, attempt)
        except BadRequest as exc:   # never runnable: straight to the dead letters
            self._dead_letter(ch, body, props, str(exc), attempt)
            ch.basic_ack(method.delivery_tag)
            return
        outcome: dict = {}

        def run():
            try:
                handler(task)
            except BaseException as exc:   # noqa: BLE001 - the handler's failure is the task's
                outcome["error"] = f"{type(exc).__name__}: {exc}"
            finally:
                outcome["done"] = True

        t = threading.Thread(target=run, name=f"task-{task.id[:8]}", daemon=True)
        t.start()
        while t.is_alive():   # heartbeats go on while the handler runs
            conn.process_data_events(time_limit=0.2)
            t.join(0.05)
        error = outcome.get("error")
        if error is None:
            ch.basic_ack(method.delivery_tag)
        elif should_dead_letter(attempt, self.max_attempts):
            log.warning("task %s failed %d times, dead-lettered: %s", task.id, attempt, error)
            self._dead_letter(ch, body, props, error, attempt)
            ch.basic_ack(method.delivery_tag)
        else:
            log.info("task %s failed (attempt %d of %d): %s", task.id, attempt, self.max_attempts, error)
            ch.basic_nack(method.delivery_tag, requeue=True)

    def _dead_letter(self, ch, body, props, error: str, attempt: int) -> None:
        headers = {ERROR_HEADER: error[:MAX_ERROR_CHARS], ATTEMPTS_HEADER: attempt}
        ch.basic_publish(self.exchange, self.dead_queue, body, pika.BasicProperties(
            delivery_mode=2, content_type="application/json", message_id=getattr(props, "message_id", None),
            user_id=self.user_id, headers=headers), mandatory=True)   # confirmed: the channel confirms

    # --- dead letters --------------------------------------------------------
    def dead_letters(self, limit: int = 100) -> list[Task]:
        """The dead-lettered tasks, oldest first, left in their queue."""
        with self._lock:
            conn, ch = self._open()
            try:
                out = []
                deadline = time.monotonic() + self.timeout
                while len(out) < limit and time.monotonic() < deadline:
                    method, props, body = ch.basic_get(self.dead_queue, auto_ack=False)
                    if method is None:
                        break
                    try:
                        out.append(decode(body, props, int((props.headers or {}).get(ATTEMPTS_HEADER) or 0)))
                    except BadRequest as exc:
                        out.append(Task(id=str(props.message_id), payload={}, error=str(exc)))
                return out
            finally:
                _close(conn)   # unacked: every one stays in the queue


def _close(conn) -> None:
    if conn is not None:
        try:
            if conn.is_open:
                conn.close()
        except Exception:
            pass
