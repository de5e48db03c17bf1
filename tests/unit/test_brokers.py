"""bus/brokers.py and bus/client.py connection_params: the node list of
STRATUS_AMQP_URL (pure logic; the failover itself is proven on a real
3-node cluster in tests/integration/test_multinode.py)."""
from __future__ import annotations

import pytest

from bus.brokers import account_of, amqp_urls, first_url, nodes, with_account
from bus.client import NodeParameters, connection_params

URLS = "amqp://a:b@127.0.0.1:1/%2F, amqp://a:b@127.0.0.1:2/%2F,amqp://a:b@127.0.0.1:3/%2F"


def test_one_url_gives_one_node_with_the_old_parameters():
    p = connection_params("amqp://u:p@127.0.0.1:5672/%2F", heartbeat=15)
    assert isinstance(p, NodeParameters) and len(p) == 1
    assert (p.host, p.port, p.heartbeat, p.socket_timeout, p.connection_attempts) == ("127.0.0.1", 5672, 15, 3, 1)
    assert p.stack_timeout == 15   # pika's default: nothing to fail over to


def test_several_urls_are_tried_in_turn_from_a_rotating_start():
    starts = set()
    for _ in range(3):
        p = connection_params(URLS)
        ports = [x.port for x in p]
        assert ports in ([1, 2, 3], [2, 3, 1], [3, 1, 2])   # the list's order, from some node on
        assert all(x.stack_timeout == 5 for x in p)
        starts.add(ports[0])
    assert starts == {1, 2, 3}


def test_an_attribute_set_on_the_list_reaches_every_node():
    p = connection_params(URLS)
    p.client_properties = {"connection_name": "x"}
    assert [x.client_properties for x in p] == [{"connection_name": "x"}] * 3
    assert p.client_properties == {"connection_name": "x"}


def test_with_account_rewrites_every_url():
    assert with_account(URLS, "t", "p@ss") == ",".join(f"amqp://t:p%40ss@127.0.0.1:{i}/%2F" for i in (1, 2, 3))
    assert "a:b" not in with_account(URLS, "t", "p")


def test_account_vhost_and_nodes_come_from_the_urls():
    assert first_url(URLS) == "amqp://a:b@127.0.0.1:1/%2F"
    assert account_of(URLS) == ("a", "b", "/")
    assert account_of("amqp://127.0.0.1") == ("", "", "/")   # no account: never a default one
    assert nodes(URLS) == [("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3)]
    assert nodes("amqps://h") == [("h", 5671)]


@pytest.mark.parametrize("bad", ["", " , ", "http://x/", "amqp:///%2F", "amqp://127.0.0.1:x/"])
def test_a_malformed_list_is_refused(bad):
    with pytest.raises(ValueError) as e:
        connection_params(bad)
    assert "STRATUS_AMQP_URL" in str(e.value)


def test_a_refused_url_does_not_show_its_password():
    with pytest.raises(ValueError) as e:
        amqp_urls("amqp://u:secret@127.0.0.1:x/")
    assert "secret" not in str(e.value)


def test_a_tenants_url_carries_its_own_account_on_every_node():
    from bus import accounts, tenancy
    from bus.broker_admin import BrokerAdmin
    from bus.settings import Settings
    platform = "amqp://stratus-orchestrator:pw1@127.0.0.1:5672/%2F,amqp://stratus-orchestrator:pw1@127.0.0.1:5673/%2F"
    url = accounts.tenant_amqp_url(platform, "c1", "acme", "s3cret")
    assert "orchestrator" not in url and "pw1" not in url and url.count("stratus.c1.acme:s3cret@") == 2, url
    assert tenancy.platform_user(platform) == "stratus-orchestrator"
    admin = BrokerAdmin(Settings(amqp_url="amqp://adm:pw@h1:5672/v1,amqp://adm:pw@h2:5673/v1"))
    assert admin.vhost == "v1"
