"""Tenant isolation in the data plane, against the real broker (issue #14):
each tenant connects with its own broker account, the broker validates the
user_id of every message, and the workers resolve every name inside the
tenant that user_id names.

Tenant A's credentials cannot read, write, create, drop or clear tenant B's
tables by any message: hand-made AMQP messages with a forged user_id, a
`tenant` field, names made to escape. A forged user_id closes the channel;
a request without a user_id is refused."""
from __future__ import annotations

import dataclasses
import json
import time
import uuid

import pika
import pytest

from bus import accounts, ops, protocol, tenancy
from bus.broker_admin import BrokerAdmin
from bus.client import DBClient, connection_params
from bus.errors import BadRequest, Forbidden, QuotaExceeded
from harness import wait_for

SECRETS = ops.create_table("secrets", [ops.column("k", "text", nullable=False), ops.column("v", "text")], ["k"])


class Tenants:
    """Broker accounts for tenants of one test cluster, removed at the end."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.admin = BrokerAdmin(cluster.settings)
        self.made: list[str] = []
        self.clients: list[DBClient] = []

    def make(self, name: str) -> str:
        password = tenancy.new_password()
        self.made.append(self.admin.put_tenant(self.cluster.names, name, password))
        return accounts.tenant_amqp_url(self.cluster.settings.amqp_url, self.cluster.name, name, password)

    def client(self, name: str) -> DBClient:
        url = self.make(name)
        c = DBClient(dataclasses.replace(self.cluster.settings, amqp_url=url), name="test")
        assert c.connected, f"{name} could not connect with its own account"
        self.clients.append(c)
        return c

    def close(self):
        for c in self.clients:
            c.close()
        for u in self.made:
            try:
                self.admin.delete_user(u)
            except Exception:
                pass


@pytest.fixture
def tenants(cluster):
    t = Tenants(cluster)
    yield t
    t.close()


@pytest.fixture
def two(cluster, tenants):
    cluster.bootstrap(slaves=1)
    a, b = tenants.client("acme"), tenants.client("bravo")
    lsn = a.write([SECRETS, ops.insert("secrets", {"k": "plan", "v": "acme's"})]).lsn
    # reads without min_lsn below may reach the slave: let it catch up first
    wait_for(lambda: cluster.workers()["s1"]["applied_lsn"] >= lsn, 10, what="the slave to apply the setup")
    return a, b


def test_a_tenant_sees_only_its_own_tables(cluster, two):
    a, b = two
    assert a.read({"op": "tables"}).result == ["secrets"]
    assert b.read({"op": "tables"}).result == []
    for name in ("secrets", "acme__secrets", "ACME__SECRETS", "acme.secrets", '"acme__secrets"', "../secrets",
                 "platform__secrets", "_stratus_tables", "sqlite_schema"):
        with pytest.raises(BadRequest):
            b.read(ops.select(name))
        with pytest.raises(BadRequest):
            b.write([ops.insert(name, {"k": "x", "v": "bravo's"})])
        with pytest.raises(BadRequest):
            b.write([ops.delete(name, [])])
    # the same name is another table in bravo's namespace
    lsn = b.write([SECRETS, ops.insert("secrets", {"k": "plan", "v": "bravo's"})]).lsn
    assert a.read(ops.select("secrets"), min_lsn=lsn).result == [{"k": "plan", "v": "acme's"}]
    assert b.read(ops.select("secrets"), min_lsn=lsn).result == [{"k": "plan", "v": "bravo's"}]
    lsn = b.clear().lsn
    assert b.read(ops.count("secrets"), min_lsn=lsn).result == 0
    assert a.read(ops.count("secrets"), min_lsn=lsn).result == 1           # clear empties one tenant's tables
    with pytest.raises(Forbidden):
        b.write([{"op": "drop_tenant", "tenant": "acme"}])
    with pytest.raises(Forbidden):
        b.read({"op": "storage"})
    # sequences are scoped too: bravo's "ids" does not advance acme's
    seq_t = ops.create_table("n", [ops.column("id", "integer", nullable=False)], ["id"])
    a.write([seq_t, ops.insert("n", {"id": ops.seq("ids")})])
    b.write([seq_t, ops.insert("n", {"id": ops.seq("ids")}), ops.insert("n", {"id": ops.seq("ids")})])
    lsn = a.write([ops.insert("n", {"id": ops.seq("ids")})]).lsn
    assert [r["id"] for r in a.read(ops.select("n", order_by=[["id", "asc"]]), min_lsn=lsn).result] == [1, 2]


def test_a_tenant_client_cannot_act_for_another(cluster, two):
    a, _ = two
    with pytest.raises(ValueError):
        a.read(ops.select("secrets"), tenant="bravo")


def _raw(url: str):
    conn = pika.BlockingConnection(connection_params(url))
    return conn, conn.channel()


def test_a_forged_user_id_closes_the_channel_and_a_missing_one_is_refused(cluster, tenants):
    cluster.bootstrap(slaves=0)
    a_url = tenants.make("acme")
    b_url = tenants.make("bravo")
    DBClient(dataclasses.replace(cluster.settings, amqp_url=a_url), name="t").write([SECRETS]).lsn
    conn, ch = _raw(b_url)
    try:
        q = ch.queue_declare(cluster.names.response_prefix + "bravo.raw", exclusive=True).method.queue
        forged = protocol.Request(kind="read", body=ops.select("secrets")).encode()
        ch.basic_publish(cluster.names.request_exchange, "read", forged,
                         pika.BasicProperties(reply_to=q, user_id=tenancy.broker_user(cluster.name, "acme")))
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
            ch.basic_get(q)   # the next call on the channel sees the broker close it
        assert exc.value.reply_code == 406
        # no user_id at all: refused by the worker, with a reply
        ch2 = conn.channel()
        q2 = ch2.queue_declare(cluster.names.response_prefix + "bravo.raw2", exclusive=True).method.queue
        ch2.basic_publish(cluster.names.request_exchange, "read", forged, pika.BasicProperties(reply_to=q2))
        reply = wait_for(lambda: ch2.basic_get(q2, auto_ack=True)[2], 10, what="the refusal")
        assert json.loads(reply)["error"]["code"] == "forbidden"
    finally:
        conn.close()


@pytest.mark.parametrize("what", ["default exchange to writeQ", "the replication stream", "declare readQ",
                                  "consume readQ", "another tenant's reply queue"])
def test_a_tenant_account_reaches_nothing_but_the_request_exchange(cluster, tenants, what):
    cluster.bootstrap(slaves=0)
    url = tenants.make("acme")
    tenants.make("bravo")
    n = cluster.names
    conn, ch = _raw(url)
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
            if what == "default exchange to writeQ":
                ch.basic_publish("", n.write_queue, b"{}", pika.BasicProperties(user_id=tenancy.broker_user(cluster.name, "acme")))
                ch.basic_get(n.response_prefix + "acme.none")
            elif what == "the replication stream":
                ch.basic_publish(n.sync_exchange, "", b"{}")
                ch.basic_get(n.response_prefix + "acme.none")
            elif what == "declare readQ":
                ch.queue_declare(n.read_queue, durable=True)
            elif what == "consume readQ":
                ch.basic_consume(n.read_queue, lambda *a: None)
            else:
                ch.queue_declare(n.response_prefix + "bravo.x", arguments={"x-expires": 10000})
        assert exc.value.reply_code in (403, 404)
    finally:
        if conn.is_open:
            conn.close()


def test_dropping_a_tenant_drops_its_tables_on_every_worker(cluster, two):
    a, b = two
    written = b.write([SECRETS, ops.insert("secrets", {"k": "keep", "v": "bravo's"})]).lsn
    platform = cluster.client()
    storage = platform.read({"op": "storage"}, min_lsn=written).result   # a lagging slave would miss bravo
    assert storage.get("acme", 0) > 0 and storage.get("bravo", 0) > 0
    lsn = platform.write([{"op": "drop_tenant", "tenant": "acme"}]).lsn
    wait_for(lambda: cluster.workers()["s1"]["applied_lsn"] >= lsn, 10, what="the slave to apply the drop")
    assert a.read({"op": "tables"}, min_lsn=lsn).result == []
    assert b.read(ops.select("secrets"), min_lsn=lsn).result == [{"k": "keep", "v": "bravo's"}]
    for w in ("w1", "s1"):
        names = set(cluster.checksum(w))
        assert not any(x.startswith("acme__") for x in names) and "bravo__secrets" in names
    assert "acme" not in platform.read({"op": "storage"}).result


def test_past_its_storage_quota_a_tenant_can_read_and_delete_but_not_write(make_cluster, tenants):
    cluster = make_cluster(tenant_storage=20_000)
    tenants.cluster = cluster
    cluster.bootstrap(slaves=0)
    a = tenants.client("acme")
    a.write([SECRETS])
    big = "x" * 4000
    refused = None
    deadline = time.monotonic() + 30
    i = 0
    while time.monotonic() < deadline:   # usage is measured at most every 5 s
        try:
            a.write([ops.insert("secrets", {"k": f"k{i}", "v": big})])
            i += 1
        except QuotaExceeded as exc:
            refused = exc
            break
        time.sleep(0.05)
    assert refused is not None and "quota" in refused.message and refused.status == 507
    n = a.read(ops.count("secrets")).result
    assert n == i                                   # nothing of the refused write
    a.write([ops.delete("secrets", [ops.eq("k", "k0")])])   # deletes still work
    assert a.read(ops.count("secrets")).result == n - 1
    # another tenant is not concerned
    b = tenants.client("bravo")
    b.write([SECRETS, ops.insert("secrets", {"k": "fine", "v": uuid.uuid4().hex})])
