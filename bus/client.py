"""The DB client: read, write and clear over the bus, from any thread.

One AMQP connection per client, owned by one I/O thread (pika connections are
not thread-safe). Callers hand their publishes to that thread and wait on a
future for the reply, which arrives on the client's own responseQ. The
connection stays open and reconnects on its own; no request opens one.

Broker nodes: STRATUS_AMQP_URL may list several nodes of one RabbitMQ
cluster, comma-separated (bus/brokers.py). connection_params turns them into
the list pika tries in turn, so a client whose node dies reconnects to
another: the DB client, the workers, the snapshot transfers, the tasks and the
gateway's cache feed all connect through it. The reply queue lives on the node
the client is connected to; when that node dies, requests in flight get
Timeout at once (below) and re-sending a write with its id is safe.
With several nodes the request queues are quorum queues (bus/topology.py),
and a publish made while a queue elects its leader can vanish: the channel
sends it to the dead leader and, unconfirmed, never learns it (nor do the
channel's later publishes to that queue get in). So with several nodes the
client publishes requests on a channel of their own in confirm mode: a
request not confirmed within CONFIRM_TIMEOUT, or refused (nack), is published
again on a fresh channel (the same request id and correlation id: a worker
answers a write it has seen once more without applying it again, and the
second answer to one correlation id is dropped). After a reconnect with the
reply queue intact, the unconfirmed requests are published again likewise.

Identity: every request carries the AMQP `user_id` of the tenant it acts for
(bus/tenancy.py), and the broker validates it against the connection's
account. A client made with a tenant's own credentials (an app instance: its
STRATUS_AMQP_URL names the tenant's account) acts for that tenant only; a
platform component connects with the platform's account, which may name any
tenant (`tenant=` on a request) because it has the broker's impersonator tag.
Requests go to the cluster's request exchange (routing keys "read",
"read.primary" and "write"), the one exchange of the cluster a tenant's
account may write to.

Errors: Unavailable (503) means the request was never sent; Timeout (504)
means it was sent and no reply came in time, or the broker restarted before
the reply came (the reply queue is not durable, so the client says so as soon
as it reconnects): a write may still happen, and re-sending it with the same
request id is safe (workers deduplicate by id)."""
from __future__ import annotations

import functools
import itertools
import logging
import os
import random
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import pika

from . import ops as _ops
from . import tenancy
from .brokers import amqp_urls
from .errors import DBError, Timeout, Unavailable
from .names import Names
from .protocol import Reply, Request, decode_reply, new_id
from .settings import Settings, load
from .topology import READ, READ_PRIMARY, WRITE, declare_all, declare_response_queue

log = logging.getLogger("stratus.client")


class NodeParameters(list):
    """The connection parameters of every broker node, in the order to try
    them: pika.BlockingConnection(NodeParameters) connects to the first that
    answers. Setting an attribute sets it on every node's parameters (e.g.
    `params.client_properties = {...}`); reading one reads the first's."""

    def __setattr__(self, name, value) -> None:
        for p in self:
            setattr(p, name, value)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self[0], name)


_rotation = itertools.count(random.randrange(1 << 16))


def connection_params(url: str, *, heartbeat: int = 30) -> NodeParameters:
    """What pika needs to connect to the broker named by `url`: one AMQP URL,
    or several separated by commas, one per node of a RabbitMQ cluster
    (bus/brokers.py). pika.BlockingConnection tries them in turn, once each,
    and raises AMQPConnectionError when none answers; callers reconnect in
    their own loops, so every user of this function fails over.

    With several nodes, each call starts one node further along the list, so
    that a client reconnecting after its node died does not begin with that
    node every time, and connections spread over the cluster. A node that
    accepts TCP but does not answer AMQP costs at most NODE_STACK_TIMEOUT
    before the next one is tried."""
    urls = amqp_urls(url)
    if len(urls) > 1:
        start = next(_rotation) % len(urls)
        urls = urls[start:] + urls[:start]
    out = NodeParameters()
    for u in urls:
        params = pika.URLParameters(u)
        params.heartbeat = heartbeat
        params.blocked_connection_timeout = 30
        params.connection_attempts = 1
        params.socket_timeout = 3
        if len(urls) > 1:
            params.stack_timeout = NODE_STACK_TIMEOUT
        out.append(params)
    return out


