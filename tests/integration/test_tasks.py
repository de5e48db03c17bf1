"""Tasks (bus/tasks.py) against the real broker: a web role's task reaches a
worker role (a real subprocess, on the tenant's own broker account); a worker
killed mid-task gives it back and another worker completes it; a task that
always fails ends in the dead-letter queue with its error after the limit;
one tenant's account reaches none of another tenant's task objects."""
from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time

import pika
import pytest

from bus import tenancy
from bus.client import connection_params
from bus.errors import Forbidden
from bus.tasks import TaskQueue
from bus.topology import delete_task_queues
from harness import wait_for

sys.path.insert(0, os.path.dirname(__file__))
from test_tenancy import Tenants  # noqa: E402

APP, ROLE = "shop", "jobs"

# The worker role: records every start and completion in TASK_LOG, one line
# each ("start|done <task id> <attempt> <pid>"). Payload {"sleep": s} sleeps
# on the first attempt only; {"fail": true} always raises.
WORKER = r"""
import os, sys, time
from bus.tasks import TaskQueue
log = os.environ["TASK_LOG"]
def note(*words):
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, (" ".join(map(str, words)) + "\n").encode())
    os.close(fd)
def handler(task):
    note("start", task.id, task.attempt, os.getpid())
    if task.payload.get("fail"):
        raise RuntimeError("always fails: " + task.id)
    if task.attempt == 1 and task.payload.get("sleep"):
        time.sleep(task.payload["sleep"])
    note("done", task.id, task.attempt, os.getpid())
q = TaskQueue(None, os.environ["STRATUS_TENANT"], sys.argv[1], sys.argv[2],
              max_attempts=int(os.environ.get("MAX_ATTEMPTS", "5")))
note("ready", "-", 0, os.getpid())
q.consume(handler)
"""


class Env:
    def __init__(self, cluster, tmp_path):
        self.cluster = cluster
        self.tenants = Tenants(cluster)
        self.log = tmp_path / "tasks.log"
        self.log.touch()
        self.queues: list[TaskQueue] = []
        self.used: set[tuple[str, str, str]] = set()

    def queue(self, url: str, tenant: str, app: str = APP, role: str = ROLE, **kw) -> TaskQueue:
        q = TaskQueue(dataclasses.replace(self.cluster.settings, amqp_url=url), tenant, app, role, **kw)
        self.queues.append(q)
        self.used.add((tenant, app, role))
        return q

    def worker(self, key: str, url: str, tenant: str, **env):
        self.used.add((tenant, APP, ROLE))
        p = self.cluster.spawn(key, ["-c", WORKER, APP, ROLE], STRATUS_AMQP_URL=url, STRATUS_TENANT=tenant,
                               TASK_LOG=self.log, **env)
        wait_for(lambda: f" 0 {p.pid}" in self.log.read_text(), 20, what=f"{key} to start")
        return p

    def lines(self, kind: str, task_id: str) -> list[list[str]]:
        return [ln.split() for ln in self.log.read_text().splitlines() if ln.startswith(f"{kind} {task_id} ")]

    def close(self):
        for q in self.queues:
            q.close()
        try:
            conn = pika.BlockingConnection(connection_params(self.cluster.settings.amqp_url))
            ch = conn.channel()
            for tenant, app, role in self.used:
                delete_task_queues(ch, self.cluster.names, tenant, app, role)
            for tenant in {t for t, _, _ in self.used}:
                ch.exchange_delete(self.cluster.names.task_exchange(tenant))
            conn.close()
        except Exception:
            pass
        self.tenants.close()


@pytest.fixture
def env(cluster, tmp_path):
    e = Env(cluster, tmp_path)
    yield e
    e.close()


def test_a_task_reaches_a_worker_of_the_role(env):
    url = env.tenants.make("acme")
    w = env.worker("w1", url, "acme")
    web = env.queue(url, "acme")
    ids = [web.submit({"order": i}) for i in range(3)]
    for tid in ids:
        wait_for(lambda: env.lines("done", tid), 20, what=f"task {tid} done")
    for tid in ids:
        done = env.lines("done", tid)
        assert len(done) == 1 and done[0][3] == str(w.pid)
    assert web.dead_letters() == []


def test_a_worker_killed_mid_task_gives_it_to_another(env):
    url = env.tenants.make("acme")
    w1 = env.worker("w1", url, "acme")
    tid = env.queue(url, "acme").submit({"sleep": 60})
    wait_for(lambda: env.lines("start", tid), 20, what="the first worker to start the task")
    env.cluster.kill("w1")
    w2 = env.worker("w2", url, "acme")
    wait_for(lambda: env.lines("done", tid), 30, what="the second worker to complete the task")
    starts = env.lines("start", tid)
    assert [(s[2], s[3]) for s in starts] == [("1", str(w1.pid)), ("2", str(w2.pid))]
    assert env.lines("done", tid) == [["done", tid, "2", str(w2.pid)]]   # once per delivery, done once


