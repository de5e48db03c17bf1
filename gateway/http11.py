"""A small, strict HTTP/1.1 request reader and response writer over a plain
socket. RequestBuffer frames requests out of received bytes (no socket, so
the server's selector and its pool threads share it); Reader reads them off
a blocking socket. Limits are enforced while reading: a head larger than the
cap, a body larger than the cap, a malformed request line, header or body
framing, or a client that sends too slowly ends in an HttpError (a 4xx
answer, then the connection is closed)."""
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
    413: "Content Too Large", 414: "URI Too Long", 415: "Unsupported Media Type", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_VERSION = re.compile(rb"HTTP/1\.[01]")
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
    """Reads requests off one blocking connection (a pool thread's side),
    keeping bytes that arrive early (pipelining) for the next request. It
    sets the socket's kernel timeouts, a receive timeout of RECV_SLICE and a
    send timeout of read_timeout, so a wait looks at the clock every slice.
    The socket may be switched to non-blocking (the server's selector) and
    back; the kernel timeouts stay."""

    def __init__(self, sock: socket.socket, *, max_header_bytes: int, max_body_bytes: int, read_timeout: float,
                 body_limit=None):
        self.sock = sock
        self.rb = RequestBuffer(max_header_bytes=max_header_bytes, max_body_bytes=max_body_bytes,
                                body_limit=body_limit)
        self.read_timeout = read_timeout
        kernel_timeouts(sock, RECV_SLICE, read_timeout)

    def next_request(self, until: float, send_continue) -> Request | None:
        """The next request, once it is complete; None when it is not by
        `until` (monotonic; the bytes read so far stay buffered). Raises
        HttpError for a bad request, ClientGone when the client closed."""
        rb = self.rb
        while True:
            req = rb.take()
            if req is not None:
                return req
            if rb.wants_continue:
                rb.continued = True
                send_continue()
            if time.monotonic() >= until:
                return None
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:  # a slice ran out
                continue
            except OSError:
                raise ClientGone() from None
            if not data:
                if rb.started:
                    raise rb.closed_error()
                raise ClientGone()
            rb.feed(data)

    def read_request(self, send_continue) -> Request:
        """The next request, which must be complete within read_timeout."""
        req = self.next_request(time.monotonic() + self.read_timeout, send_continue)
        if req is None:
            if not self.rb.started:
                raise ClientGone()
            raise self.rb.timeout_error()
        return req


class RequestBuffer:
    """The bytes received on one connection and the requests they hold: no
    socket, so the selector (non-blocking) and a pool thread (blocking)
    frame requests the same way. Framing (RFC 9112 6): a body is delimited by
    `Content-Length` (ASCII digits only) or by `Transfer-Encoding: chunked`,
    never both; anything else is an HttpError."""

    def __init__(self, *, max_header_bytes: int, max_body_bytes: int, body_limit=None):
        self.buf = bytearray()
        self.max_header = max_header_bytes
        self.max_body = max_body_bytes
        self.body_limit = body_limit      # request -> its own limit (an app package upload), or None
        self.req: Request | None = None   # a head read whose body is still arriving
        self.length = 0                   # Content-Length of that body
        self.chunked: _Chunked | None = None
        self.continued = False            # 100 Continue sent for it
        self.since: float | None = None   # when the request being read began to arrive (monotonic)

    def feed(self, data: bytes) -> None:
        if self.since is None:
            self.since = time.monotonic()
        self.buf += data

    @property
    def started(self) -> bool:
        """A request has begun to arrive."""
        return self.since is not None

    @property
    def wants_continue(self) -> bool:
        """The client waits for `100 Continue` before it sends the body."""
        return (self.req is not None and not self.continued and not self.buf
                and self.req.h.get("expect", "").lower() == "100-continue")

    def take(self) -> Request | None:
        """The next complete request, taken out of the buffer; None while it
        is incomplete. Raises HttpError for a request that cannot be served."""
        if self.req is None:
            if self.buf[:1] in (b"\r", b"\n"):  # empty lines before a request line are tolerated (RFC 9112 2.2)
                stripped = self.buf.lstrip(b"\r\n")
                del self.buf[:len(self.buf) - len(stripped)]
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > self.max_header:
                    raise HttpError(431, f"request head larger than {self.max_header} bytes")
                if self.buf and not self.buf[:1].isalpha():
                    raise HttpError(400, "malformed request line")
                return None
            if end > self.max_header:
                raise HttpError(431, f"request head larger than {self.max_header} bytes")
            req = parse_head(bytes(self.buf[:end]))
            del self.buf[:end + 4]
            limit = self.body_limit(req) if self.body_limit is not None else self.max_body
            self.length, chunked = body_framing(req, limit)
            self.chunked = _Chunked(limit, self.max_header) if chunked else None
            self.req, self.continued = req, False
        if self.chunked is not None:
            body = self.chunked.decode(self.buf)
            if body is None:
                return None
        else:
            if len(self.buf) < self.length:
                return None
            body = bytes(self.buf[:self.length])
            del self.buf[:self.length]
        req, self.req, self.chunked = self.req, None, None
        req.body = body
        self.since = time.monotonic() if self.buf else None  # a pipelined request has begun
        return req

    def timeout_error(self) -> HttpError:
        part = "head" if self.req is None else "body"
        return HttpError(408, f"request {part} not received in time")

    def closed_error(self) -> HttpError:
        part = "head" if self.req is None else "body"
        return HttpError(400, f"connection closed inside the request {part}")


