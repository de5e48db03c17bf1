"""bus/broker_admin.py and bus/brokers.py management_urls: the management
API list of STRATUS_AMQP_MANAGEMENT_URL and the failover between its nodes.

No mocks: each "node" is a real HTTP server on 127.0.0.1 answering like
RabbitMQ's management API (users and permissions, basic auth), a dead node
is a port nobody listens on (connection refused), and a hung node a socket
that listens but never answers (the kernel completes the handshake, no reply
ever comes). The same against the real RabbitMQ: tests/integration/test_broker_admin_failover.py."""
from __future__ import annotations

import base64
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bus import broker_admin
from bus.broker_admin import BrokerAdmin, BrokerAdminError
from bus.brokers import default_management_url, management_urls
from bus.settings import Settings

PLATFORM_PW = "pl4tform-s3cret"
TENANT_PW = "t3nant-s3cret"
AMQP = f"amqp://adm:{PLATFORM_PW}@127.0.0.1:5672/%2F"


# --- the list ----------------------------------------------------------------------------
def test_one_url_or_several_in_order():
    assert management_urls("http://127.0.0.1:15672") == ["http://127.0.0.1:15672"]
    assert management_urls(" http://h1:15672/ ,, http://h2:15672,https://h3:15671/prefix/,http://h2:15672") == \
        ["http://h1:15672", "http://h2:15672", "https://h3:15671/prefix"]


def test_unset_is_derived_from_the_amqp_urls():
    # one node: the local management API, as before (a proxy may sit in STRATUS_AMQP_URL)
    assert default_management_url("amqp://u:p@127.0.0.1:5672/%2F") == "http://127.0.0.1:15672"
    assert default_management_url("amqp://u:p@127.0.0.1:35001/%2F") == "http://127.0.0.1:15672"
    assert default_management_url("not a url") == "http://127.0.0.1:15672"
    # several: each node's host at its AMQP port + 10000 (scripts/services.sh's layout)
    three = ",".join(f"amqp://g:p@127.0.0.1:{p}/%2F" for p in (5672, 5673, 5674))
    assert management_urls("", three) == [f"http://127.0.0.1:{p}" for p in (15672, 15673, 15674)]
    compose = "amqp://g:p@rabbitmq1:5672/%2F,amqp://g:p@rabbitmq2/%2F,amqps://g:p@[::1]/%2F"
    assert management_urls("", compose) == ["http://rabbitmq1:15672", "http://rabbitmq2:15672", "https://[::1]:15671"]
    assert "g:p" not in default_management_url(compose)


def test_settings_derive_it_when_unset_and_keep_it_when_set(monkeypatch):
    monkeypatch.delenv("STRATUS_AMQP_MANAGEMENT_URL", raising=False)
    assert Settings(amqp_url=AMQP).amqp_management_url == "http://127.0.0.1:15672"
    two = "amqp://a:b@h1:5672/%2F,amqp://a:b@h2:5673/%2F"
    assert Settings(amqp_url=two).amqp_management_url == "http://h1:15672,http://h2:15673"
    monkeypatch.setenv("STRATUS_AMQP_MANAGEMENT_URL", "http://m:1")
    assert Settings(amqp_url=two).amqp_management_url == "http://m:1"


@pytest.mark.parametrize("bad", ["ftp://h:1", "http://", "http://h:x", "http://h:1?a=b", " , "])
def test_a_malformed_list_is_refused(bad):
    with pytest.raises(ValueError) as e:
        management_urls(bad)
    assert "STRATUS_AMQP_MANAGEMENT_URL" in str(e.value)


def test_credentials_in_a_management_url_are_refused_without_showing_them():
    with pytest.raises(ValueError) as e:
        management_urls(f"http://127.0.0.1:1,http://adm:{PLATFORM_PW}@127.0.0.1:15672")
    assert "credentials" in str(e.value) and PLATFORM_PW not in str(e.value)


# --- the nodes -----------------------------------------------------------------------------
class Node(ThreadingHTTPServer):
    """One node's management API: users and permissions in memory (shared
    by the nodes of one "cluster"), or a fixed status for every request."""
    daemon_threads = True

    def __init__(self, users: dict, status: int | None = None):
        self.users, self.status, self.hits = users, status, []
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _answer(self, status: int, body=None):
        raw = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _handle(self):
        node: Node = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        node.hits.append((self.command, self.path))
        if node.status is not None:
            return self._answer(node.status, {"error": "x"})
        want = "Basic " + base64.b64encode(f"adm:{PLATFORM_PW}".encode()).decode()
        if self.headers.get("Authorization") != want:
            return self._answer(401, {"error": "not_authorised"})
        parts = self.path.split("/")          # ['', 'api', 'users', name] or [.., 'permissions', vhost, name]
        if parts[2] == "users":
            name = parts[3]
            if self.command == "PUT":
                node.users[name] = {"name": name, **json.loads(body)}
                return self._answer(201)
            if name not in node.users:
                return self._answer(404, {"error": "Object Not Found"})
            if self.command == "DELETE":
                del node.users[name]
                return self._answer(204)
            return self._answer(200, {"name": name, "tags": node.users[name]["tags"]})
        if parts[2] == "permissions":
            if parts[4] not in node.users:
                return self._answer(400, {"error": "bad_request", "reason": "no such user"})
            node.users[parts[4]]["permissions"] = json.loads(body)
            return self._answer(201)
        return self._answer(404)

    do_GET = do_PUT = do_DELETE = _handle