def test_a_task_that_always_fails_is_dead_lettered_after_the_limit(env):
    url = env.tenants.make("acme")
    env.worker("w1", url, "acme", MAX_ATTEMPTS=3)
    web = env.queue(url, "acme")
    ok = web.submit({"order": 1})
    bad = web.submit({"fail": True})
    dead = wait_for(lambda: web.dead_letters(), 30, 0.5, what="the failing task in the dead letters")
    assert [d.id for d in dead] == [bad]
    assert dead[0].error == f"RuntimeError: always fails: {bad}" and dead[0].attempt == 3
    assert dead[0].payload == {"fail": True}
    assert dead[0].submitted_by == tenancy.broker_user(env.cluster.name, "acme")
    wait_for(lambda: env.lines("done", ok), 10, what="the good task")
    time.sleep(1.5)   # no retry after the dead letter
    assert [s[2] for s in env.lines("start", bad)] == ["1", "2", "3"]
    assert [d.id for d in web.dead_letters()] == [bad]   # reading them leaves them there


@pytest.mark.parametrize("what", ["publish to B's exchange", "publish by the default exchange", "consume B's queue",
                                  "read B's dead letters", "declare in B's names", "bind B's queue to A's exchange"])
def test_a_tenant_reaches_none_of_another_tenants_tasks(env, what):
    a_url = env.tenants.make("acme")
    b_url = env.tenants.make("acme-b")   # B's name starts with A's: the prefixes must still not overlap
    b = env.queue(b_url, "acme-b")
    b.submit({"secret": "b's"})
    a = env.queue(a_url, "acme")
    a.submit({"mine": True})   # A's own queues exist, so a refusal below is not "no such object"
    n = env.cluster.names
    bq, bdead, bx = n.task_queue("acme-b", APP, ROLE), n.task_dead_queue("acme-b", APP, ROLE), n.task_exchange("acme-b")
    conn = pika.BlockingConnection(connection_params(a_url))
    ch = conn.channel()
    ch.confirm_delivery()
    props = pika.BasicProperties(user_id=tenancy.broker_user(env.cluster.name, "acme"), delivery_mode=2)
    body = b'{"v":1,"id":"forged","payload":{}}'
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
            if what == "publish to B's exchange":
                ch.basic_publish(bx, bq, body, props)
            elif what == "publish by the default exchange":
                ch.basic_publish("", bq, body, props)
            elif what == "consume B's queue":
                ch.basic_consume(bq, lambda *args: None)
            elif what == "read B's dead letters":
                ch.basic_get(bdead)
            elif what == "declare in B's names":
                ch.queue_declare(bq + ".mine", durable=True)
            else:
                ch.queue_bind(bq, n.task_exchange("acme"), routing_key="x")
        assert exc.value.reply_code == 403
    finally:
        if conn.is_open:
            conn.close()
    with pytest.raises(ValueError):
        TaskQueue(dataclasses.replace(env.cluster.settings, amqp_url=a_url), "acme-b", APP, ROLE)
    # B's task is still there, untouched, and only B's
    got = []
    stop_after_one = threading.Event()

    def take(task):
        got.append(task)
        stop_after_one.set()
    t = threading.Thread(target=b.consume, args=(take,), kwargs={"stop": stop_after_one}, daemon=True)
    t.start()
    t.join(20)
    assert [g.payload for g in got] == [{"secret": "b's"}]


def test_a_refused_account_gets_forbidden_not_a_hang(env):
    a_url = env.tenants.make("acme")
    user = tenancy.broker_user(env.cluster.name, "acme")
    env.tenants.admin.set_permissions(user, configure="^$", write="^$", read="^$")
    q = env.queue(a_url, "acme")
    t0 = time.monotonic()
    with pytest.raises(Forbidden):
        q.submit({"x": 1})
    assert time.monotonic() - t0 < 10


def test_a_task_whose_workers_keep_dying_is_dead_lettered_by_the_broker(env):
    """Workers that die before their ack (here: take it and drop the
    connection) give the task back; past TASK_DELIVERY_LIMIT returns the
    broker dead-letters it itself, so it is not retried forever."""
    from bus.topology import TASK_DELIVERY_LIMIT
    url = env.tenants.make("acme")
    web = env.queue(url, "acme")
    tid = web.submit({"poison": True})
    taken = 0
    for _ in range(TASK_DELIVERY_LIMIT + 5):
        conn = pika.BlockingConnection(connection_params(url))
        ch = conn.channel()
        method = wait_for(lambda: ch.basic_get(web.queue)[0] or web.dead_letters(), 10, 0.2,
                          what="the task back in its queue or in the dead letters")
        conn.close()   # no ack: a worker that died mid-task
        if not isinstance(method, pika.spec.Basic.GetOk):
            break
        taken += 1
    assert taken == TASK_DELIVERY_LIMIT + 1
    dead = web.dead_letters()
    assert [d.id for d in dead] == [tid] and "delivery limit" in dead[0].error


def test_deleting_the_cluster_deletes_its_task_objects(env):
    from bus.topology import _task_objects, delete_cluster
    url = env.tenants.make("acme")
    env.queue(url, "acme").submit({"x": 1})
    queues, exchanges = _task_objects(env.cluster.names)
    assert sorted(queues) == [env.cluster.names.task_queue("acme", APP, ROLE),
                              env.cluster.names.task_dead_queue("acme", APP, ROLE)]
    assert exchanges == [env.cluster.names.task_exchange("acme")]
    conn = pika.BlockingConnection(connection_params(env.cluster.settings.amqp_url))
    try:
        delete_cluster(conn.channel(), env.cluster.names)
    finally:
        conn.close()
    assert _task_objects(env.cluster.names) == ([], [])
