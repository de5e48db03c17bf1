"""Upstream instances and how one is chosen.

Each service's instances come from the ZooKeeper registry through a children
watch on Paths.service(name) (bus.routing.Children): a znode appearing or
vanishing changes the pool at once. A health checker GETs every instance's
`health` path on an interval; an instance that fails it (or refuses a
connection) leaves the rotation until a later check succeeds. The pick is the
healthy instance with the fewest requests in flight, ties broken round robin,
or, with an affinity key (a client's token, or its `stratus_affinity`
cookie), the instance that key was pinned to while it is still a healthy
member; otherwise the key is pinned to the instance picked now.

An instance that leaves the registry takes no new request; requests already
on it finish on their own connections, which are then closed. Upstreams
keeps one pool per service, made on first use; `want(services)` names the
services routes still point at, and a pool no route names any more is closed
(its watch and health checker stopped) once no request is using it
(`acquire`/`release` count them)."""
from __future__ import annotations

import http.client
import itertools
import logging
import select
import threading
import time
from collections import OrderedDict

from .config import GatewayConfig
from .upstream_conn import UpstreamConn

log = logging.getLogger("stratus.gateway.balancer")

# A pooled connection given back this recently is reused without a probe
# for idempotent requests: upstreams keep idle connections for far longer
# (gunicorn: 30 s here), and such a request is retried if the upstream did
# close it.
FRESH = 1.0
AFFINITY_KEYS = 10_000   # affinity keys remembered per pool, least recently used first out


class Instance:
    def __init__(self, key: str, host: str, port: int, health: str = "/health", *, static: bool = False):
        self.key = key
        self.host = host
        self.port = int(port)
        self.health_path = health or "/health"
        self.static = static        # a fallback address, not from the registry
        self.healthy = True         # optimistic: it registered after it started listening
        self.removed = False
        self.outstanding = 0
        self.served = 0
        self.failures = 0
        self._idle: list[tuple[UpstreamConn, float]] = []
        self._lock = threading.Lock()

    def begin(self) -> None:
        with self._lock:
            self.outstanding += 1

    def end(self, ok: bool) -> None:
        with self._lock:
            self.outstanding -= 1
            if ok:
                self.served += 1

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    # -- persistent connections ---------------------------------------------------
    def take_connection(self, cfg: GatewayConfig, *, probe: bool = True) -> tuple[UpstreamConn, bool]:
        """(connection, reused). A pooled connection that the upstream has
        closed meanwhile (readable, or idle too long) is dropped, not reused.
        A new connection is returned unconnected: the caller connects it, so
        a failure to connect is told apart from a failure after sending.

        probe=False skips the readability probe (one syscall, and one GIL
        hand-over when threads are busy) for a connection given back less
        than FRESH seconds ago; the caller must be able to retry a request
        that fails on it."""
        now = time.monotonic()
        while True:
            with self._lock:
                if not self._idle:
                    break
                conn, since = self._idle.pop()
            sock = conn.sock
            if sock is None or now - since > cfg.pool_idle:
                conn.close()
                continue
            if not probe and now - since < FRESH:
                return conn, True
            try:
                readable, _, _ = select.select([sock], [], [], 0)
            except (OSError, ValueError):
                readable = [sock]
            if readable:  # EOF or unexpected bytes: the upstream is done with it
                conn.close()
                continue
            return conn, True
        return UpstreamConn(self.host, self.port), False

    def give_back(self, conn: UpstreamConn) -> None:
        if self.removed:
            conn.close()
            return
        with self._lock:
            if len(self._idle) < 256:
                self._idle.append((conn, time.monotonic()))
                return
        conn.close()

    def close_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.close()

    def idle_count(self) -> int:
        with self._lock:
            return len(self._idle)


class NoInstance(Exception):
    pass


