"""Tenants, developers and the db routes' tenant rules on the orchestrator
(paas.md Accounts and Data isolation), against the real RabbitMQ (and its
management API), ZooKeeper and DB workers: one `python -m orchestrator` for
the module, driven over HTTP on loopback, with the gateway's identity
headers where a test plays the gateway. Broker accounts are global on the
broker (not per cluster namespace), so the module removes every one it made.

Tests that need the workers' platform ops `storage` and `drop_tenant` come
last; they skip only while the workers refuse those ops as unknown."""
from __future__ import annotations

import json
import os
import dataclasses
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pika
import pytest

from bus import accounts, ops, tenancy
from bus.broker_admin import BrokerAdmin
from bus.client import DBClient, connection_params
from bus.errors import DBError
from harness import ROOT, LocalCluster, wait_for
from test_orchestrator import Orch, cleanup

MADE = ["acme", "beta", "gamma", "clitest", "dev1", "dev-2", "bad-broker", "rideshare", "toystore"]


def http(port: int, method: str, path: str, body=None, *, raw: bytes | None = None, headers=None,
         timeout: float = 30.0):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def as_tenant(t: str | None) -> dict:
    h = {"X-Stratus-Role": "tenant", "X-Stratus-Subject": t or ""}
    if t is not None:
        h["X-Stratus-Tenant"] = t
    return h


