"""Read-your-writes: the highest X-Stratus-LSN returned to each client.

Clients are known by their token when they send one, else by their address
(and the connection itself keeps its own value). The map is an LRU with a
size cap and a time-to-live, so memory stays bounded however many clients
come and go."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict


class LSNTracker:
    def __init__(self, max_clients: int = 100_000, ttl: float = 3600.0):
        self.max_clients = max(1, max_clients)
        self.ttl = ttl
        self._map: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str | None) -> int:
        if key is None:
            return 0
        with self._lock:
            item = self._map.get(key)
            if item is None:
                return 0
            lsn, at = item
            if time.monotonic() - at > self.ttl:
                del self._map[key]
                return 0
            return lsn

    def observe(self, key: str | None, lsn: int) -> None:
        if key is None or lsn <= 0:
            return
        now = time.monotonic()
        with self._lock:
            item = self._map.get(key)
            if item is not None and item[0] >= lsn:
                self._map[key] = (item[0], now)
            else:
                self._map[key] = (lsn, now)
            self._map.move_to_end(key)
            while len(self._map) > self.max_clients:
                self._map.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._map)


def parse_lsn(value: str | None) -> int:
    if not value:
        return 0
    value = value.strip()
    if not value.isdigit() or len(value) > 19:
        return 0
    return int(value)