class ServicePool:
    """The instances of one service."""

    def __init__(self, name: str, cfg: GatewayConfig, zk=None, *, fallback: tuple[str, int] | None = None):
        self.name = name
        self.cfg = cfg
        self.instances: dict[str, Instance] = {}
        self.active = 0             # requests using the pool (Upstreams.acquire/release)
        self.closed = False
        self._lock = threading.Lock()
        self._rr = itertools.count()
        self._fallback = Instance(f"fallback-{fallback[0]}:{fallback[1]}", fallback[0], fallback[1],
                                  static=True) if fallback else None
        self._affinity: OrderedDict[str, str] = OrderedDict()
        self._stop = threading.Event()
        self._zk = zk
        self._known: dict[str, dict] = {}   # registry child -> its data
        self.watch = None
        if zk is not None:
            from bus.names import Paths
            from bus.routing import Children
            self._path = Paths(cfg.base.cluster).service(name)
            self.watch = Children(zk, self._path, self._on_children)
        self._checker = threading.Thread(target=self._health_loop, name=f"health-{name}", daemon=True)
        self._checker.start()

    # -- membership from the registry --------------------------------------------------
    def _on_children(self, children: list[str]) -> None:
        from bus.zk import get_json
        known = {}
        for child in children:
            data = self._known.get(child)
            if data is None:
                data = get_json(self._zk, f"{self._path}/{child}")
            if isinstance(data, dict):
                known[child] = data
        self._known = known
        self._on_change(dict(known))

    def _on_change(self, found: dict) -> None:
        with self._lock:
            current = dict(self.instances)
            fresh: dict[str, Instance] = {}
            for key, data in found.items():
                try:
                    host, port = str(data["host"]), int(data["port"])
                except (KeyError, TypeError, ValueError):
                    continue
                inst = current.get(key)
                if inst is None or inst.addr != f"{host}:{port}":
                    inst = Instance(key, host, port, str(data.get("health") or "/health"))
                    log.info("%s: instance %s at %s joined", self.name, key, inst.addr)
                fresh[key] = inst
            gone = [inst for key, inst in current.items() if fresh.get(key) is not inst]
            self.instances = fresh
        for inst in gone:
            inst.removed = True
            inst.close_idle()
            log.info("%s: instance %s at %s left", self.name, inst.key, inst.addr)

    def members(self) -> list[Instance]:
        with self._lock:
            members = list(self.instances.values())
        if not members and self._fallback is not None:
            return [self._fallback]
        return members

    # -- choosing ---------------------------------------------------------------------------
    def pick(self, *, exclude: set[str] = frozenset(), affinity_key: str | None = None) -> Instance:
        members = [i for i in self.members() if i.key not in exclude]
        healthy = [i for i in members if i.healthy]
        if not healthy:
            # Every instance failed its last check: still try one rather than
            # refuse outright (checks lag; a restarted service may be back).
            healthy = members
        if not healthy:
            raise NoInstance(self.name)
        if affinity_key is not None:
            with self._lock:
                pinned = self._affinity.get(affinity_key)
            if pinned is not None:
                for inst in healthy:
                    if inst.key == pinned and inst.healthy:
                        return inst
        n = len(healthy)
        start = next(self._rr) % n
        best = None
        for j in range(n):
            inst = healthy[(start + j) % n]
            if best is None or inst.outstanding < best.outstanding:
                best = inst
        if affinity_key is not None:
            self.pin(affinity_key, best)
        return best

    def pin(self, affinity_key: str, inst: Instance) -> None:
        """From now on `affinity_key` goes to `inst` while it is healthy."""
        with self._lock:
            self._affinity[affinity_key] = inst.key
            self._affinity.move_to_end(affinity_key)
            while len(self._affinity) > AFFINITY_KEYS:
                self._affinity.popitem(last=False)

    def mark_down(self, inst: Instance, why: str) -> None:
        if inst.healthy:
            log.warning("%s: instance %s at %s taken out of rotation: %s", self.name, inst.key, inst.addr, why)
        inst.healthy = False
        inst.failures += 1
        inst.close_idle()

    # -- health checks ------------------------------------------------------------------------
    def _check(self, inst: Instance) -> bool:
        conn = http.client.HTTPConnection(inst.host, inst.port, timeout=self.cfg.health_timeout)
        try:
            conn.request("GET", inst.health_path, headers={"User-Agent": "stratus-gateway-health"})
            resp = conn.getresponse()
            resp.read()
            return 200 <= resp.status < 300
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def _health_loop(self) -> None:
        while not self._stop.wait(self.cfg.health_interval):
            for inst in self.members():
                ok = self._check(inst)
                if ok and not inst.healthy:
                    log.info("%s: instance %s at %s is healthy again", self.name, inst.key, inst.addr)
                elif not ok and inst.healthy:
                    log.warning("%s: instance %s at %s failed its health check", self.name, inst.key, inst.addr)
                    inst.close_idle()
                inst.healthy = ok

    def close(self) -> None:
        """Stop following the registry and checking health; drop idle
        connections. A request still on an instance finishes, and its
        connection is closed instead of pooled."""
        self.closed = True
        self._stop.set()
        if self.watch is not None:
            self.watch.close()
        for inst in self.members():
            inst.removed = True
            inst.close_idle()