# With several nodes: the longest one node may take to complete the AMQP
# handshake before the next node is tried (pika's default is 15 s).
NODE_STACK_TIMEOUT = 5.0

# With several nodes: a request the broker has not confirmed after this long
# is published again on a fresh channel (see the module's docstring).
CONFIRM_TIMEOUT = 1.5
RECYCLE_INTERVAL = 0.2   # s between two fresh publishing channels
RECONNECT_MAX = 0.5      # s at most between two connection attempts


class DBClient:
    def __init__(self, settings: Settings | None = None, *, name: str = "client", connect_timeout: float = 5.0,
                 tenant: str | None = None):
        self.settings = settings or load()
        self.names = Names(self.settings.cluster)
        self.account = tenancy.platform_user(self.settings.amqp_url)   # the connection's own account
        own = tenancy.tenant_of(self.account, cluster=self.settings.cluster, platform="")
        self.is_platform = own is None   # not a tenant's account: the platform's (impersonator)
        self.tenant = own or tenant or self.settings.tenant or tenancy.PLATFORM
        if own is not None and tenant not in (None, own):
            raise ValueError(f"a client with {own}'s credentials acts for {own} only, not {tenant}")
        # The reply queue's name starts with the tenant: its account may read only those.
        self.client_id = f"{self.tenant}.{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self._pending: dict[str, Future] = {}
        self._sent: set[str] = set()   # pending requests already handed to the broker
        self._pending_lock = threading.Lock()
        self._outbox: deque = deque()
        self._conn: pika.BlockingConnection | None = None
        self._ch = None    # the publishing channel (with several nodes, one of its own in confirm mode)
        # Several broker nodes: requests are confirmed, and published again when not.
        self._confirming = len(amqp_urls(self.settings.amqp_url)) > 1
        self._unconfirmed: dict[int, tuple] = {}   # delivery tag -> (outbox item, monotonic publish time)
        self._tag = 0
        self._generation = 0
        self._refused: list = []      # refused (nacked) on the current channel, to publish on the next
        self._recycled_at = 0.0
        self.republished = 0   # requests published again (unconfirmed in time, refused, or cut by a reconnect)
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"bus-io-{name}", daemon=True)
        self._thread.start()
        self._connected.wait(connect_timeout)

    # --- public API -------------------------------------------------------
    def read(self, query: dict, *, min_lsn: int | None = None, primary: bool = False, timeout: float | None = None,
             tenant: str | None = None) -> Reply:
        """Run a query on a slave (or the master while no slave is ready).
        primary=True: on the master, which has every acknowledged write (for
        the platform's own records, e.g. accounts: a login right after the
        account was made, by another process, must not meet a lagging slave)."""
        req = Request(kind="read", body=query, min_lsn=min_lsn or None)
        return self.request(req, READ_PRIMARY if primary else READ, timeout, tenant=tenant)

    def write(self, ops: list[dict], *, timeout: float | None = None, request_id: str | None = None,
              tenant: str | None = None) -> Reply:
        """Apply a list of operations atomically on the master. The reply's
        lsn is the write's log sequence number."""
        req = Request(kind="write", body={"ops": ops}, id=request_id or new_id())
        return self.request(req, WRITE, timeout, persistent=True, tenant=tenant)

    def clear(self, *, timeout: float | None = None, tenant: str | None = None) -> Reply:
        """Empty the tables of one tenant (this client's by default)."""
        return self.write([_ops.clear()], timeout=timeout, tenant=tenant)

    def user_id(self, tenant: str | None = None) -> str:
        """The validated identity a request for `tenant` carries."""
        tenant = tenant or self.tenant
        if not self.is_platform and tenant != self.tenant:
            raise ValueError(f"a client with {self.tenant}'s credentials acts for {self.tenant} only")
        if tenant == tenancy.PLATFORM:
            return self.account
        return tenancy.broker_user(self.settings.cluster, tenant)

    def create_table(self, *args, timeout: float | None = None, **kwargs) -> Reply:
        return self.write([_ops.create_table(*args, **kwargs)], timeout=timeout)

    def request(self, req: Request, routing_key: str, timeout: float | None = None, *, persistent: bool = False,
                tenant: str | None = None) -> Reply:
        """Publish `req` to the request exchange under `routing_key` (READ or
        WRITE) and wait for its reply."""
        user_id = self.user_id(tenant)
        body = req.encode()   # a value JSON cannot carry is the caller's BadRequest, before anything is sent
        timeout = self.settings.request_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        if not self._connected.wait(min(timeout, 5.0)):
            raise Unavailable("the message bus is not reachable; the request was not sent")
        fut: Future = Future()
        # The reply is matched by a correlation id of this send alone: two
        # requests in flight under one request id (a caller's retry) each get theirs.
        corr = uuid.uuid4().hex
        with self._pending_lock:
            self._pending[corr] = fut
        props = pika.BasicProperties(
            reply_to=self.names.response_queue(self.client_id), correlation_id=corr,
            content_type="application/json", delivery_mode=2 if persistent else 1, user_id=user_id,
            expiration=str(max(1, int(timeout * 1000))),  # a request nobody takes in time is dropped
        )
        self._outbox.append((self.names.request_exchange, routing_key, body, props, deadline))
        self._wake()
        try:
            raw = fut.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            raise Timeout(f"no reply within {timeout:g}s ({req.kind} {req.id}); a write may still be applied") from None
        finally:
            with self._pending_lock:
                self._pending.pop(corr, None)
                self._sent.discard(corr)
        if isinstance(raw, DBError):
            raise raw
        return decode_reply(raw)

    def publish(self, exchange: str, body: bytes, routing_key: str = "", *, timeout: float = 5.0) -> None:
        """Fire-and-forget publish on the client's connection (e.g. a cache
        invalidation on names.invalidate_exchange). Raises Unavailable when
        the bus is not reachable."""
        if not self._connected.wait(min(timeout, 5.0)):
            raise Unavailable("the message bus is not reachable")
        self._outbox.append((exchange, routing_key, body, pika.BasicProperties(delivery_mode=1),
                             time.monotonic() + timeout))
        self._wake()

    def close(self) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(timeout=5)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # --- the I/O thread ---------------------------------------------------
    def _wake(self) -> None:
        conn = self._conn
        if conn is not None:
            try:
                conn.add_callback_threadsafe(self._flush)
            except Exception:  # closed meanwhile: the loop reconnects and flushes
                pass

    def _flush(self) -> None:
        now = time.monotonic()
        while self._outbox:
            item = self._outbox.popleft()
            exchange, routing_key, body, props, deadline = item
            if deadline < now:
                continue  # the caller has given up already
            try:
                self._ch.basic_publish(exchange, routing_key, body, props)
            except Exception:
                self._outbox.appendleft(item)
                raise
            if self._confirming:
                self._tag += 1
                self._unconfirmed[self._tag] = (item, now)
            if props.correlation_id:
                with self._pending_lock:
                    if props.correlation_id in self._pending:
                        self._sent.add(props.correlation_id)

    # --- confirms (several broker nodes) ------------------------------------
    def _publishing_channel(self, conn):
        """A channel in confirm mode whose Basic.Ack/Nack come to _on_confirm
        (asynchronously: pika's blocking confirm mode would wait for each)."""
        ch = conn.channel()
        self._generation += 1
        ch._impl.confirm_delivery(functools.partial(self._on_confirm, self._generation))
        self._tag = 0
        return ch

    def _on_confirm(self, generation: int, frame) -> None:
        if generation != self._generation:
            return   # a channel given up already: its tags are not this one's
        m = frame.method
        tags = [t for t in self._unconfirmed if t <= m.delivery_tag] if m.multiple else [m.delivery_tag]
        refused = []
        for t in tags:
            entry = self._unconfirmed.pop(t, None)
            if entry is not None and isinstance(m, pika.spec.Basic.Nack):
                refused.append(entry[0])
        if refused:   # a channel whose queue client is stuck nacks everything: use another
            if not self._refused:
                log.warning("the broker refused %d request(s): publishing them again on a new channel",
                            len(refused))
            self._refused.extend(refused)

    def _republish(self, items: list) -> None:
        self.republished += len(items)
        self._outbox.extendleft(reversed(items))   # first, in their order

    def _check_confirms(self, conn) -> None:
        """Requests refused, or unconfirmed past CONFIRM_TIMEOUT: publish them
        again on a fresh channel (the old one may be sending to a queue leader
        that died), at most once per RECYCLE_INTERVAL."""
        now = time.monotonic()
        late = bool(self._unconfirmed) and now - min(t for _, t in self._unconfirmed.values()) >= CONFIRM_TIMEOUT
        if not (late or self._refused) or now - self._recycled_at < RECYCLE_INTERVAL:
            return
        items = self._refused + [self._unconfirmed[t][0] for t in sorted(self._unconfirmed)]
        self._refused = []
        self._unconfirmed.clear()
        if late:
            log.warning("request(s) unconfirmed for %.1fs: publishing %d again on a new channel",
                        CONFIRM_TIMEOUT, len(items))
        old, self._ch = self._ch, self._publishing_channel(conn)
        self._recycled_at = now
        try:
            old.close()
        except Exception:
            pass
        self._republish(items)
        self._flush()

    def _on_reply(self, ch, method, props, body) -> None:
        with self._pending_lock:
            fut = self._pending.get(props.correlation_id)
        if fut is not None and not fut.done():
            fut.set_result(body)

    @staticmethod
    def _queue_exists(conn, queue: str) -> bool:
        ch = conn.channel()   # a passive declare of a missing queue closes its channel
        try:
            ch.queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            return False
        ch.close()
        return True

    def _fail_sent(self) -> None:
        """Our reply queue is gone (the broker restarted): replies to requests
        already sent can never arrive, so their callers learn it now rather
        than at their timeout."""
        with self._pending_lock:
            lost = [(i, self._pending[i]) for i in self._sent if i in self._pending]
            self._sent.clear()
        for rid, fut in lost:
            if not fut.done():
                fut.set_result(Timeout(f"the bus restarted before the reply to {rid} came; "
                                       "a write may still be applied"))

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            conn = None
            try:
                conn = pika.BlockingConnection(connection_params(self.settings.amqp_url))
                ch = conn.channel()
                if self.is_platform:   # a tenant's account may not declare the cluster's objects
                    declare_all(ch, self.names, self.settings)
                with self._pending_lock:
                    in_flight = bool(self._sent)
                # Only with requests in flight is there anything to fail; the
                # probe's 404 is a pika WARNING, which every start would log.
                lost = in_flight and not self._queue_exists(conn, self.names.response_queue(self.client_id))
                q = declare_response_queue(ch, self.names, self.client_id)
                cut = self._refused + [self._unconfirmed[t][0] for t in sorted(self._unconfirmed)]
                self._unconfirmed.clear()
                self._refused = []
                if lost:
                    self._fail_sent()
                elif cut:   # they may not have reached the broker; their replies would still come here
                    self._republish(cut)
                ch.basic_consume(q, self._on_reply, auto_ack=True)
                pub = self._publishing_channel(conn) if self._confirming else ch
                self._conn, self._ch = conn, pub
                self._connected.set()
                backoff = 0.1
                self._flush()
                while not self._stop.is_set():
                    conn.process_data_events(time_limit=0.1 if self._refused else 0.25 if self._unconfirmed else 0.5)
                    if self._confirming:
                        self._check_confirms(conn)
                    if self._outbox:
                        self._flush()
            except Exception as exc:  # broker gone or channel closed: reconnect
                if not self._stop.is_set():
                    log.warning("bus connection lost (%s); reconnecting", exc)
            finally:
                self._connected.clear()
                self._conn = None
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:
                        pass
            if not self._stop.is_set():
                # Retried at least every RECONNECT_MAX: after a broker's return every
                # client is back within it (an orchestrator's client still away 1 s
                # after a standby's is back hands the lead over: orchestrator/decisions.py).
                self._stop.wait(backoff)
                backoff = min(backoff * 2, RECONNECT_MAX)


_shared: DBClient | None = None
_shared_pid = 0
_shared_lock = threading.Lock()


def shared(name: str = "service", tenant: str | None = None) -> DBClient:
    """A process-wide client acting for `tenant`, made on first use (after
    any fork, so gunicorn workers each get their own connection)."""
    global _shared, _shared_pid
    with _shared_lock:
        if _shared is None or _shared_pid != os.getpid():
            # Don't wait for the connection under the lock: each request waits for it itself.
            _shared = DBClient(name=name, connect_timeout=0, tenant=tenant)
            _shared_pid = os.getpid()
        return _shared
