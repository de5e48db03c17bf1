"""Forwarding one request to an instance of a service over a pooled
keep-alive connection, with the retry rules:

- a request that fails to connect is retried once on another instance (it
  never reached the first one), whatever its method;
- an idempotent request (GET, HEAD, PUT, DELETE, OPTIONS) that fails after
  being sent (reset, closed, no answer) is also retried once elsewhere; if
  it failed on a reused pooled connection and there is no other instance,
  it is retried on a new connection to the same one;
- a POST or PATCH that may have reached the upstream is never retried: the
  client gets 502 (or 504 on a timeout)."""
from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

from .balancer import Instance, NoInstance, ServicePool
from .upstream_conn import UpstreamError

log = logging.getLogger("stratus.gateway.proxy")

IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection"})


@dataclass
class Upstream:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    instance: Instance | None
    error: str | None = None     # set when the gateway made the answer itself
    attempts: int = 1


class ConnectFailed(Exception):
    pass


def strip_hop_by_hop(headers, extra_drop: frozenset = frozenset()) -> list[tuple[str, str]]:
    named = set()
    for k, v in headers:
        if k.lower() == "connection":
            named.update(t.strip().lower() for t in v.split(","))
    return [(k, v) for k, v in headers
            if (lk := k.lower()) not in HOP_BY_HOP and lk not in named and lk not in extra_drop]


def _send(inst: Instance, cfg, method: str, target: str, headers: list[tuple[str, str]], body: bytes):
    """One attempt. Raises ConnectFailed when no connection could be made,
    or the transport error after the request may have been sent (with
    `.reused` set)."""
    conn, reused = inst.take_connection(cfg, probe=method not in IDEMPOTENT)
    if not reused:
        try:
            conn.connect(cfg.connect_timeout, cfg.upstream_timeout)
        except OSError as exc:
            conn.close()
            raise ConnectFailed(f"{type(exc).__name__}: {exc}") from exc
    try:
        status, resp_headers, data, keep = conn.request(method, target, headers, body)
    except BaseException as exc:
        conn.close()
        exc.reused = reused  # type: ignore[attr-defined]
        raise
    # The body is re-framed by the gateway; a HEAD answer keeps the length it announces.
    out_headers = strip_hop_by_hop(resp_headers, frozenset() if method == "HEAD" else frozenset({"content-length"}))
    if keep:
        inst.give_back(conn)
    else:
        conn.close()
    return status, out_headers, data


def forward(pool: ServicePool, cfg, method: str, target: str, headers: list[tuple[str, str]], body: bytes, *,
            affinity_key: str | None = None, on_retry=None, on_error=None) -> Upstream:
    tried: set[str] = set()
    last_error = "no instance"
    only_connect_failures = True
    stale: Instance | None = None   # failed on a reused connection: may be retried on a new one
    for attempt in (1, 2):
        try:
            inst = pool.pick(exclude=tried, affinity_key=affinity_key if attempt == 1 else None)
        except NoInstance:
            if attempt == 1:
                return Upstream(503, [], b"", None, error="service unavailable")
            if stale is None:
                break
            inst = stale  # the only instance: its pooled connections were dropped, so this one is new
        tried.add(inst.key)
        inst.begin()
        ok = False
        try:
            status, out_headers, data = _send(inst, cfg, method, target, headers, body)
            ok = True
            return Upstream(status, out_headers, data, inst, attempts=attempt)
        except ConnectFailed as exc:
            last_error = f"could not connect to {inst.addr}: {exc}"
            if isinstance(exc.__cause__, ConnectionRefusedError):
                # Nothing listens there any more (e.g. killed): out of rotation
                # until a health check passes. A slow connect (a full backlog)
                # is left to the health checks to judge.
                pool.mark_down(inst, str(exc))
            if on_error:
                on_error("connect")
        except socket.timeout:
            if on_error:
                on_error("timeout")
            return Upstream(504, [], b"", inst, error="upstream timed out", attempts=attempt)
        except (OSError, UpstreamError) as exc:
            last_error = f"{inst.addr}: {type(exc).__name__}: {exc}"
            only_connect_failures = False
            if on_error:
                on_error("transport")
            reused = getattr(exc, "reused", False)
            if method not in IDEMPOTENT:
                return Upstream(502, [], b"", inst, error="bad gateway: the upstream failed; the request was not retried",
                                attempts=attempt)
            if reused:
                # Likely a connection the upstream had closed: drop its
                # siblings too, so a retry here opens a new connection.
                inst.close_idle()
                stale = inst
            else:
                pool.mark_down(inst, last_error)
        finally:
            inst.end(ok)
        if attempt == 1 and on_retry:
            on_retry()
    log.warning("%s %s failed on every try: %s", method, target, last_error)
    if only_connect_failures:
        return Upstream(503, [], b"", None, error="service unavailable", attempts=2)
    return Upstream(502, [], b"", None, error="bad gateway: no upstream instance answered", attempts=2)