class Upstreams:
    """The pools of every service, made on first use. Pools of the services
    in `keep` (the fallbacks, such as the orchestrator) are never closed;
    others are closed once `want` no longer names them and no request uses
    them."""

    def __init__(self, cfg: GatewayConfig, zk=None, fallbacks: dict[str, tuple[str, int]] | None = None,
                 keep=()):
        self.cfg = cfg
        self.zk = zk
        self.fallbacks = fallbacks or {}
        self.keep = frozenset(keep) | frozenset(self.fallbacks)
        self.wanted: frozenset[str] | None = None   # None: every pool is kept
        self.pools: dict[str, ServicePool] = {}
        self._lock = threading.Lock()

    def _make(self, service: str) -> ServicePool:
        """With the lock held."""
        pool = ServicePool(service, self.cfg, self.zk, fallback=self.fallbacks.get(service))
        self.pools[service] = pool
        return pool

    def pool(self, service: str) -> ServicePool:
        pool = self.pools.get(service)
        if pool is not None:
            return pool
        with self._lock:
            pool = self.pools.get(service)
            return pool if pool is not None else self._make(service)

    def _unwanted(self, name: str) -> bool:
        return self.wanted is not None and name not in self.wanted and name not in self.keep

    def acquire(self, service: str) -> ServicePool:
        """The service's pool, counted as used until `release`."""
        with self._lock:
            pool = self.pools.get(service)
            if pool is None:
                pool = self._make(service)
            pool.active += 1
            return pool

    def release(self, pool: ServicePool) -> None:
        with self._lock:
            pool.active -= 1
            retire = pool.active == 0 and self._unwanted(pool.name) and self.pools.get(pool.name) is pool
            if retire:
                del self.pools[pool.name]
        if retire:
            log.info("%s: no route names it any more; pool closed", pool.name)
            pool.close()

    def want(self, services) -> None:
        """The services that routes name now: their pools are made (health
        checks begin before the first request), and the others' closed once
        idle."""
        retired = []
        with self._lock:
            self.wanted = frozenset(services)
            for name in sorted(self.wanted):
                if name not in self.pools:
                    self._make(name)
            for name, pool in list(self.pools.items()):
                if pool.active == 0 and self._unwanted(name):
                    del self.pools[name]
                    retired.append(pool)
        for pool in retired:
            log.info("%s: no route names it any more; pool closed", pool.name)
            pool.close()

    def snapshot(self) -> list[tuple[str, ServicePool]]:
        with self._lock:
            return sorted(self.pools.items())

    def close(self) -> None:
        for _, pool in self.snapshot():
            pool.close()


def parse_base_url(url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80

