"""A small, strict HTTP/1.1 request reader and response writer over a plain
socket. Limits are enforced while reading: a head larger than the cap, a body
larger than the cap, a malformed request line or header, or a client that
sends too slowly ends in an HttpError (a 4xx answer, then the connection is
closed)."""
from __future__ import annotations

import json
import re
import socket
import struct
import time
from dataclasses import dataclass, field

REASONS = {
    100: "Continue", 200: "OK", 201: "Created", 202: "Accepted", 204: "No Content",
    301: "Moved Permanently", 302: "Found", 304: "Not Modified",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 411: "Length Required",
    413: "Content Too Large", 414: "URI Too Long", 415: "Unsupported Media Type",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_TARGET = re.compile(rb"^[\x21-\x7e]+$")
_VERSION = re.compile(rb"^HTTP/1\.[01]$")
MAX_HEADERS = 100


class HttpError(Exception):
    """A request that cannot be served: answer `status` and close."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class ClientGone(Exception):
    """The client closed the connection (or went idle) between requests."""


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    # lower-cased name -> value (the last one wins; repeated names are joined where that is legal)
    h: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def keep_alive(self) -> bool:
        conn = self.h.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


RECV_SLICE = 0.25   # the kernel receive timeout of a client socket: how often a blocked read looks at the clock


def kernel_timeouts(sock: socket.socket, recv: float, send: float) -> None:
    """Make `sock` blocking, with its timeouts kept by the kernel
    (SO_RCVTIMEO/SO_SNDTIMEO; a timed-out call raises BlockingIOError).

    Python's own socket timeouts cost a poll() before every recv and send,
    each a GIL release: with 16 busy connection threads that doubled the
    gateway's context switches and system time per request."""
    sock.settimeout(None)
    for opt, seconds in ((socket.SO_RCVTIMEO, recv), (socket.SO_SNDTIMEO, send)):
        sec = int(seconds)
        sock.setsockopt(socket.SOL_SOCKET, opt, struct.pack("ll", sec, max(1, int((seconds - sec) * 1e6))))


class Reader:
    """Reads requests off one connection, keeping bytes that arrive early
    (pipelining) for the next request. It makes the socket blocking, with a
    kernel receive timeout of RECV_SLICE and a send timeout of read_timeout;
    waits longer than a slice are loops of slices against a deadline."""

    def __init__(self, sock: socket.socket, *, max_header_bytes: int, max_body_bytes: int, read_timeout: float):
        self.sock = sock
        self.buf = bytearray()
        self.max_header = max_header_bytes
        self.max_body = max_body_bytes
        self.read_timeout = read_timeout
        kernel_timeouts(sock, RECV_SLICE, read_timeout)

    def _recv(self, deadline: float) -> bytes:
        """One recv; raises socket.timeout once `deadline` has passed."""
        while True:
            if time.monotonic() >= deadline:  # also when bytes trickle in faster than a slice
                raise socket.timeout()
            try:
                return self.sock.recv(65536)
            except BlockingIOError:  # a slice ran out
                pass

    def wait_readable(self, timeout: float) -> bool:
        """True when a request has started to arrive within `timeout`
        (rounded up to a slice); False on timeout. Raises ClientGone when the
        client closed."""
        if self.buf:
            return True
        try:
            data = self._recv(time.monotonic() + timeout)
        except socket.timeout:
            return False
        except OSError:
            raise ClientGone() from None
        if not data:
            raise ClientGone()
        self.buf += data
        return True

    def read_request(self, send_continue) -> Request:
        deadline = time.monotonic() + self.read_timeout
        # Tolerate empty lines before a request line (RFC 9112 2.2).
        while True:
            if self.buf[:1] in (b"\r", b"\n"):
                stripped = self.buf.lstrip(b"\r\n")
                del self.buf[:len(self.buf) - len(stripped)]
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self.buf) > self.max_header:
                raise HttpError(431, f"request head larger than {self.max_header} bytes")
            if self.buf and not self.buf[:1].isalpha():
                raise HttpError(400, "malformed request line")
            try:
                data = self._recv(deadline)
            except socket.timeout:
                if not self.buf:
                    raise ClientGone() from None
                raise HttpError(408, "request head not received in time") from None
            except OSError:
                raise ClientGone() from None
            if not data:
                if self.buf:
                    raise HttpError(400, "connection closed inside the request head")
                raise ClientGone()
            self.buf += data
        if end > self.max_header:
            raise HttpError(431, f"request head larger than {self.max_header} bytes")
        head = bytes(self.buf[:end])
        del self.buf[:end + 4]
        req = parse_head(head)
        length = self._body_length(req)
        if length:
            if req.h.get("expect", "").lower() == "100-continue" and len(self.buf) < length:
                send_continue()
            while len(self.buf) < length:
                try:
                    data = self._recv(deadline)
                except socket.timeout:
                    raise HttpError(408, "request body not received in time") from None
                except OSError:
                    raise ClientGone() from None
                if not data:
                    raise HttpError(400, "connection closed inside the request body")
                self.buf += data
            req.body = bytes(self.buf[:length])
            del self.buf[:length]
        return req

    def _body_length(self, req: Request) -> int:
        if "transfer-encoding" in req.h:
            raise HttpError(411, "chunked request bodies are not accepted; send Content-Length")
        raw = req.h.get("content-length")
        if raw is None:
            return 0
        values = {v.strip() for v in raw.split(",")}
        if len(values) != 1:
            raise HttpError(400, "conflicting Content-Length")
        value = values.pop()
        if not value.isdigit() or len(value) > 18:
            raise HttpError(400, "bad Content-Length")
        n = int(value)
        if n > self.max_body:
            raise HttpError(413, f"body larger than {self.max_body} bytes")
        return n