@pytest.fixture
def cluster():
    """A factory of nodes sharing one user table; every server closed after."""
    users, made = {}, []

    def node(status: int | None = None) -> Node:
        made.append(Node(users, status))
        return made[-1]
    broker_admin._last_good.clear()
    yield node, users
    for n in made:
        n.shutdown()
        n.server_close()


@pytest.fixture
def dead():
    """A port bound but not listening: connection refused, and nobody else gets it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


@pytest.fixture
def hung():
    """A port that accepts connections (the kernel's backlog) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


def admin(*bases: str, **kw) -> BrokerAdmin:
    return BrokerAdmin(Settings(amqp_url=AMQP, amqp_management_url=",".join(bases)), **kw)


def test_a_dead_first_node_is_passed_over_and_the_next_call_starts_where_one_answered(cluster, dead):
    node, users = cluster
    good = node()
    a = admin(dead, good.base)
    t0 = time.monotonic()
    a.put_user("stratus.c1.acme", TENANT_PW)
    a.set_permissions("stratus.c1.acme", configure="^c$", write="^w$", read="^r$")
    assert time.monotonic() - t0 < 2
    assert users["stratus.c1.acme"]["password"] == TENANT_PW
    assert users["stratus.c1.acme"]["permissions"] == {"configure": "^c$", "write": "^w$", "read": "^r$"}
    # remembered per list in the process: a new BrokerAdmin (one per API call) starts there too
    assert admin(dead, good.base).order() == [good.base, dead]
    assert admin(dead, good.base).delete_user("stratus.c1.acme") is True
    assert users == {} and admin(dead, good.base).get_user("stratus.c1.acme") is None


def test_a_5xx_moves_on_and_the_node_that_answered_is_asked_first_next_time(cluster):
    node, users = cluster
    sick, good, other = node(503), node(), node()
    a = admin(sick.base, good.base, other.base)
    a.put_user("u1", TENANT_PW)
    assert len(sick.hits) == 1 and len(good.hits) == 1 and other.hits == []
    a.put_user("u2", TENANT_PW)
    assert len(sick.hits) == 1 and len(good.hits) == 2 and other.hits == []   # not the sick one again
    assert set(users) == {"u1", "u2"}


def test_a_refusal_is_an_answer_no_other_node_is_asked(cluster):
    node, users = cluster
    refusing, good = node(401), node()
    with pytest.raises(BrokerAdminError) as e:
        admin(refusing.base, good.base).put_user("u", TENANT_PW)
    assert "401" in str(e.value) and good.hits == []
    # a 400 of a real node likewise (permissions of a user that does not exist)
    with pytest.raises(BrokerAdminError) as e:
        admin(good.base, refusing.base).set_permissions("ghost", configure="", write="", read="")
    assert "400" in str(e.value) and len(refusing.hits) == 1
    assert PLATFORM_PW not in str(e.value) and TENANT_PW not in str(e.value)


def test_a_node_that_never_answers_costs_one_node_timeout(cluster, hung):
    node, users = cluster
    good = node()
    t0 = time.monotonic()
    admin(hung, good.base, node_timeout=0.5).put_user("u", TENANT_PW)
    assert 0.4 < time.monotonic() - t0 < 2.0 and "u" in users


def test_every_node_down_names_each_failure_and_no_password(cluster, dead, hung):
    node, _ = cluster
    sick = node(500)
    with pytest.raises(BrokerAdminError) as e:
        admin(dead, hung, sick.base, node_timeout=0.3).put_user("u", TENANT_PW)
    msg = str(e.value)
    assert "not reachable" in msg, msg
    assert f"{dead}: connection refused" in msg and f"{hung}: request timed out" in msg, msg
    assert f"{sick.base}: answered 500" in msg, msg
    assert PLATFORM_PW not in msg and TENANT_PW not in msg and "adm" not in msg


def test_the_whole_call_is_bounded(hung):
    broker_admin._last_good.clear()
    others = []
    for _ in range(2):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        others.append(s)
    try:
        bases = [hung] + [f"http://127.0.0.1:{s.getsockname()[1]}" for s in others]
        t0 = time.monotonic()
        with pytest.raises(BrokerAdminError) as e:
            admin(*bases, timeout=1.0, node_timeout=0.6).get_user("u")
        took = time.monotonic() - t0
        assert took < 1.5, took
        assert "not tried" in str(e.value), str(e.value)
    finally:
        for s in others:
            s.close()
