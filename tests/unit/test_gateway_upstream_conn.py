"""The gateway's upstream HTTP client against a real listening socket that
answers canned bytes: Content-Length, chunked, close-delimited and 1xx
answers, keep-alive decisions, malformed answers."""
import socket
import threading

import pytest

from gateway.upstream_conn import BadResponse, UpstreamConn, UpstreamError


def serve_once(answers: list[bytes]):
    """A listener that reads one request head per canned answer, sends it,
    and closes after the last one. Returns (port, received heads)."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    got: list[bytes] = []

    def run():
        conn, _ = srv.accept()
        buf = b""
        with conn:
            for answer in answers:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                got.append(head)
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        n = int(line.split(b":")[1])
                        while len(buf) < n:
                            buf += conn.recv(65536)
                        got.append(buf[:n])
                        buf = buf[n:]
                conn.sendall(answer)
        srv.close()
    threading.Thread(target=run, daemon=True).start()
    return port, got


def connect(port):
    c = UpstreamConn("127.0.0.1", port)
    c.connect(2, 5)
    return c


def test_content_length_chunked_and_keep_alive_on_one_connection():
    port, got = serve_once([
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: x\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    ])
    c = connect(port)
    assert c.request("GET", "/a", [("Host", "h")], b"") == (200, [("Content-Length", "5"), ("X-A", "1")], b"hello", True)
    status, headers, body, keep = c.request("POST", "/b", [("Host", "h")], b'{"x":1}')
    assert (status, body, keep) == (201, b"abcde", True)
    assert got[1].startswith(b"POST /b HTTP/1.1") and b"Content-Length: 7" in got[1] and got[2] == b'{"x":1}'
    assert c.request("DELETE", "/c", [], b"")[::2] == (204, b"")
    assert c.request("GET", "/d", [], b"")[2:] == (b"ok", False)
    assert b"Content-Length" not in got[4]  # a GET without a body says nothing about length
    c.close()


def test_close_delimited_body_and_http10():
    port, _ = serve_once([b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it"])
    c = connect(port)
    status, _, body, keep = c.request("GET", "/", [], b"")
    assert (status, body, keep) == (200, b"all of it", False)


@pytest.mark.parametrize("answer", [b"NOT HTTP\r\n\r\n", b"HTTP/1.1 abc OK\r\n\r\n",
                                    b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
                                    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
                                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"])
def test_malformed_answers(answer):
    port, _ = serve_once([answer])
    c = connect(port)
    with pytest.raises(BadResponse):
        c.request("GET", "/", [], b"")


def test_closed_before_answer_and_refused():
    port, _ = serve_once([b""])
    c = connect(port)
    with pytest.raises(UpstreamError):
        c.request("GET", "/", [], b"")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    free = s.getsockname()[1]
    s.close()
    with pytest.raises(ConnectionRefusedError):
        UpstreamConn("127.0.0.1", free).connect(1, 1)