ADMIN = {"X-Stratus-Role": "admin", "X-Stratus-Subject": "admin"}
DEVELOPER = {"X-Stratus-Role": "developer", "X-Stratus-Subject": "dev1"}
USER = {"X-Stratus-Role": "user", "X-Stratus-Subject": "bob", "X-Stratus-Tenant": "rideshare"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cluster = LocalCluster(tmp_path_factory.mktemp("tenants"), max_slaves=0)
    orch = None
    admin = BrokerAdmin(cluster.settings)
    try:
        orch = Orch(cluster)
        orch.wait_healthy_cluster(0)
        db = cluster.client(name="test-platform")
        yield cluster, orch, admin, db
    finally:
        if orch is not None:
            cleanup(cluster, orch)
        for name in MADE:
            admin.delete_user(tenancy.broker_user(cluster.name, name))
        cluster.close()


def create(orch, name: str, headers=None):
    return http(orch.port, "POST", "/api/v1/tenants", {"name": name}, headers=headers)


def refused(ch_action) -> int | None:
    """The reply code that closed the channel, or None if it stayed open."""
    try:
        ch_action()
    except pika.exceptions.ChannelClosedByBroker as exc:
        return exc.reply_code
    return None


# --- accounts ---------------------------------------------------------------------------
def test_create_tenant_makes_a_confined_broker_account(env):
    cluster, orch, admin, db = env
    status, body = create(orch, "acme")
    assert status == 201, body
    assert body["name"] == "acme" and isinstance(body["password"], str) and len(body["password"]) >= 16
    user = tenancy.broker_user(cluster.name, "acme")
    assert admin.get_user(user) is not None
    assert cluster.zk.exists(cluster.paths.tenant("acme")) is not None
    node = json.loads(cluster.zk.get(cluster.paths.tenant("acme"))[0])
    assert node["name"] == "acme" and "password" not in json.dumps(node)

    # the account row: the owner's password as a scrypt hash, the broker password kept
    acct = accounts.get(db, "acme")
    assert acct["kind"] == "tenant" and acct["password"].startswith("scrypt$")
    assert tenancy.check_password(body["password"], acct["password"])
    url = accounts.tenant_amqp_url(cluster.settings.amqp_url, cluster.name, "acme", acct["broker_password"])

    # it connects with its broker password...
    conn = pika.BlockingConnection(connection_params(url))
    try:
        names = cluster.names
        # ...may declare its own reply queues and publish to the request exchange...
        ch = conn.channel()
        own = names.response_queue("acme.test")
        ch.queue_declare(own, auto_delete=True)
        ch.basic_publish(names.request_exchange, "read", b"{}", pika.BasicProperties(user_id=user))
        ch.queue_delete(own)
        ch.close()
        # ...and nothing else: each of these closes its channel with 403 ACCESS_REFUSED
        attempts = {
            "declare a cluster queue": lambda c: c.queue_declare(names.read_queue + ".mine"),
            "consume readQ": lambda c: c.basic_consume(names.read_queue, lambda *a: None),
            "consume writeQ": lambda c: c.basic_consume(names.write_queue, lambda *a: None),
            "consume another tenant's replies": lambda c: c.queue_declare(names.response_queue("beta.x")),
            "read the replication stream": lambda c: c.basic_consume(names.log_stream, lambda *a: None),
            "publish to the default exchange": lambda c: (
                c.basic_publish("", names.write_queue, b"{}", pika.BasicProperties(user_id=user)),
                c.queue_declare(own, auto_delete=True)),   # a round trip, to see the close
            "publish to the replication log": lambda c: (
                c.basic_publish(names.sync_exchange, "", b"{}", pika.BasicProperties(user_id=user)),
                c.queue_declare(own, auto_delete=True)),
        }
        for what, attempt in attempts.items():
            ch = conn.channel()
            code = refused(lambda: attempt(ch))
            assert code == 403, (what, code)
    finally:
        conn.close()

    # a tenant's own client reaches the database as itself
    tdb = DBClient(dataclasses.replace(cluster.settings, amqp_url=url), name="acme-app")
    try:
        assert tdb.tenant == "acme" and not tdb.is_platform
        tdb.write([ops.create_table("notes", [ops.column("id", "integer", nullable=False)], ["id"])])
        lsn = tdb.write([ops.insert("notes", {"id": 1})]).lsn
        assert tdb.read(ops.select("notes"), min_lsn=lsn).result == [{"id": 1}]
    finally:
        tdb.close()
    # the password is in no log line
    assert body["password"] not in cluster.log("orch")
    assert acct["broker_password"] not in cluster.log("orch")


def test_bad_names_and_duplicates(env):
    cluster, orch, admin, db = env
    for name in ["A", "1abc", "a", "x" * 33, "ab_c", "ab.c", "admin", "platform", "stratus", "", None, 5,
                 ["acme"], "acme\n", "ACME"]:
        status, body = create(orch, name)
        assert status == 400 and body["error"], (name, status, body)
    for raw in [b"{nope", b"[1]", b"", b"\"acme\""]:
        status, body = http(orch.port, "POST", "/api/v1/tenants", raw=raw)
        assert status == 400 and body["error"], (raw, status, body)
    assert create(orch, "beta")[0] == 201
    status, body = create(orch, "beta")
    assert status == 409 and "beta" in body["error"]
    # one name space for tenants and developers
    status, body = http(orch.port, "POST", "/api/v1/developers", {"username": "beta"})
    assert status == 409, body
    # a failed create left nothing behind: no broker account for a refused name
    assert admin.get_user(tenancy.broker_user(cluster.name, "admin")) is None


def test_developers(env):
    cluster, orch, admin, db = env
    status, body = http(orch.port, "POST", "/api/v1/developers", {"username": "dev1"})
    assert status == 201 and body["username"] == "dev1" and isinstance(body["password"], str), body
    acct = accounts.get(db, "dev1")
    assert acct["kind"] == "developer" and acct["broker_password"] is None
    assert accounts.verify(db, "dev1", body["password"]) is not None
    assert admin.get_user(tenancy.broker_user(cluster.name, "dev1")) is None   # developers get no broker account
    assert cluster.zk.exists(cluster.paths.tenant("dev1")) is None
    assert http(orch.port, "POST", "/api/v1/developers", {"username": "dev1"})[0] == 409
    for bad in [{"username": "Dev"}, {"username": "admin"}, {"name": "dev-2"}, {}]:
        status, resp = http(orch.port, "POST", "/api/v1/developers", bad)
        assert status == 400 and resp["error"], (bad, status, resp)
    assert body["password"] not in cluster.log("orch")


def test_accounts_routes_are_for_the_admin_only(env):
    cluster, orch, admin, db = env
    for headers in (as_tenant("acme"), DEVELOPER, USER, {"X-Stratus-Role": "nobody"}):
        for method, path, body in [("POST", "/api/v1/tenants", {"name": "gamma"}), ("GET", "/api/v1/tenants", None),
                                   ("DELETE", "/api/v1/tenants/acme", None),
                                   ("POST", "/api/v1/developers", {"username": "dev-2"})]:
            status, resp = http(orch.port, method, path, body, headers=headers)
            assert status == 403 and resp["error"], (headers, method, path, status, resp)
    # nothing was made or removed
    assert cluster.zk.exists(cluster.paths.tenant("gamma")) is None
    assert cluster.zk.exists(cluster.paths.tenant("acme")) is not None
    assert accounts.get(db, "dev-2") is None
    # the gateway's admin identity may
    status, body = create(orch, "gamma", headers=ADMIN)
    assert status == 201, body


def test_a_failed_step_leaves_no_half_made_tenant(tmp_path):
    """A broker whose management API is not reachable: 503, and the account
    row made before it is removed again."""
    c = LocalCluster(tmp_path, max_slaves=0)
    orch = None
    try:
        orch = Orch(c, STRATUS_AMQP_MANAGEMENT_URL="http://127.0.0.1:1")
        orch.wait_healthy_cluster(0)
        status, body = create(orch, "bad-broker")
        assert status == 503 and "broker" in body["error"], body
        db = c.client(name="check")
        assert accounts.get(db, "bad-broker") is None
        assert c.zk.exists(c.paths.tenant("bad-broker")) is None
    finally:
        if orch is not None:
            cleanup(c, orch)
        c.close()


# --- the db routes ----------------------------------------------------------------------
def test_db_routes_tenant_field(env):
    cluster, orch, admin, db = env
    p = orch.port
    table = ops.create_table("kv", [ops.column("k", "text", nullable=False)], ["k"])
    # the admin names a tenant, or acts for rideshare without one
    status, body = http(p, "POST", "/api/v1/db/write", {"ops": [table], "tenant": "acme"})
    assert status == 200, body
    status, body = http(p, "POST", "/api/v1/db/write", {"ops": [ops.insert("kv", {"k": "a"})], "tenant": "acme"},
                        headers=ADMIN)
    assert status == 200, body
    lsn = body["lsn"]
    status, body = http(p, "POST", "/api/v1/db/read", {**ops.select("kv"), "min_lsn": lsn, "tenant": "acme"})
    assert status == 200 and body == [{"k": "a"}], body
    assert http(p, "POST", "/api/v1/db/write", {"ops": [table]})[0] == 200               # rideshare
    assert http(p, "POST", "/api/v1/db/write", {"ops": [table], "tenant": "toystore"})[0] == 200

    # a tenant owner acts for its own tenant, with or without naming it
    status, body = http(p, "POST", "/api/v1/db/read", {**ops.select("kv"), "min_lsn": lsn}, headers=as_tenant("acme"))
    assert status == 200 and body == [{"k": "a"}], body
    status, body = http(p, "POST", "/api/v1/db/read", {**ops.select("kv"), "min_lsn": lsn, "tenant": "acme"},
                        headers=as_tenant("acme"))
    assert status == 200 and body == [{"k": "a"}], body

    cases = [
        # (path, body, headers, status)
        ("/api/v1/db/read", {**ops.select("kv"), "tenant": "beta"}, as_tenant("acme"), 403),
        ("/api/v1/db/read", {**ops.select("kv"), "tenant": 7}, as_tenant("acme"), 403),
        ("/api/v1/db/write", {"ops": [table], "tenant": "beta"}, as_tenant("acme"), 403),
        ("/api/v1/db/clear", {"tenant": "beta"}, as_tenant("acme"), 403),
        ("/api/v1/db/clear", {"tenant": "rideshare"}, as_tenant("acme"), 403),
        ("/api/v1/db/read", ops.select("kv"), as_tenant(None), 403),
        ("/api/v1/db/read", ops.select("kv"), DEVELOPER, 403),
        ("/api/v1/db/read", ops.select("kv"), USER, 403),
        ("/api/v1/db/write", {"ops": [table]}, {"X-Stratus-Role": ""}, 403),
        ("/api/v1/db/read", {**ops.select("kv"), "tenant": "nosuch"}, None, 404),
        ("/api/v1/db/write", {"ops": [table], "tenant": "nosuch"}, ADMIN, 404),
        ("/api/v1/db/clear", {"tenant": "nosuch"}, None, 404),
        ("/api/v1/db/read", {**ops.select("kv"), "tenant": "../acme"}, None, 404),
        ("/api/v1/db/read", ops.select("kv"), as_tenant("nosuch"), 404),   # a deleted tenant's token
        ("/api/v1/db/read", {**ops.select("kv"), "tenant": 7}, None, 400),
        ("/api/v1/db/read", {**ops.select("kv"), "tenant": None}, None, 200),  # null: the default
        ("/api/v1/db/read", {**ops.select(accounts.TABLE), "tenant": "platform"}, None, 403),
        ("/api/v1/db/write", {"ops": [ops.delete(accounts.TABLE, [])], "tenant": "platform"}, ADMIN, 403),
        ("/api/v1/db/clear", {"tenant": "platform"}, None, 403),
        ("/api/v1/db/clear", b"{oops", None, 400),
    ]
    for path, body, headers, expected in cases:
        raw = body if isinstance(body, bytes) else None
        status, resp = http(p, "POST", path, None if raw else body, raw=raw, headers=headers)
        assert status == expected, (path, body, headers, status, resp)
        if expected != 200:
            assert isinstance(resp, dict) and resp.get("error"), resp
    # acme's table is acme's: beta has none of that name
    status, body = http(p, "POST", "/api/v1/db/read", {**ops.select("kv"), "tenant": "beta"})
    assert status == 400 and "kv" in body["error"], body
    # nothing of that changed acme's table
    status, body = http(p, "POST", "/api/v1/db/read", {**ops.select("kv"), "min_lsn": lsn, "tenant": "acme"})
    assert body == [{"k": "a"}], body

    # db/clear: the tenant's own, by its owner
    status, body = http(p, "POST", "/api/v1/db/clear", headers=as_tenant("acme"))
    assert status == 200 and body == {}, body
    after = http(p, "POST", "/api/v1/db/read", {**ops.select("kv"), "tenant": "acme", "min_lsn": lsn + 1})
    assert after == (200, []), after
    assert http(p, "POST", "/api/v1/db/clear", {"tenant": "acme"})[0] == 200


# --- the CLI ----------------------------------------------------------------------------
def stratus(orch, *args, timeout: float = 60.0, **env):
    e = {**os.environ, "STRATUS_ORCHESTRATOR_URL": f"http://127.0.0.1:{orch.port}", **env}
    r = subprocess.run([sys.executable, "-m", "stratus.cli", *args], cwd=ROOT, env=e, capture_output=True,
                       text=True, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def test_cli_create_and_errors(env):
    cluster, orch, admin, db = env
    code, out, err = stratus(orch, "tenant", "create", "clitest")
    assert code == 0, err
    password = out.split("password:")[1].split()[0]
    assert accounts.verify(db, "clitest", password) is not None
    assert admin.get_user(tenancy.broker_user(cluster.name, "clitest")) is not None
    code, out, err = stratus(orch, "tenant", "create", "clitest")
    assert code == 1 and "409" in err and "exists" in err and password not in out + err
    code, out, err = stratus(orch, "tenant", "create", "Bad_Name")
    assert code == 1 and "400" in err and "a-z" in err
    code, out, err = stratus(orch, "tenant", "frobnicate")
    assert code == 2 and "invalid choice" in err
    code, out, err = stratus(orch, "tenant", "list", STRATUS_ORCHESTRATOR_URL="http://127.0.0.1:1")
    assert code == 1 and "cannot reach the orchestrator" in err


# --- stratus up ---------------------------------------------------------------------------
def test_up_creates_the_built_in_tenants_once(env):
    from stratus import up
    cluster, orch, admin, db = env
    settings = dataclasses.replace(cluster.settings, orchestrator_port=orch.port)
    assert up.ensure_tenants(settings) == {"rideshare": "created", "toystore": "created"}
    for name in up.BUILT_IN_TENANTS:
        path = up.password_file(settings, name)
        assert path.stat().st_mode & 0o777 == 0o600
        assert accounts.verify(db, name, path.read_text().strip()) is not None
    first = up.password_file(settings, "rideshare").read_text()
    assert up.ensure_tenants(settings) == {"rideshare": "exists", "toystore": "exists"}   # a second `up`
    assert up.password_file(settings, "rideshare").read_text() == first

    env_ = up.tenant_env(settings, "toystore")
    assert env_["STRATUS_TENANT"] == "toystore"
    assert tenancy.broker_user(cluster.name, "toystore") in env_["STRATUS_AMQP_URL"]
    assert env_["STRATUS_AMQP_URL"] != settings.amqp_url
    tdb = DBClient(dataclasses.replace(settings, amqp_url=env_["STRATUS_AMQP_URL"], tenant="toystore"), name="shop")
    try:
        assert tdb.tenant == "toystore" and not tdb.is_platform
        tdb.write([ops.create_table("t", [ops.column("id", "integer", nullable=False)], ["id"])])
    finally:
        tdb.close()
    with pytest.raises(LookupError):
        up.tenant_env(settings, "dev1", db=db)     # a developer, not a tenant
    with pytest.raises(LookupError):
        up.tenant_env(settings, "nosuch", db=db)
    # the orchestrator down: ensure_tenants reports it in time
    gone = dataclasses.replace(settings, orchestrator_port=1, orchestrator_url="")
    t0 = time.monotonic()
    outcome = up.ensure_tenants(gone, ["acme"], timeout=2)
    assert "cannot reach the orchestrator" in outcome["acme"] and time.monotonic() - t0 < 10


# --- what needs the workers' storage and drop_tenant ops (last) -------------------------
def needs_op(status: int, body, op: str) -> None:
    if status in (400, 503) and isinstance(body, dict) and f"unknown operation '{op}'" in body.get("error", ""):
        pytest.skip(f"the workers do not know the {op!r} op yet")


def test_list_shows_storage(env):
    cluster, orch, admin, db = env
    status, body = http(orch.port, "GET", "/api/v1/tenants")
    needs_op(status, body, "storage")
    assert status == 200, body
    by_name = {t["name"]: t for t in body}
    assert {"acme", "beta", "gamma"} <= set(by_name) and "dev1" not in by_name
    for t in body:
        assert set(t) == {"name", "apps", "instances", "storage_bytes"} and t["apps"] == 0 and t["instances"] == 0
        assert isinstance(t["storage_bytes"], int) and t["storage_bytes"] >= 0
    assert "password" not in json.dumps(body)
    code, out, err = stratus(orch, "tenant", "list")
    assert code == 0 and "acme" in out and "storage" in out.lower(), (out, err)


def test_delete_tenant(env):
    cluster, orch, admin, db = env
    p = orch.port
    user = tenancy.broker_user(cluster.name, "beta")
    acct = accounts.get(db, "beta")
    url = accounts.tenant_amqp_url(cluster.settings.amqp_url, cluster.name, "beta", acct["broker_password"])
    conn = pika.BlockingConnection(connection_params(url))   # one of its instances, connected
    try:
        status, body = http(p, "DELETE", "/api/v1/tenants/beta")
        needs_op(status, body, "drop_tenant")
        assert status == 200 and body == {}, body
        assert admin.get_user(user) is None
        assert accounts.get(db, "beta") is None
        assert cluster.zk.exists(cluster.paths.tenant("beta")) is None

        def closed():
            try:
                conn.process_data_events(time_limit=0.2)
            except pika.exceptions.AMQPError:
                return True
            return not conn.is_open
        wait_for(closed, 20, 0.2, what="the deleted tenant's connection to be closed")
    finally:
        if conn.is_open:
            conn.close()
    assert http(p, "DELETE", "/api/v1/tenants/beta")[0] == 404
    for name in ["nosuch", "dev1", "platform", "Bad_Name"]:
        status, body = http(p, "DELETE", f"/api/v1/tenants/{name}")
        assert status == 404 and body["error"], (name, status, body)
    # the db routes no longer act for it
    assert http(p, "POST", "/api/v1/db/read", {**ops.select("kv"), "tenant": "beta"})[0] == 404
    # and the name is free again
    status, body = create(orch, "beta")
    assert status == 201, body

    # the CLI
    code, out, err = stratus(orch, "tenant", "delete", "clitest")
    assert code == 0 and "clitest" in out, err
    assert admin.get_user(tenancy.broker_user(cluster.name, "clitest")) is None
    code, out, err = stratus(orch, "tenant", "delete", "clitest")
    assert code == 1 and "404" in err


def test_delete_drops_the_tenants_tables(env):
    cluster, orch, admin, db = env
    p = orch.port
    table = ops.create_table("gone", [ops.column("k", "text", nullable=False)], ["k"])
    lsn = http(p, "POST", "/api/v1/db/write", {"ops": [table, ops.insert("gone", {"k": "x"})], "tenant": "gamma"})[1]
    status, body = http(p, "DELETE", "/api/v1/tenants/gamma")
    needs_op(status, body, "drop_tenant")
    assert status == 200, body
    assert create(orch, "gamma")[0] == 201
    status, body = http(p, "POST", "/api/v1/db/read", {**ops.select("gone"), "tenant": "gamma",
                                                      "min_lsn": lsn["lsn"]})
    assert status == 400 and "gone" in body["error"], body   # an unknown table of the new gamma
    try:
        db.read(ops.select("gone"), tenant="gamma", min_lsn=lsn["lsn"])
        raise AssertionError("the dropped table is still there")
    except DBError as exc:
        assert exc.status == 400


# --- names the platform keeps ---------------------------------------------------------------
def test_rideshare_refuses_a_reserved_username_and_a_tenant_cannot_take_a_users_name(env):
    """Logins look at the admin, then platform accounts (with the account's own
    password only), then RideShare's users: `admin` is refused as a RideShare
    name; an existing tenant's name is not (the users service reads no
    platform state, and test_builtin_confined logs both in, each with its
    role); a new account under a RideShare user's name is refused (409)."""
    import requests
    from bus.ports import free_port
    cluster, orch, admin, db = env
    port = free_port()
    cluster.spawn("users-reserved", ["-m", "users"], STRATUS_USERS_PORT=port)
    url = f"http://127.0.0.1:{port}/api/v1/users"
    def up():
        try:
            return requests.get(url, timeout=1).status_code in (200, 204)
        except requests.RequestException:
            return False
    wait_for(up, 30, what="the users service")
    MADE.append("taken")
    assert create(orch, "taken")[0] == 201
    pw = "a" * 40
    for name in ("admin", "platform", "stratus"):
        r = requests.put(url, json={"username": name, "password": pw}, timeout=10)
        assert r.status_code == 400 and "reserved" in r.json()["error"], (name, r.text)
    assert requests.put(url, json={"username": "taken", "password": pw}, timeout=10).status_code == 201
    assert create(orch, "taken")[0] == 409   # the tenant exists; it is not replaced by the user
    assert requests.put(url, json={"username": "rider-7", "password": pw}, timeout=10).status_code == 201
    status, body = create(orch, "rider-7")
    assert status == 409, body
    assert admin.get_user(tenancy.broker_user(cluster.name, "rider-7")) is None
