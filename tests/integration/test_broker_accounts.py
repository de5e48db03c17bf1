"""The platform's broker accounts against the real local broker (issue #22,
bus/broker_accounts.py): no `guest`, one account per component with the
least it needs, secrets readable by the platform's user alone, and a
tenant's account reaching neither the management API nor anything of
another account."""
from __future__ import annotations

import base64
import dataclasses
import json
import stat
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pika
import pytest

from bus import accounts, brokers, tenancy
from bus.broker_accounts import ACCOUNTS, COMPONENTS, url_file
from bus.broker_admin import BrokerAdmin
from bus.client import connection_params
from bus.settings import load, secrets_dir


def _account_url(component: str) -> str:
    return url_file(secrets_dir(), component).read_text().strip()


def _mgmt_status(url: str, path: str = "/api/users") -> int:
    """The management API's answer to `path` with the account of `url`."""
    user, password, _ = brokers.account_of(url)
    base = brokers.management_urls(load().amqp_management_url, load().amqp_url)[0]
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(base + path, headers={"Authorization": f"Basic {auth}"}),
                         timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _refused(fn) -> int:
    """The reply code of the channel closure `fn` causes (403, 406...)."""
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        fn()
    return e.value.reply_code


def test_guest_cannot_log_in():
    host, port = brokers.nodes(load().amqp_url)[0]
    params = pika.URLParameters(f"amqp://guest:guest@{host}:{port}/%2F?connection_attempts=1&socket_timeout=5")
    with pytest.raises(pika.exceptions.ProbableAuthenticationError) as e:
        pika.BlockingConnection(params)
    assert "ACCESS_REFUSED" in str(e.value)


def test_every_component_has_its_own_account_in_a_private_file():
    d = secrets_dir()
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    seen = set()
    for comp in COMPONENTS:
        f = url_file(d, comp)
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        user, password, _ = brokers.account_of(f.read_text().strip())
        assert user == f"stratus-{comp}" and len(password) >= 24 and password not in seen
        seen.add(password)
        conn = pika.BlockingConnection(connection_params(f.read_text().strip()))   # it logs in
        conn.close()
    # Tags are the least each needs: only the orchestrator and the tools administer.
    admin = BrokerAdmin(load())
    for comp, (tags, *_) in ACCOUNTS.items():
        got = admin.get_user(f"stratus-{comp}")["tags"]
        got = set(got if isinstance(got, list) else got.split(","))
        assert got == set(tags.split(",")), (comp, got)
    assert admin.get_user("guest") is None


@pytest.mark.parametrize("component", ["worker", "gateway"])
def test_a_component_without_the_administrator_tag_cannot_use_the_management_api(component):
    assert _mgmt_status(_account_url(component)) == 401
    assert _mgmt_status(_account_url("orchestrator")) == 200


def test_the_gateway_cannot_read_the_log_nor_write_to_it(cluster):
    """The gateway's account declares the cluster's objects (its DB client
    does) but may neither read the replication stream nor publish into the
    log's exchange or through the default exchange."""
    cluster.bootstrap(slaves=0)   # the worker's account declares the cluster's objects
    conn = pika.BlockingConnection(connection_params(_account_url("gateway")))
    try:
        names = cluster.names
        ch = conn.channel()
        ch.basic_qos(prefetch_count=10)
        assert _refused(lambda: ch.basic_consume(names.log_stream, lambda *a: None,
                                                 arguments={"x-stream-offset": "first"})) == 403
        ch = conn.channel()
        ch.confirm_delivery()
        assert _refused(lambda: ch.basic_publish(names.sync_exchange, "", b"forged")) == 403
        ch = conn.channel()
        ch.confirm_delivery()
        assert _refused(lambda: ch.basic_publish("", names.write_queue, b"forged")) == 403
        # What it needs still works: its own reply queue.
        ch = conn.channel()
        q = names.response_queue(f"platform.gw-test.{uuid.uuid4().hex[:6]}")
        ch.queue_declare(q, arguments={"x-expires": 10_000})
        ch.queue_delete(q)
    finally:
        conn.close()


def test_a_tenant_account_cannot_use_the_management_api_nor_anothers_resources(cluster):
    admin = BrokerAdmin(cluster.settings)
    made = []
    try:
        urls = {}
        for t in ("acme", "beta"):
            pw = tenancy.new_password()
            made.append(admin.put_tenant(cluster.names, t, pw))
            urls[t] = accounts.tenant_amqp_url(cluster.settings.amqp_url, cluster.name, t, pw)
        # The management API: not even its own account's record.
        assert _mgmt_status(urls["acme"]) == 401
        assert _mgmt_status(urls["acme"], f"/api/users/{urllib.parse.quote(made[0])}") == 401
        cluster.bootstrap(slaves=0)
        # beta's reply queue, made by beta; acme may neither read nor delete it.
        beta = pika.BlockingConnection(connection_params(urls["beta"]))
        acme = pika.BlockingConnection(connection_params(urls["acme"]))
        try:
            q = cluster.names.response_queue(f"beta.test.{uuid.uuid4().hex[:6]}")
            beta.channel().queue_declare(q, arguments={"x-expires": 30_000})
            assert _refused(lambda: acme.channel().basic_consume(q, lambda *a: None)) == 403
            assert _refused(lambda: acme.channel().queue_delete(q)) == 403
            assert _refused(lambda: acme.channel().basic_get(cluster.names.read_queue)) == 403
            # Nor publish as beta or as a platform account (RabbitMQ validates user_id).
            for forged in (made[1], "stratus-orchestrator"):
                ch = acme.channel()
                ch.confirm_delivery()
                assert _refused(lambda: ch.basic_publish(
                    cluster.names.request_exchange, "read", b"{}",
                    pika.BasicProperties(user_id=forged))) == 406
            beta.channel().queue_delete(q)
        finally:
            acme.close()
            beta.close()
    finally:
        for u in made:
            admin.delete_user(u)


def test_an_unset_url_with_no_account_file_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("STRATUS_AMQP_URL", raising=False)
    monkeypatch.setenv("STRATUS_SECRETS_DIR", str(tmp_path / "nothing"))
    s = load()
    assert s.amqp_url == ""
    with pytest.raises(ValueError) as e:
        brokers.amqp_urls(s.amqp_url)
    assert "scripts/services.sh start" in str(e.value) and "broker-admin.url" in str(e.value)
    # An explicit STRATUS_AMQP_URL is used as it is, as always.
    monkeypatch.setenv("STRATUS_AMQP_URL", "amqp://u:p@127.0.0.1:1/%2F")
    assert load().amqp_url == "amqp://u:p@127.0.0.1:1/%2F"
    assert dataclasses.replace(s, amqp_url="amqp://x:y@h/%2F").amqp_url == "amqp://x:y@h/%2F"
    json.dumps(s.as_dict())   # still a plain record
