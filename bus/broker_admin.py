"""Broker accounts through RabbitMQ's management HTTP API (the
rabbitmq_management plugin, which scripts/services.sh enables).

    PUT    /api/users/{name}                      {"password", "tags"}
    PUT    /api/permissions/{vhost}/{name}        {"configure", "write", "read"}
    DELETE /api/users/{name}
    GET    /api/users/{name}

The platform's own account (the one in STRATUS_AMQP_URL) authenticates
these calls: it is an administrator. Passwords never appear in an error or a
log line (a management URL with credentials is refused, and neither a
request's body nor an answer's is ever quoted).

Failover: STRATUS_AMQP_MANAGEMENT_URL names one management API or several,
comma-separated, one per node of the RabbitMQ cluster (bus/brokers.py
management_urls; derived from STRATUS_AMQP_URL when unset). Users,
permissions, queues and connections are cluster-wide, so any running node
answers for all of them. A call tries the nodes in turn, once each, starting
with the last node that answered (remembered per list, in the process) and
going on in the list's order:

- an answer 2xx is the result (JSON, or None when empty); 404 is None;
- any other 4xx is the broker's refusal: BrokerAdminError at once, no other
  node is asked (a refusal is an answer, and each node would say the same);
- a connection error (refused, reset, name not resolved), a timeout, or a 5xx
  moves on to the next node. Every call is idempotent (PUT, DELETE, GET), so
  a node that timed out after receiving the request does no harm;
- when every node has failed: BrokerAdminError naming each node's failure.

Bounds: connecting to one node takes at most `connect_timeout` (2.5 s), each
socket read or write after that at most `node_timeout` (5 s), and the whole
call at most `timeout` (10 s), the remaining nodes sharing what is left (a
node not tried for lack of time is named so in the error). The HTTP proxy
settings of the environment are not used: the management API is the
cluster's own."""
from __future__ import annotations

import base64
import http.client
import json
import socket
import threading
import time
import urllib.parse

from . import brokers
from .settings import Settings


class BrokerAdminError(Exception):
    """The management API refused or could not be reached."""


class _NodeFailed(Exception):
    """This node gave no answer (the next one is tried)."""


# The index of the node that answered last, per list of base URLs: a dead
# node costs a connect timeout once, not on every call of the process.
_last_good: dict[tuple[str, ...], int] = {}
_last_good_lock = threading.Lock()


class BrokerAdmin:
    def __init__(self, settings: Settings, *, timeout: float = 10.0, connect_timeout: float = 2.5,
                 node_timeout: float = 5.0):
        user, password, self.vhost = brokers.account_of(settings.amqp_url)
        self.bases = brokers.management_urls(settings.amqp_management_url, settings.amqp_url)
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.node_timeout = node_timeout

    def order(self) -> list[str]:
        """The bases in the order the next call tries them."""
        with _last_good_lock:
            start = _last_good.get(tuple(self.bases), 0) % len(self.bases)
        return self.bases[start:] + self.bases[:start]

    def _answered(self, base: str) -> None:
        with _last_good_lock:
            _last_good[tuple(self.bases)] = self.bases.index(base)

    def _call(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        what = f"{method} {path.split('/')[2]}"
        deadline = time.monotonic() + self.timeout
        failures = []
        for base in self.order():
            if time.monotonic() >= deadline:
                failures.append(f"{base}: not tried (the call's {self.timeout:g} s ran out)")
                continue
            try:
                status, raw = self._once(base, method, path, data, deadline)
            except _NodeFailed as exc:
                failures.append(f"{base}: {exc}")
                continue
            if status >= 500:
                failures.append(f"{base}: answered {status}")
                continue
            self._answered(base)
            if status == 404:
                return None
            if status >= 400 or status < 200:
                raise BrokerAdminError(f"{what}: the broker answered {status}")
            try:
                return json.loads(raw) if raw else None
            except ValueError:
                raise BrokerAdminError(f"{what}: the broker's answer ({status}) is not JSON") from None
        raise BrokerAdminError(f"the broker's management API is not reachable ({what}): " + "; ".join(failures))

    def _once(self, base: str, method: str, path: str, data: bytes | None, deadline: float) -> tuple[int, bytes]:
        """(status, body) of one node, within the bounds; _NodeFailed when it gives no answer."""
        p = urllib.parse.urlsplit(base)
        tls = p.scheme == "https"
        cls = http.client.HTTPSConnection if tls else http.client.HTTPConnection
        conn = cls(p.hostname, p.port or (443 if tls else 80),
                   timeout=max(0.01, min(self.connect_timeout, deadline - time.monotonic())))
        try:
            try:
                conn.connect()
            except (OSError, http.client.HTTPException) as exc:
                raise _NodeFailed(_reason(exc, "connect")) from None
            try:
                conn.sock.settimeout(max(0.01, min(self.node_timeout, deadline - time.monotonic())))
                conn.request(method, p.path + path, body=data,
                             headers={"Authorization": self.auth, "Content-Type": "application/json"})
                r = conn.getresponse()
                chunks = []
                while chunk := r.read(65536):
                    chunks.append(chunk)
                    if time.monotonic() > deadline:
                        raise socket.timeout("timed out")
                return r.status, b"".join(chunks)
            except (OSError, http.client.HTTPException) as exc:
                raise _NodeFailed(_reason(exc, "request")) from None
        finally:
            conn.close()

    @staticmethod
    def _q(s: str) -> str:
        return urllib.parse.quote(s, safe="")

    def put_user(self, name: str, password: str, *, tags: str = "") -> None:
        self._call("PUT", f"/api/users/{self._q(name)}", {"password": password, "tags": tags})

    def set_permissions(self, name: str, *, configure: str, write: str, read: str) -> None:
        self._call("PUT", f"/api/permissions/{self._q(self.vhost)}/{self._q(name)}",
                   {"configure": configure, "write": write, "read": read})

    def put_tenant(self, names, tenant: str, password: str) -> str:
        """A tenant's broker account with exactly its permissions
        (bus.tenancy); returns the account's name."""
        from . import tenancy
        user = tenancy.broker_user(names.cluster, tenant)
        self.put_user(user, password)
        self.set_permissions(user, **tenancy.permissions(names, tenant))
        return user

    def get_user(self, name: str) -> dict | None:
        return self._call("GET", f"/api/users/{self._q(name)}")

    def delete_user(self, name: str) -> bool:
        """True if it existed. Its connections are closed by the broker."""
        if self.get_user(name) is None:
            return False
        self._call("DELETE", f"/api/users/{self._q(name)}")
        return True

    def names(self, kind: str, prefix: str) -> list[str]:
        """Names of the vhost's `kind` ("queues" or "exchanges") that start with prefix."""
        rows = self._call("GET", f"/api/{kind}/{self._q(self.vhost)}?columns=name") or []
        return [r["name"] for r in rows if str(r.get("name", "")).startswith(prefix)]

    def close_connections_of(self, name: str) -> int:
        conns = self._call("GET", "/api/connections?columns=name,user") or []
        n = 0
        for c in conns:
            if c.get("user") == name:
                self._call("DELETE", f"/api/connections/{self._q(c['name'])}")
                n += 1
        return n


def _reason(exc: BaseException, step: str) -> str:
    """A short cause for an error message (an exception's text names at most
    a host and a port, never a request's body or header)."""
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"{step} timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"name not resolved ({exc.strerror or exc})"
    return f"{step} failed: {type(exc).__name__}" + (f" ({exc.strerror})" if getattr(exc, "strerror", None) else "")
