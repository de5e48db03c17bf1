"""The built-in apps need nothing but the broker (issue #22, Walls): run as
platform app instances (STRATUS_INSTANCE set, the tenant's own broker
account), the users service and the restocker open no connection to
ZooKeeper, the orchestrator, the management API or Prometheus: every such
address points at a trap listener here, which must see no connection. The
restocker's one-at-a-time role is a lease on the bus (bus/lease.py) that a
tenant's own account may take and no other tenant's may touch; the
RideShare-name rule needs no platform state (users/app.py reserved)."""
from __future__ import annotations

import dataclasses
import hashlib
import socket
import threading
import time

import pika
import pytest

from bus import accounts, ops, tenancy
from bus.broker_admin import BrokerAdmin
from bus.client import connection_params
from bus.lease import Lease
from bus.ports import free_port
from catalog.restock import read_status
from harness import wait_for
from toystore import schema

pytestmark = pytest.mark.timeout(180)


class Trap:
    """A TCP listener that counts every connection made to it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.hits += 1
            conn.close()

    def env(self) -> dict:
        """Every platform address an instance could use, other than the broker's AMQP port."""
        at = f"127.0.0.1:{self.port}"
        return {"STRATUS_ZK_HOSTS": at, "STRATUS_ORCHESTRATOR_URL": f"http://{at}",
                "STRATUS_AMQP_MANAGEMENT_URL": f"http://{at}", "STRATUS_PROMETHEUS_URL": f"http://{at}"}

    def close(self):
        self.sock.close()


@pytest.fixture
def trap():
    t = Trap()
    yield t
    t.close()


@pytest.fixture
def accounts_of(cluster):
    """Broker accounts of tenants of this test cluster: name -> STRATUS_AMQP_URL; removed at the end."""
    admin = BrokerAdmin(cluster.settings)
    made: dict[str, str] = {}

    def make(tenant: str) -> str:
        if tenant not in made:
            password = tenancy.new_password()
            admin.put_tenant(cluster.names, tenant, password)
            made[tenant] = accounts.tenant_amqp_url(cluster.settings.amqp_url, cluster.name, tenant, password)
        return made[tenant]
    yield make
    for tenant in made:
        try:
            admin.delete_user(tenancy.broker_user(cluster.name, tenant))
        except Exception:
            pass


def instance_env(tenant: str, app: str, role: str, url: str, trap: Trap, **more) -> dict:
    return {"STRATUS_TENANT": tenant, "STRATUS_APP": app, "STRATUS_ROLE": role,
            "STRATUS_INSTANCE": f"{role}-{free_port()}", "STRATUS_AMQP_URL": url, **trap.env(), **more}


# --- the lease ------------------------------------------------------------------------------
def test_a_lease_is_held_by_one_tenant_connection_at_a_time_and_no_other_tenant_can_touch_it(cluster, accounts_of):
    url = accounts_of("toystore")
    mine = dataclasses.replace(cluster.settings, amqp_url=url)
    a = Lease(mine, "restock", retry=0.2, holder="a")
    b = Lease(mine, "restock", retry=0.2, holder="b")
    a.start()
    try:
        assert a.held.wait(10), a.last_error
        b.start()
        time.sleep(1.5)   # several attempts of b's, each refused with 405
        assert not b.held.is_set() and b.last_error is None and a.held.is_set()
        assert a.queue == cluster.names.lease_queue("toystore", "restock")

        # another tenant's account can neither take it, nor delete it, nor read it
        other = pika.BlockingConnection(connection_params(accounts_of("acme")))
        try:
            for action in (lambda ch: ch.queue_declare(a.queue, exclusive=True),
                           lambda ch: ch.queue_delete(a.queue),
                           lambda ch: ch.basic_get(a.queue)):
                ch = other.channel()
                with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
                    action(ch)
                assert e.value.reply_code == 403, e.value
        finally:
            other.close()
        with pytest.raises(ValueError):
            Lease(dataclasses.replace(cluster.settings, amqp_url=accounts_of("acme")), "restock", tenant="toystore")
        assert a.held.is_set()

        # the holder lets go: the other contender takes it at once
        term = a.term
        a.release()
        assert not a.held.is_set() and not a.is_alive()
        assert b.held.wait(5), b.last_error
        assert b.term == 1 and a.term == term
    finally:
        a.release()
        b.release()


