"""TCP proxies for fault injection: one listening port per link (a client
side and one upstream server), all run by one asyncio loop in a thread.

A cluster under test is started with its components pointed at the proxies
(STRATUS_AMQP_URL and STRATUS_ZK_HOSTS name the proxies' ports), so every
byte between a component and a broker node or a ZooKeeper server crosses a
proxy that can misbehave on command.

Contract of a Proxy:
  - Each accepted connection opens one connection to the upstream and pumps
    bytes both ways, in order. The connection's client process is found once
    at accept, from /proc (the pid owning the client's socket): a fault may
    name the pids it applies to, so one shared link (every worker inherits
    the same STRATUS_ZK_HOSTS) can be cut for the master alone.
  - Faults (each applies to the pids it names, or to every client when it
    names none; several may be active at once):
      cut(pids)      refuse: a new connection is closed at once (with a
                     reset) and never reaches the upstream; open connections
                     of those pids are aborted (both sides see a reset).
      delay(ms, pids) every chunk is forwarded `ms` milliseconds after it
                     was read, in order (latency, not a bandwidth limit).
      swallow(pids)  connections are accepted and stay open, and nothing is
                     forwarded either way (read and dropped): a black hole.
    Each returns a Rule; heal(rule) ends that fault, heal() ends them all.
    Healing never re-opens a connection that a cut aborted, and it aborts
    the connections whose bytes a swallow dropped (their streams are cut in
    the middle of a frame: as after a partition that outlived TCP's patience).
  - An upstream that refuses the connection closes the client's.
  - stats: connections accepted, refused by a cut, aborted, bytes each way.

The proxies of one hub share one loop thread; ProxyHub.close() stops them
all and closes every connection. Nothing here blocks the loop: the /proc
lookup runs in the loop's default executor."""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import socket
import struct
import threading
import time
from concurrent.futures import Future

log = logging.getLogger("stratus.chaos.proxy")

CHUNK = 64 * 1024


# --- who is on the other end: /proc -------------------------------------------------
def _hex_addr(host: str, port: int) -> tuple[str, str]:
    """The forms /proc/net/tcp (IPv4) and tcp6 (IPv4-mapped) show host:port in."""
    packed = socket.inet_aton(host)
    v4 = "%08X:%04X" % (struct.unpack("<I", packed)[0], port)
    mapped = "0000000000000000FFFF0000" + "%08X" % struct.unpack("<I", packed)[0]
    return v4, "%s:%04X" % (mapped, port)