_DIGITS = re.compile(r"[0-9]{1,18}")          # str.isdigit() and int() also take '²', '١٢', '1_0'
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")      # int(x, 16) also takes '0x', '_', spaces


def body_framing(req: Request, max_body: int) -> tuple[int, bool]:
    """(Content-Length, chunked) of a request, or the HttpError its framing earns."""
    te = req.h.get("transfer-encoding")
    raw = req.h.get("content-length")
    if te is not None:
        if raw is not None:
            raise HttpError(400, "both Content-Length and Transfer-Encoding")
        if req.version == "HTTP/1.0":
            raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = [c.strip().lower() for c in te.split(",")]
        if codings[-1] != "chunked" or "chunked" in codings[:-1]:
            raise HttpError(400, "Transfer-Encoding must end with chunked, applied once")
        if codings != ["chunked"]:
            raise HttpError(501, "only the chunked transfer coding is supported")
        return 0, True
    if raw is None:
        return 0, False
    values = {v.strip(" \t") for v in raw.split(",")}
    if len(values) != 1:
        raise HttpError(400, "conflicting Content-Length")
    value = values.pop()
    if not _DIGITS.fullmatch(value):
        raise HttpError(400, "bad Content-Length: not a decimal number")
    n = int(value)
    if n > max_body:
        raise HttpError(413, f"body larger than {max_body} bytes")
    return n, False


class _Chunked:
    """An incremental decoder of a chunked body (RFC 9112 7.1): each call
    consumes what it can from the buffer, so a body trickled in small pieces
    is still read in linear time. Chunk extensions and trailers are dropped."""

    MAX_LINE = 1024

    def __init__(self, max_body: int, max_trailer: int):
        self.body = bytearray()
        self.max_body, self.max_trailer = max_body, max_trailer
        self.size: int | None = None    # the data bytes of the current chunk still to come; None: a size line
        self.trailer: int | None = None  # trailer bytes so far, once the last chunk was read

    def decode(self, buf: bytearray) -> bytes | None:
        while True:
            if self.trailer is not None:
                end = buf.find(b"\r\n")
                if end < 0:
                    if self.trailer + len(buf) > self.max_trailer:
                        raise HttpError(431, "request trailer too large")
                    return None
                line = bytes(buf[:end])
                del buf[:end + 2]
                if not line:
                    return bytes(self.body)
                self.trailer += end + 2
                if self.trailer > self.max_trailer:
                    raise HttpError(431, "request trailer too large")
                if b":" not in line:
                    raise HttpError(400, "malformed trailer field")
            elif self.size is None:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > self.MAX_LINE:
                        raise HttpError(400, "bad chunk size line")
                    return None
                size = bytes(buf[:end]).split(b";", 1)[0].rstrip(b" \t")
                if end > self.MAX_LINE or not _HEX.fullmatch(size):
                    raise HttpError(400, "bad chunk size")
                del buf[:end + 2]
                n = int(size, 16)
                if len(self.body) + n > self.max_body:
                    raise HttpError(413, f"body larger than {self.max_body} bytes")
                if n == 0:
                    self.trailer = 0
                else:
                    self.size = n
            else:
                if len(buf) < self.size + 2:
                    return None
                if buf[self.size:self.size + 2] != b"\r\n":
                    raise HttpError(400, "chunk data not followed by CRLF")
                self.body += buf[:self.size]
                del buf[:self.size + 2]
                self.size = None


def parse_head(head: bytes) -> Request:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if (len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _TARGET.fullmatch(parts[1])
            or not _VERSION.fullmatch(parts[2])):
        if len(parts) == 3 and parts[2].startswith(b"HTTP/") and _TOKEN.fullmatch(parts[0]):
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
        if not sep or not _TOKEN.fullmatch(name):
            raise HttpError(400, "malformed header field")
        try:
            v = value.strip(b" \t").decode("latin-1")
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
            raise HttpError(400, "malformed header field") from None
        if "\r" in v or "\n" in v or "\x00" in v:
            raise HttpError(400, "malformed header field")
        n = name.decode().lower()
        headers.append((name.decode(), v))
        if n in h and n in ("content-length", "transfer-encoding", "cookie", "forwarded", "x-forwarded-for", "accept",
                            "connection"):
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
