"""The product cache: GET /products/{name} answers (200 only) in a bounded
LRU. An entry is dropped when a product name arrives on the cluster's
invalidation exchange (a fanout; the catalog and order services publish the
name after every write that changes a product). Each entry remembers the LSN
it reflects; a client that has seen a later LSN bypasses it, so nobody reads
an older value than their own write."""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

log = logging.getLogger("stratus.gateway.cache")


@dataclass
class Entry:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    lsn: int


class ProductCache:
    def __init__(self, size: int = 8, enabled: bool = True):
        self.size = max(0, size)
        self.enabled = enabled and self.size > 0
        self._lru: OrderedDict[str, Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._epoch = 0          # bumped by every invalidation
        self.hits = 0
        self.misses = 0
        self.bypasses = 0
        self.invalidations = 0
        # False while the invalidation feed is down: entries cannot be trusted then.
        self.feed_ok = True

    def usable(self) -> bool:
        return self.enabled and self.feed_ok

    def epoch(self) -> int:
        return self._epoch

    def get(self, name: str, client_lsn: int) -> Entry | None:
        with self._lock:
            entry = self._lru.get(name)
            if entry is None:
                self.misses += 1
                return None
            if client_lsn > entry.lsn:
                self.bypasses += 1
                return None
            self._lru.move_to_end(name)
            self.hits += 1
            return entry

    def put(self, name: str, entry: Entry, epoch: int) -> bool:
        """Store unless an invalidation arrived since the request began."""
        with self._lock:
            if epoch != self._epoch or not self.usable():
                return False
            self._lru[name] = entry
            self._lru.move_to_end(name)
            while len(self._lru) > self.size:
                self._lru.popitem(last=False)
            return True

    def invalidate(self, name: str) -> None:
        with self._lock:
            self._epoch += 1
            self.invalidations += 1
            self._lru.pop(name, None)

    def clear(self) -> None:
        with self._lock:
            self._epoch += 1
            self._lru.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._lru)

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._lru


class InvalidationListener:
    """Its own pika connection on its own thread: an exclusive, auto-delete
    queue bound to the invalidation fanout. Reconnects on its own; while it
    is disconnected the cache is bypassed and emptied, because messages sent
    meanwhile are lost."""

    def __init__(self, cache: ProductCache, settings):
        from bus.names import Names
        self.cache = cache
        self.settings = settings
        self.names = Names(settings.cluster)
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._conn = None
        cache.feed_ok = False   # until the queue is bound, nothing cached can be trusted
        self._thread = threading.Thread(target=self._run, name="cache-invalidation", daemon=True)
        self._thread.start()

    def _on_message(self, ch, method, props, body: bytes) -> None:
        try:
            name = body.decode("utf-8").strip()
        except UnicodeDecodeError:
            log.warning("invalidation message is not UTF-8: %r", body[:80])
            return
        if name:
            self.cache.invalidate(name)

    def _run(self) -> None:
        import pika

        from bus.client import connection_params
        from bus.topology import declare_invalidation
        backoff = 0.2
        while not self._stop.is_set():
            conn = None
            try:
                params = connection_params(self.settings.amqp_url)
                # A name operators (and tests) can find in `rabbitmqctl list_connections`.
                params.client_properties = {"connection_name": f"stratus-gateway-invalidation {self.names.cluster}"}
                conn = pika.BlockingConnection(params)
                ch = conn.channel()
                declare_invalidation(ch, self.names)
                q = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
                ch.queue_bind(q, self.names.invalidate_exchange_of("toystore"))  # the product cache is the toy store's
                ch.basic_consume(q, self._on_message, auto_ack=True)
                self._conn = conn
                self.cache.clear()   # anything cached before this point may have missed a message
                self.cache.feed_ok = True
                self.ready.set()
                backoff = 0.2
                while not self._stop.is_set():
                    conn.process_data_events(time_limit=0.25)
            except Exception as exc:
                if not self._stop.is_set():
                    log.warning("invalidation feed lost (%s); bypassing the cache until it is back", exc)
            finally:
                self.ready.clear()
                self.cache.feed_ok = False
                self.cache.clear()
                self._conn = None
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:
                        pass
            if not self._stop.is_set():
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=3)
