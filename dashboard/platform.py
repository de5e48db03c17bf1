"""The dashboard's way to the platform: the platform API through the gateway
(settings.gateway_base_url()), always as the signed-in user.

Every call but the token grant carries `Authorization: Bearer <the user's
token>`, so the gateway's and the orchestrator's own access rules decide
what each account sees and may do (gateway/router.py, paas.md); the
dashboard holds no credential of its own and never calls the orchestrator's
port. A call carries `X-Request-Id: <the page's request id>.<n>`, so a page's
API calls are found in the logs by the page's request id.

    api = Platform(base_url)
    api.call("GET", "/api/v1/cluster", token=t)          -> the decoded JSON
    api.call("PUT", path, token=t, body=<file>, length=n, content_type=...)

Errors: ApiError(status, message), with the platform's JSON error message;
status None when the gateway could not be reached (or did not answer in
time). Connections are kept alive, one per thread (gunicorn threads). One
the gateway has closed while idle is replaced before a call goes on it; and
should the gateway close it just as a call was sent, an idempotent call
(GET, HEAD, PUT, PATCH, DELETE, with a body that can be sent again) goes
once more on a new one. A POST is never sent twice."""
from __future__ import annotations

import http.client
import json
import select
import threading
import urllib.parse
from typing import Any

TIMEOUT = 15.0          # seconds for one call (a package upload gets UPLOAD_TIMEOUT)
UPLOAD_TIMEOUT = 120.0
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "PATCH", "DELETE"})


class ApiError(Exception):
    def __init__(self, status: int | None, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Platform:
    def __init__(self, base_url: str, *, timeout: float = TIMEOUT):
        u = urllib.parse.urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"the gateway's URL must be http(s)://host[:port], got {base_url!r}")
        self.scheme = u.scheme
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.prefix = u.path.rstrip("/")
        self.timeout = timeout
        self._local = threading.local()

    def _conn(self, timeout: float) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            conn = self._local.conn = cls(self.host, self.port, timeout=timeout)
        if conn.sock is not None:
            try:   # an idle connection the gateway has closed reads as ready (EOF)
                stale = bool(select.select([conn.sock], [], [], 0)[0])
            except (OSError, ValueError):
                stale = True
            if stale:
                conn.close()
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        self._local.conn = None

    def call(self, method: str, path: str, *, token: str | None = None, json_body: Any = None,
             body=None, length: int | None = None, content_type: str | None = None,
             query: dict | None = None, request_id: str | None = None, timeout: float | None = None) -> Any:
        """One API call; the answer's JSON (None for an empty body).
        `body` is bytes or a readable file of `length` bytes."""
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if request_id:
            headers["X-Request-Id"] = request_id
        if json_body is not None:
            body = json.dumps(json_body).encode()
            content_type = "application/json"
        if body is not None:
            headers["Content-Type"] = content_type or "application/octet-stream"
            headers["Content-Length"] = str(length if length is not None else len(body))
        elif method in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = "0"
        target = self.prefix + path
        if query:
            clean = {k: v for k, v in query.items() if v is not None and v != ""}
            if clean:
                target += "?" + urllib.parse.urlencode(clean)
        again = method in IDEMPOTENT and (body is None or isinstance(body, (bytes, bytearray)))
        for attempt in (1, 2):
            conn = self._conn(timeout or self.timeout)
            try:
                conn.request(method, target, body=body, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                if resp.will_close:
                    self._drop()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                # The gateway closed an idle keep-alive connection: once more on a new one,
                # when the body can be sent again.
                self._drop()
                if attempt == 2 or not again:
                    raise ApiError(None, f"the platform did not answer: {exc}") from None
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                what = "did not answer in time" if isinstance(exc, TimeoutError) else f"could not be reached ({exc})"
                raise ApiError(None, f"the platform {what}") from None
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        if resp.status >= 400:
            msg = data.get("error") if isinstance(data, dict) and isinstance(data.get("error"), str) else \
                f"{resp.status} {resp.reason}"
            raise ApiError(resp.status, msg)
        return data

    def close(self) -> None:
        self._drop()
