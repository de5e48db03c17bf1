"""Pure logic of the task API: names, the tenant's task permissions as
regular expressions, the task's encoding and the attempt count."""
from __future__ import annotations

import re

import pika
import pytest

from bus import tasks, tenancy
from bus.errors import BadRequest
from bus.names import Names

N = Names("c1")


def test_task_names_are_under_the_tenant():
    assert N.task_exchange("acme") == "stratus.c1.tasks.acme"
    assert N.task_queue("acme", "shop", "jobs") == "stratus.c1.tasks.acme.shop.jobs"
    assert N.task_dead_queue("acme", "shop", "jobs") == "stratus.c1.tasks.acme.shop.jobs.dead"


@pytest.mark.parametrize("bad", ["", "a.b", "Shop", "x_y", "1st", "a" * 64, None, "a/b"])
def test_a_name_part_with_a_dot_or_odd_characters_is_refused(bad):
    for args in ((bad, "shop", "jobs"), ("acme", bad, "jobs"), ("acme", "shop", bad)):
        with pytest.raises(ValueError):
            N.task_queue(*args)


def _allows(perms: dict, kind: str, name: str) -> bool:
    return re.search(perms[kind], name) is not None


def test_a_tenant_may_use_its_own_task_objects_only():
    perms = tenancy.permissions(N, "acme")
    own = [N.task_exchange("acme"), N.task_queue("acme", "shop", "jobs"), N.task_dead_queue("acme", "shop", "jobs")]
    other = [N.task_exchange("acme-b"), N.task_queue("acme-b", "shop", "jobs"),
             N.task_dead_queue("acme-b", "shop", "jobs"), N.task_exchange("acm"), "stratus.c1.tasks.acmeX",
             N.task_queue("bravo", "shop", "jobs"), "stratus.c2.tasks.acme.shop.jobs", "", N.write_queue,
             N.log_stream, N.sync_exchange]
    for kind in ("configure", "write", "read"):
        assert all(_allows(perms, kind, name) for name in own), kind
        assert not any(_allows(perms, kind, name) for name in other), kind
    # the rules that were there before tasks are kept
    assert _allows(perms, "write", N.request_exchange) and not _allows(perms, "read", N.request_exchange)
    assert _allows(perms, "read", N.response_queue("acme.c")) and not _allows(perms, "read", N.response_queue("bravo.c"))


def test_a_task_round_trips_and_a_bad_one_is_refused():
    body = tasks.encode("t1", {"order": 7})
    props = pika.BasicProperties(user_id="u", headers={"x-delivery-count": 2})
    t = tasks.decode(body, props, tasks.attempt_of(props))
    assert (t.id, t.payload, t.attempt, t.submitted_by, t.error) == ("t1", {"order": 7}, 3, "u", None)
    for raw in (b"nope", b"[]", b'{"v":2,"id":"a","payload":{}}', b'{"v":1,"id":1,"payload":{}}',
                b'{"v":1,"id":"a","payload":[]}', b"\xff"):
        with pytest.raises(BadRequest):
            tasks.decode(raw)
    for payload in ([1], {"x": float("nan")}, {"x": object()}):
        with pytest.raises(BadRequest):
            tasks.encode("t", payload)


def test_the_attempt_count_and_the_limit():
    assert tasks.attempt_of(pika.BasicProperties()) == 1
    assert tasks.attempt_of(pika.BasicProperties(headers={"x-delivery-count": 4})) == 5
    assert [tasks.should_dead_letter(a, 3) for a in (1, 2, 3, 4)] == [False, False, True, True]


def test_a_dead_letter_carries_its_error_or_the_brokers_reason():
    body = tasks.encode("t1", {})
    mine = tasks.decode(body, pika.BasicProperties(headers={tasks.ERROR_HEADER: b"RuntimeError: x"}))
    assert mine.error == "RuntimeError: x"
    broker = tasks.decode(body, pika.BasicProperties(headers={"x-death": [{"reason": "delivery_limit"}]}))
    assert "delivery limit" in broker.error
