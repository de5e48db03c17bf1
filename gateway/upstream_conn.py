"""A lean persistent HTTP/1.1 client connection to one upstream instance.

http.client parses every response head with the email package, which costs
more than the rest of a proxied request; this client reads the head with
plain bytes operations. It sends a request in one write, and reads bodies
delimited by Content-Length, chunked encoding, or the end of the connection."""
from __future__ import annotations

import socket

from .http11 import kernel_timeouts


class UpstreamError(Exception):
    """The connection failed after the request may have been sent."""


class BadResponse(UpstreamError):
    pass


MAX_HEAD = 64 * 1024
MAX_BODY = 64 * 1024 * 1024


class UpstreamConn:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.sock: socket.socket | None = None
        self.buf = bytearray()

    def connect(self, timeout: float, io_timeout: float) -> None:
        """Raises OSError when no connection can be made."""
        self.sock = socket.create_connection((self.host, self.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        kernel_timeouts(self.sock, io_timeout, io_timeout)

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise UpstreamError("the upstream closed the connection")
        self.buf += data

    def request(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
                ) -> tuple[int, list[tuple[str, str]], bytes, bool]:
        """(status, headers, body, keep_alive). Raises OSError/UpstreamError,
        and socket.timeout when a send or recv waits longer than io_timeout."""
        try:
            return self._request(method, target, headers, body)
        except BlockingIOError:  # the kernel timeout (SO_RCVTIMEO/SO_SNDTIMEO) ran out
            raise socket.timeout("upstream timed out") from None

    def _request(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
                 ) -> tuple[int, list[tuple[str, str]], bytes, bool]:
        lines = [f"{method} {target} HTTP/1.1"]
        lines += [f"{k}: {v}" for k, v in headers]
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.buf.clear()
        self.sock.sendall(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.sock.sendall(body)
        while True:
            status, rheaders, keep, length, chunked = self._read_head()
            if status >= 200 or status == 101:
                break  # 1xx interim answers are skipped
        if method == "HEAD" or status in (204, 304) or status < 200:
            data = b""
        elif chunked:
            data = self._read_chunked()
        elif length is not None:
            data = self._read_exact(length)
        else:
            data = self._read_to_close()
            keep = False
        if self.buf:  # bytes after the answer: the connection is not trustworthy
            keep = False
        return status, rheaders, data, keep

    def _read_head(self):
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self.buf) > MAX_HEAD:
                raise BadResponse("response head too large")
            self._fill()
        raw = bytes(self.buf[:end]).decode("latin-1")
        del self.buf[:end + 4]
        lines = raw.split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise BadResponse(f"malformed status line {lines[0][:80]!r}")
        status = int(parts[1])
        keep = parts[0] == "HTTP/1.1"
        length = None
        chunked = False
        headers = []
        for line in lines[1:]:
            k, sep, v = line.partition(":")
            if not sep:
                raise BadResponse("malformed response header")
            k, v = k.strip(), v.strip()
            lk = k.lower()
            if lk == "content-length":
                if not v.isdigit() or int(v) > MAX_BODY:
                    raise BadResponse("bad Content-Length")
                length = int(v)
            elif lk == "transfer-encoding":
                chunked = "chunked" in v.lower()
            elif lk == "connection":
                tokens = v.lower()
                if "close" in tokens:
                    keep = False
                elif "keep-alive" in tokens:
                    keep = True
            headers.append((k, v))
        return status, headers, keep, length, chunked

    def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def _read_line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[:i + 2]
                return line
            if len(self.buf) > MAX_HEAD:
                raise BadResponse("chunk line too long")
            self._fill()

    def _read_chunked(self) -> bytes:
        out = bytearray()
        while True:
            size_line = self._read_line().split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise BadResponse("bad chunk size") from None
            if size == 0:
                while self._read_line():  # trailers, up to the blank line
                    pass
                return bytes(out)
            out += self._read_exact(size)
            if len(out) > MAX_BODY:
                raise BadResponse("response body too large")
            if self._read_line():
                raise BadResponse("chunk not followed by CRLF")

    def _read_to_close(self) -> bytes:
        while True:
            data = self.sock.recv(65536)
            if not data:
                out = bytes(self.buf)
                self.buf.clear()
                return out
            self.buf += data
            if len(self.buf) > MAX_BODY:
                raise BadResponse("response body too large")
