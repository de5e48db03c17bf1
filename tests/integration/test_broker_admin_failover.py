"""The management API client's failover against the real RabbitMQ
(bus/broker_admin.py): a list whose first node is dead (a closed local port)
and whose next is the real management API still makes, uses and deletes a
broker account. The failover order and its bounds are unit-tested against
local HTTP servers (tests/unit/test_broker_admin.py); a 3-node cluster with
node 1 killed: tests/integration/test_multinode.py."""
from __future__ import annotations

import dataclasses
import socket
import time
import uuid

import pika
import pytest

from bus import broker_admin, brokers
from bus.broker_admin import BrokerAdmin, BrokerAdminError
from bus.client import connection_params
from bus.settings import load


@pytest.fixture
def dead():
    """A local port bound but not listening: connection refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


def test_a_dead_first_node_still_makes_uses_and_deletes_an_account(dead):
    base = load()
    real = brokers.management_urls(base.amqp_management_url, base.amqp_url)
    settings = dataclasses.replace(base, amqp_management_url=",".join([dead, *real]))
    broker_admin._last_good.clear()
    admin = BrokerAdmin(settings)
    assert admin.order()[0] == dead
    user, password = f"stratus.test-failover-{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    try:
        t0 = time.monotonic()
        admin.put_user(user, password)
        admin.set_permissions(user, configure="^$", write="^$", read="^$")
        assert time.monotonic() - t0 < 5
        assert (admin.get_user(user) or {}).get("name") == user
        assert admin.order()[0] == real[0]   # the next call starts at the node that answered
        # the account is real: it opens an AMQP connection with its own password
        conn = pika.BlockingConnection(connection_params(brokers.with_account(base.amqp_url, user, password)))
        conn.close()
        assert admin.delete_user(user) is True
        assert admin.get_user(user) is None
    finally:
        try:
            BrokerAdmin(base).delete_user(user)
        except BrokerAdminError:
            pass


def test_a_refusal_of_the_real_broker_is_not_failed_over(dead):
    """A wrong platform password: the real node answers 401 at once, and the
    error shows neither password."""
    base = load()
    real = brokers.management_urls(base.amqp_management_url, base.amqp_url)
    wrong = brokers.with_account(base.amqp_url, brokers.account_of(base.amqp_url)[0], "wr0ng-pw")
    broker_admin._last_good.clear()
    admin = BrokerAdmin(dataclasses.replace(base, amqp_url=wrong,
                                            amqp_management_url=",".join([real[0], dead])))
    with pytest.raises(BrokerAdminError) as e:
        admin.get_user(brokers.account_of(base.amqp_url)[0])
    assert "401" in str(e.value) and "wr0ng-pw" not in str(e.value)
    assert brokers.account_of(base.amqp_url)[1] not in str(e.value)