# --- the restocker as the toy store's worker role --------------------------------------------
def test_restockers_run_as_instances_need_only_the_broker(cluster, accounts_of, trap):
    cluster.bootstrap(slaves=1)
    db = cluster.client(tenant="toystore")
    schema.create_tables(db)
    db.write([ops.insert(schema.PRODUCTS, {"name": n, "price": 1.0, "quantity": 100}) for n in ("Tux", "Fox")])
    url = accounts_of("toystore")
    keys = ["r1", "r2"]
    for k in keys:
        cluster.spawn(k, ["-m", "catalog.restock"],
                      **instance_env("toystore", "toystore", "restocker", url, trap, STRATUS_RESTOCK_INTERVAL=0.5))
    holders = lambda: [k for k in keys if "restock role taken" in cluster.log(k)]   # noqa: E731
    wait_for(lambda: len(holders()) == 1, 30, what="one restocker to take the role")
    first = holders()[0]

    lsn = db.write([ops.update(schema.PRODUCTS, [ops.eq("name", "Tux")], set={"quantity": 0})]).lsn
    st = wait_for(lambda: (d := read_status(db, min_lsn=lsn, primary=True)) and d, 10, what="Tux restocked")
    assert st["last"] == ["Tux"] and st["restocked"] == 1 and st["holder"] in cluster.log(first)

    # SIGTERM: the holder gives the role up at once, the other takes it
    cluster.signal(first, 15)
    cluster.procs[first].wait(15)
    other = [k for k in keys if k != first][0]
    wait_for(lambda: "restock role taken" in cluster.log(other), 10, what="the other restocker to take over")
    db.write([ops.update(schema.PRODUCTS, [ops.eq("name", "Fox")], set={"quantity": 0})])
    new = wait_for(lambda: (d := read_status(db, primary=True)) and d["holder"] != st["holder"] and d, 10,
                   what="Fox restocked by the new holder")
    assert new["last"] == ["Fox"] and new["holder"] in cluster.log(other)
    assert "restocked " not in cluster.log(other).split("restock role taken")[0]   # it waited for the role
    assert trap.hits == 0, "a restocker connected to a platform address other than the broker"


# --- the users service and RideShare's names -------------------------------------------------
def test_users_as_an_instance_needs_only_the_broker_and_names_shadow_no_account(cluster, accounts_of, trap):
    import jwt
    import requests
    from kits.testkit import Client, start_gateway
    cluster.bootstrap(slaves=1)
    db = cluster.client()
    acme_pw, _ = accounts.create(db, "acme", "tenant")
    dev_pw, _ = accounts.create(db, "dev1", "developer")
    port = free_port()
    cluster.spawn("users", ["-m", "users"], **instance_env("rideshare", "rideshare", "users",
                                                             accounts_of("rideshare"), trap, PORT=port))
    url = f"http://127.0.0.1:{port}/api/v1/users"

    def up():
        try:
            return requests.get(url, timeout=1).status_code in (200, 204)
        except requests.RequestException:
            return False
    wait_for(up, 30, what="the users instance")

    sha = {n: hashlib.sha1(n.encode()).hexdigest() for n in ("admin", "platform", "stratus", "acme", "dev1", "bob")}
    for name in ("admin", "platform", "stratus"):
        r = requests.put(url, json={"username": name, "password": sha[name]}, timeout=10)
        assert r.status_code == 400 and "reserved" in r.json()["error"], (name, r.text)
    # an account's name is a RideShare name like any other (logins tell them apart: below)
    for name in ("acme", "dev1", "bob"):
        r = requests.put(url, json={"username": name, "password": sha[name]}, timeout=10)
        assert r.status_code == 201, (name, r.text)
    r = requests.put(url, json={"username": "acme", "password": sha["acme"]}, timeout=10)
    assert r.status_code == 400 and "exists" in r.json()["error"], r.text
    assert trap.hits == 0, "the users instance connected to a platform address other than the broker"

    # the token service: each credential gets its own role, whoever shares the name
    gw = start_gateway(cluster, STRATUS_TOKEN_SECRET="confined-test-secret-of-32-bytes-or-more",
                       STRATUS_ADMIN_PASSWORD="pw-admin")
    c = Client(gw)
    for name, pw, role, tenant in (("acme", acme_pw, "tenant", "acme"), ("acme", sha["acme"], "user", "rideshare"),
                                   ("dev1", dev_pw, "developer", None), ("dev1", sha["dev1"], "user", "rideshare"),
                                   ("bob", sha["bob"], "user", "rideshare")):
        status, body, _ = c.request("POST", "/api/v1/auth/token", {"username": name, "password": pw})
        assert status == 200 and body["role"] == role, (name, role, status, body)
        claims = jwt.decode(body["token"], options={"verify_signature": False})
        assert claims.get("tenant") == tenant and claims["sub"] == name, claims
    for name, pw in (("acme", sha["bob"]), ("acme", dev_pw), ("admin", sha["admin"])):
        status, body, _ = c.request("POST", "/api/v1/auth/token", {"username": name, "password": pw})
        assert status == 401, (name, status, body)