def socket_inode(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The inode of the TCP socket whose local end is `local` and remote end
    `remote` (as this machine's /proc/net/tcp{,6} shows it), or None."""
    lv4, lv6 = _hex_addr(*local)
    rv4, rv6 = _hex_addr(*remote)
    for table, (lw, rw) in (("/proc/net/tcp", (lv4, rv4)), ("/proc/net/tcp6", (lv6, rv6))):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) > 9 and parts[1] == lw and parts[2] == rw:
                        return int(parts[9])
        except OSError:
            continue
    return None


def pid_of_inode(inode: int) -> int | None:
    """The process holding socket `inode` open (the first found), or None."""
    target = f"socket:[{inode}]"
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                try:
                    if os.readlink(fd.path) == target:
                        return int(entry.name)
                except OSError:
                    continue
        except OSError:
            continue
    return None


def client_pid(peer: tuple[str, int], listen: tuple[str, int]) -> int | None:
    """The pid of the process that opened the connection from `peer` to
    our listening address `listen` (None when it cannot be told: another
    network namespace, or a process gone meanwhile)."""
    try:
        inode = socket_inode(peer, listen)
    except (OSError, ValueError):
        return None
    if not inode:
        return None
    return pid_of_inode(inode)


# --- faults ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Rule:
    kind: str                      # "cut" | "delay" | "swallow"
    pids: frozenset | None = None  # None: every client
    delay_ms: float = 0.0
    id: int = 0

    def applies(self, pid: int | None) -> bool:
        return self.pids is None or (pid is not None and pid in self.pids)


_rule_ids = itertools.count(1)


@dataclasses.dataclass
class Stats:
    accepted: int = 0
    refused: int = 0
    aborted: int = 0
    upstream_failed: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


class _Conn:
    def __init__(self, pid: int | None, cw: asyncio.StreamWriter, uw: asyncio.StreamWriter):
        self.pid = pid
        self.cw, self.uw = cw, uw
        self.tasks: list[asyncio.Task] = []
        self.tainted = False       # bytes were swallowed: the stream is broken for good

    def abort(self) -> None:
        for w in (self.cw, self.uw):
            try:
                w.transport.abort()
            except Exception:
                pass
        for t in self.tasks:
            t.cancel()


class Proxy:
    """One link: 127.0.0.1:<port> -> upstream. Made by ProxyHub.add()."""

    def __init__(self, hub: "ProxyHub", name: str, upstream: tuple[str, int], port: int, host: str = "127.0.0.1"):
        self.hub = hub
        self.name = name
        self.upstream = upstream
        self.host, self.port = host, port
        self.rules: list[Rule] = []
        self.conns: set[_Conn] = set()
        self.stats = Stats()
        self._server: asyncio.base_events.Server | None = None

    def __repr__(self) -> str:
        return f"Proxy({self.name} {self.host}:{self.port} -> {self.upstream[0]}:{self.upstream[1]})"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # --- faults (thread-safe: they run on the hub's loop) ---------------------------
    def cut(self, pids=None) -> Rule:
        return self._add(Rule("cut", _pids(pids), id=next(_rule_ids)))

    def delay(self, ms: float, pids=None) -> Rule:
        return self._add(Rule("delay", _pids(pids), delay_ms=float(ms), id=next(_rule_ids)))

    def swallow(self, pids=None) -> Rule:
        return self._add(Rule("swallow", _pids(pids), id=next(_rule_ids)))

    def heal(self, rule: Rule | None = None) -> None:
        def do():
            if rule is None:
                self.rules.clear()
            else:
                self.rules = [r for r in self.rules if r.id != rule.id]
            # A connection whose bytes were swallowed carries a broken stream
            # (frames cut in the middle): like a TCP connection that timed out
            # during a partition, it is dropped once no swallow holds it.
            for c in [c for c in self.conns if c.tainted and not self._rule("swallow", c.pid)]:
                self.stats.aborted += 1
                self.conns.discard(c)
                c.abort()
        self.hub.call(do)

    def active(self) -> list[Rule]:
        return self.hub.call(lambda: list(self.rules))

    def connections(self) -> list[int | None]:
        """The client pid of each open connection."""
        return self.hub.call(lambda: [c.pid for c in self.conns])

    def _add(self, rule: Rule) -> Rule:
        def do():
            self.rules.append(rule)
            if rule.kind == "cut":
                for c in [c for c in self.conns if rule.applies(c.pid)]:
                    self.stats.aborted += 1
                    self.conns.discard(c)
                    c.abort()
        self.hub.call(do)
        return rule

    def _rule(self, kind: str, pid: int | None) -> Rule | None:
        for r in self.rules:
            if r.kind == kind and r.applies(pid):
                return r
        return None

    def _delay_of(self, pid: int | None) -> float:
        return max((r.delay_ms for r in self.rules if r.kind == "delay" and r.applies(pid)), default=0.0)

    # --- the loop's side ------------------------------------------------------------
    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in list(self.conns):
            c.abort()
        self.conns.clear()

    async def _accept(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.stats.accepted += 1
        peer = cw.get_extra_info("peername")
        pid = None
        if peer:
            pid = await asyncio.get_running_loop().run_in_executor(
                None, client_pid, (peer[0].removeprefix("::ffff:"), peer[1]), (self.host, self.port))
        if self._rule("cut", pid):
            self.stats.refused += 1
            _reset(cw)
            return
        try:
            ur, uw = await asyncio.wait_for(asyncio.open_connection(*self.upstream), 5.0)
        except (OSError, asyncio.TimeoutError):
            self.stats.upstream_failed += 1
            _reset(cw)
            return
        if self._rule("cut", pid):   # cut while we connected
            self.stats.refused += 1
            _reset(cw)
            _reset(uw)
            return
        conn = _Conn(pid, cw, uw)
        self.conns.add(conn)
        conn.tasks = [asyncio.ensure_future(self._pump(conn, cr, uw, "up")),
                      asyncio.ensure_future(self._pump(conn, ur, cw, "down"))]
        try:
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        finally:
            self.conns.discard(conn)
            for w in (cw, uw):
                try:
                    w.close()
                except Exception:
                    pass

    async def _pump(self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    direction: str) -> None:
        """Read, then (unless swallowed) forward each chunk when its delay is
        over. A separate sender keeps the order and lets reads go on while
        chunks wait out their delay."""
        queue: asyncio.Queue = asyncio.Queue()
        sender = asyncio.ensure_future(self._send(queue, writer, conn))
        conn.tasks.append(sender)
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                if self._rule("swallow", conn.pid):
                    conn.tainted = True
                    continue
                delay = self._delay_of(conn.pid)
                if direction == "up":
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
                await queue.put((time.monotonic() + delay / 1000.0, data))
        except (ConnectionError, OSError):
            pass
        finally:
            await queue.put(None)
            try:
                await sender
            except asyncio.CancelledError:
                pass
            # One side finished: end the connection both ways (a half-open
            # AMQP or ZooKeeper connection is of no use to anyone).
            conn.abort() if direction == "down" else _close(writer)

    @staticmethod
    async def _send(queue: asyncio.Queue, writer: asyncio.StreamWriter, conn: _Conn) -> None:
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            conn.abort()


def _pids(pids) -> frozenset | None:
    if pids is None:
        return None
    if isinstance(pids, int):
        return frozenset([pids])
    return frozenset(int(p) for p in pids)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a reset (SO_LINGER 0), as a refused or dropped link looks."""
    sock = writer.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        writer.transport.abort()
    except Exception:
        pass


def _close(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
    except Exception:
        pass


class ProxyHub:
    """One asyncio loop in a daemon thread running every proxy of a test."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.proxies: dict[str, Proxy] = {}
        self._thread = threading.Thread(target=self._run, name="chaos-proxies", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, fn, timeout: float = 10.0):
        """Run fn() on the loop and return its result."""
        if threading.current_thread() is self._thread:
            return fn()
        fut: Future = Future()

        def run():
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                fut.set_exception(exc)
        self.loop.call_soon_threadsafe(run)
        return fut.result(timeout)

    def run(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def add(self, name: str, upstream: tuple[str, int], port: int | None = None) -> Proxy:
        """A proxy listening on 127.0.0.1:`port` (a free one by default)."""
        from bus.ports import free_port
        for attempt in range(5):
            p = Proxy(self, name, upstream, port or free_port())
            try:
                self.run(p._start())
            except OSError:
                if port or attempt == 4:
                    raise
                continue
            self.proxies[name] = p
            return p
        raise RuntimeError("unreachable")

    def heal_all(self) -> None:
        for p in self.proxies.values():
            p.heal()

    def close(self) -> None:
        async def drain():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        try:
            for p in self.proxies.values():
                self.run(p._stop())
            self.run(drain())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            if not self._thread.is_alive():
                self.loop.close()