def parse_head(head: bytes) -> Request:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not _TARGET.match(parts[1]) or not _VERSION.match(parts[2]):
        if len(parts) == 3 and parts[2].startswith(b"HTTP/") and _TOKEN.match(parts[0]):
            raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are served")
        raise HttpError(400, "malformed request line")
    method, target, version = parts[0].decode(), parts[1].decode(), parts[2].decode()
    if not (target.startswith("/") or target == "*"):
        raise HttpError(400, "request target must be an absolute path")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, f"more than {MAX_HEADERS} header fields")
    headers: list[tuple[str, str]] = []
    h: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise HttpError(400, "malformed header field")
        try:
            v = value.strip(b" \t").decode("latin-1")
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
            raise HttpError(400, "malformed header field") from None
        if "\r" in v or "\n" in v or "\x00" in v:
            raise HttpError(400, "malformed header field")
        n = name.decode().lower()
        headers.append((name.decode(), v))
        if n in h and n in ("content-length", "cookie", "forwarded", "x-forwarded-for", "accept", "connection"):
            h[n] = h[n] + ("; " if n == "cookie" else ", ") + v
        elif n in h and n == "host":
            raise HttpError(400, "more than one Host header")
        else:
            h[n] = v
    if version == "HTTP/1.1" and "host" not in h:
        pass  # lenient: RFC says 400, but tools without Host are common behind a proxy
    return Request(method=method, target=target, version=version, headers=headers, h=h)


def render(status: int, headers: list[tuple[str, str]], body: bytes, *, keep_alive: bool,
           head_only: bool = False) -> bytes:
    out = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n"]
    for k, v in headers:
        out.append(f"{k}: {v}\r\n")
    if status >= 200 and status not in (204, 304) and not (head_only and any(
            k.lower() == "content-length" for k, _ in headers)):
        out.append(f"Content-Length: {len(body)}\r\n")
    out.append("Connection: keep-alive\r\n" if keep_alive else "Connection: close\r\n")
    out.append("\r\n")
    data = "".join(out).encode("latin-1", "replace")
    if head_only or status in (204, 304) or status < 200:
        return data
    return data + body


def json_body(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def error_response(status: int, message: str, request_id: str | None = None, *, keep_alive: bool = False) -> bytes:
    headers = [("Content-Type", "application/json")]
    if request_id:
        headers.append(("X-Request-Id", request_id))
    return render(status, headers, json_body({"error": message}), keep_alive=keep_alive)
