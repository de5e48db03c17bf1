"""Broker accounts through RabbitMQ's management HTTP API (the
rabbitmq_management plugin, which scripts/services.sh enables).

    PUT    /api/users/{name}                      {"password", "tags"}
    PUT    /api/permissions/{vhost}/{name}        {"configure", "write", "read"}
    DELETE /api/users/{name}
    GET    /api/users/{name}

The platform's own account (the one in STRATUS_AMQP_URL) authenticates
these calls: it is an administrator. Passwords never appear in an error or a
log line."""
from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request

from . import brokers
from .settings import Settings


class BrokerAdminError(Exception):
    """The management API refused or could not be reached."""


class BrokerAdmin:
    def __init__(self, settings: Settings, *, timeout: float = 10.0):
        user, password, self.vhost = brokers.account_of(settings.amqp_url)
        self.base = settings.amqp_management_url.rstrip("/")
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Authorization": self.auth, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                raw = r.read()
                return json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise BrokerAdminError(f"{method} {path.split('/')[2]}: the broker answered {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise BrokerAdminError(f"the broker's management API at {self.base} is not reachable: "
                                   f"{getattr(exc, 'reason', exc)}") from None

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
