"""A lease on the bus: one holder at a time among the instances of a
tenant's role, with nothing but the tenant's own broker account (an app
instance reaches the broker and the gateway, nothing else: docs/security.md).

The lease is an exclusive queue, Names.lease_queue(tenant, name):

    stratus.<cluster>.responseQ.<tenant>.lease.<name>

The connection that declares it first holds it; the broker refuses every
other connection's declaration with 405 RESOURCE_LOCKED. The broker deletes
an exclusive queue as soon as the connection that declared it closes or dies
(its socket closes, or it misses heartbeats: `heartbeat`, HEARTBEAT s by
default), so the lease passes on with nobody having to release it;
contenders try again every `retry` seconds.

Permissions: the name lies under the tenant's own reply-queue prefix, which
its account may configure and read (bus.tenancy.permissions), so a lease
needs no permission beyond what every tenant has; no other tenant can take,
block or read it (its account can configure nothing under
`responseQ.<tenant>.`).

The holder consumes its own queue: if the queue is deleted under it (an
administrator, through the management API), the broker cancels the consumer
and the holder lets go. The holder's connection lives on the lease's own
thread, which does nothing else, so slow work of the holder's never makes it
miss a heartbeat.

    lease = Lease(settings, "restock", tenant="toystore", holder=my_id)
    lease.start()
    if lease.held.wait(1.0):
        term = lease.term            # which acquisition this is
        ...                          # act while lease.held and lease.term == term
    lease.release()                  # let go now (closes the connection)

`held` means: the broker granted the lease and this process has not seen the
connection fail. When the broker drops a holder that stopped answering, the
holder learns it at its next read of the connection (within POLL s when the
socket closes, within about two heartbeats when the network went silent), so
two holders may overlap for that long: what a holder does must stay correct
then (the restocker's writes are guarded)."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable

import pika

from . import tenancy
from .client import connection_params
from .names import Names
from .settings import Settings

log = logging.getLogger("stratus.lease")

HEARTBEAT = 5      # s: the broker drops a silent holder after about two of them
POLL = 0.2         # s between two reads of the holder's connection (and checks of release())
RESOURCE_LOCKED = 405


class Lease(threading.Thread):
    def __init__(self, settings: Settings, name: str, *, tenant: str | None = None, holder: str = "",
                 retry: float = 1.0, heartbeat: int = HEARTBEAT,
                 on_change: Callable[[bool], None] | None = None):
        super().__init__(name=f"lease-{name}", daemon=True)
        self.settings = settings
        own = tenancy.tenant_of(tenancy.platform_user(settings.amqp_url), cluster=settings.cluster, platform="")
        if own is not None and tenant not in (None, own):
            raise ValueError(f"a lease with {own}'s credentials belongs to {own}, not {tenant}")
        self.tenant = own or tenant or settings.tenant
        if not self.tenant:
            raise ValueError("a lease belongs to a tenant: pass tenant= or set STRATUS_TENANT")
        self.queue = Names(settings.cluster).lease_queue(self.tenant, name)
        self.holder = holder or f"{socket.gethostname()}.{os.getpid()}"
        self.retry = max(0.05, float(retry))
        self.heartbeat = max(1, int(heartbeat))
        self.on_change = on_change
        self.held = threading.Event()
        self.term = 0              # incremented at every acquisition
        self.last_error: str | None = None   # why the last attempt could not contend (e.g. 403), or None
        self._released = threading.Event()

    # --- the caller's side --------------------------------------------------------
    def release(self, timeout: float = 5.0) -> None:
        """Stop contending and let go of the lease now: the connection is
        closed (waiting at most `timeout` s for the thread to do it)."""
        self._released.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    # --- the lease's thread ---------------------------------------------------------
    def run(self) -> None:
        while not self._released.is_set():
            conn = None
            try:
                params = connection_params(self.settings.amqp_url, heartbeat=self.heartbeat)
                params.client_properties = {"connection_name": f"lease {self.queue} ({self.holder})"}
                conn = pika.BlockingConnection(params)
                self._contend(conn)
            except Exception as exc:   # the broker is away, or refused us: try again later
                self._note(f"{type(exc).__name__}: {exc}")
            finally:
                self._let_go()
                if conn is not None:
                    try:
                        if conn.is_open:
                            conn.close()
                    except Exception:
                        pass
            self._released.wait(self.retry)

    def _contend(self, conn) -> None:
        while not self._released.is_set():
            ch = conn.channel()
            try:
                ch.queue_declare(self.queue, exclusive=True)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != RESOURCE_LOCKED:
                    raise
                self.last_error = None   # another connection holds it: normal
                self._pause(conn, self.retry)
                continue
            self._hold(conn, ch)
            return

    def _hold(self, conn, ch) -> None:
        cancelled: list = []
        ch.add_on_cancel_callback(cancelled.append)
        ch.basic_consume(self.queue, lambda *_: None, auto_ack=True, exclusive=True)
        self.last_error = None
        self.term += 1
        self.held.set()
        log.info("lease %s held by %s", self.queue, self.holder)
        self._changed(True)
        while not self._released.is_set() and not cancelled:
            conn.process_data_events(time_limit=POLL)
        if cancelled:
            log.warning("lease %s: the broker deleted the queue under %s", self.queue, self.holder)
        # release() or a cancel: run() closes the connection, which deletes the queue

    def _pause(self, conn, seconds: float) -> None:
        """Wait, keeping the connection's heartbeats, until `seconds` pass or release()."""
        end = time.monotonic() + seconds
        while not self._released.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            conn.process_data_events(time_limit=min(POLL, left))

    def _let_go(self) -> None:
        if self.held.is_set():
            self.held.clear()
            log.info("lease %s let go by %s", self.queue, self.holder)
            self._changed(False)

    def _changed(self, held: bool) -> None:
        if self.on_change is not None:
            try:
                self.on_change(held)
            except Exception:
                log.exception("lease %s: on_change failed", self.queue)

    def _note(self, error: str) -> None:
        """Log a failure to contend once per distinct error (the broker down
        for a minute is one line, not sixty)."""
        if error != self.last_error and not self._released.is_set():
            log.warning("lease %s: %s; trying again every %gs", self.queue, error, self.retry)
        self.last_error = error
