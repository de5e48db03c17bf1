"""A master, or the leading orchestrator, cut off from the broker alone while
its ZooKeeper session lives (issue #17; orchestrator/decisions.py
check_master_broker and check_service_broker), on the real RabbitMQ and
ZooKeeper: the orchestrators and their workers reach the broker through a
fault-injection proxy (stratus/chaos/proxy.py) that can cut one process's
links; the test's own client goes to the broker directly."""
from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from bus import ops
from bus import zk as bzk
from bus.cluster import read_leader
from harness import EV_TABLE, wait_for
from stratus.chaos.proxy import ProxyHub
from test_orchestrator import Orch, cleanup


def _via(url: str, port: int) -> str:
    """`url` with its host and port replaced by the proxy's."""
    u = urlsplit(url)
    cred = u.netloc.rsplit("@", 1)[0] + "@" if "@" in u.netloc else ""
    return urlunsplit(u._replace(netloc=f"{cred}127.0.0.1:{port}"))


@pytest.fixture
def broker_link(cluster):
    """(proxy, AMQP URL through it) on the link to the broker's first node."""
    hub = ProxyHub()
    first = cluster.settings.amqp_url.split(",")[0].strip()
    u = urlsplit(first)
    proxy = hub.add("broker", (u.hostname or "127.0.0.1", u.port or 5672))
    yield proxy, _via(first, proxy.port)
    hub.close()


def _gone(pid: int) -> bool:
    """The process has exited (a zombie counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _statuses(cluster) -> dict:
    return bzk.children_json(cluster.zk, cluster.paths.orchestrator_members)


def test_a_master_cut_off_from_the_broker_is_deposed_and_no_write_is_lost(cluster, broker_link):
    proxy, url = broker_link
    a = Orch(cluster, "orch-a", STRATUS_AMQP_URL=url)
    try:
        v = a.wait_healthy_cluster(1)
        old = next(w for w in v["workers"] if w["role"] == "master")
        wait_for(lambda: all(m.broker_up for m in cluster.members().values()), 10, 0.1,
                 what="every worker to say it reaches the broker")
        db = cluster.client(tenant="rideshare")
        db.write([EV_TABLE])
        acked = {i: db.write([ops.insert("ev", {"id": i, "k": "before"})]).lsn for i in range(20)}

        rule = proxy.cut(pids=[old["pid"]])
        t0 = time.monotonic()
        try:
            # the master's record says so, while its ZooKeeper session lives on
            rec = wait_for(lambda: (m := cluster.members().get(old["id"])) and m.broker_up is False and m, 5, 0.05,
                           what="the master to publish that it lost the broker")
            assert rec.broker_down_since is not None and rec.role.value == "master"
            # a write sent now waits in writeQ and is answered by the new master
            r = db.write([ops.insert("ev", {"id": 100, "k": "during"})], timeout=15)
            took = time.monotonic() - t0
            print(f"\nwrites acknowledged again {took:.2f}s after the master was cut off from the broker")
            assert took < 5
            leader, _ = read_leader(cluster.zk, cluster.paths)
            assert leader.id != old["id"] and leader.term == v["term"] + 1
            assert r.lsn > max(acked.values())
            last = a.view()["elections"][-1]
            assert last["old"] == old["id"] and last["new"] == leader.id
            assert "cut off from the broker" in last["reason"], last
            # the deposed master is gone (killed: its term is fenced anyway)
            wait_for(lambda: _gone(old["pid"]), 10, 0.1, what="the deposed master to be gone")
        finally:
            proxy.heal(rule)
        a.wait_healthy_cluster(1, timeout=60)
        rows = db.read(ops.select("ev"), min_lsn=r.lsn).result
        assert {row["id"] for row in rows} == set(acked) | {100}
        assert len(a.view()["elections"]) == 2   # one deposition, no churn after the heal
    finally:
        cleanup(cluster, a)


def test_a_leading_orchestrator_cut_off_from_the_broker_hands_the_lead_to_a_standby(cluster, broker_link):
    proxy, url = broker_link
    a = Orch(cluster, "orch-a", STRATUS_AMQP_URL=url)
    b = None
    try:
        v = a.wait_healthy_cluster(1)
        b = Orch(cluster, "orch-b", STRATUS_AMQP_URL=url)
        wait_for(lambda: len(s := _statuses(cluster)) == 2 and all(r["broker_up"] for r in s.values()), 15, 0.1,
                 what="both orchestrators to publish a connected bus client")
        assert a.post("/api/v1/db/write", {"ops": [EV_TABLE]})[0] == 200
        assert a.view()["orchestrator"]["leading"] and not b.view()["orchestrator"]["leading"]
        pid = a.view()["orchestrator"]["pid"]

        rule = proxy.cut(pids=[pid])
        t0 = time.monotonic()
        try:
            wait_for(lambda: b.view()["orchestrator"]["leading"], 10, 0.05, what="the standby to lead")
            took = time.monotonic() - t0
            print(f"\nthe standby leads {took:.2f}s after the leader was cut off from the broker")
            assert took < 5
            wait_for(lambda: (s := _statuses(cluster).get(a.view()["orchestrator"]["id"])) and s["broker_up"] is False,
                     5, 0.05, what="the former leader to publish that it lost the broker")
            assert not a.view()["orchestrator"]["leading"]
            # the db routes work on the new leader, with the same workers: no election
            status, body, _ = b.post("/api/v1/db/write", {"ops": [ops.insert("ev", {"id": 1, "k": "x"})]})
            assert status == 200, body
            written = body["lsn"]
            regs = bzk.children_json(cluster.zk, cluster.paths.service("orchestrator"))
            assert [r["port"] for r in regs.values()] == [b.port]
            vb = b.view()
            assert vb["term"] == v["term"] and len(vb["elections"]) == len(v["elections"])
            assert "resigning the lead" in cluster.log("orch-a")
        finally:
            proxy.heal(rule)
        # healed: the former leader's client is back, and it stays a standby (no hand-back)
        wait_for(lambda: all(r["broker_up"] for r in _statuses(cluster).values()), 10, 0.1,
                 what="both bus clients connected again")
        time.sleep(2.0)
        assert b.view()["orchestrator"]["leading"] and not a.view()["orchestrator"]["leading"]
        # min_lsn: without it the read may reach a slave that has not applied the table yet (400)
        assert b.post("/api/v1/db/read", {**ops.count("ev"), "min_lsn": written})[0] == 200
    finally:
        cleanup(cluster, *[o for o in (b, a) if o is not None])


def test_a_broker_outage_deposes_nobody_and_hands_nothing_over(cluster, broker_link):
    """Every link cut (the broker is gone for everyone the orchestrators run):
    no election and no hand-over, during the outage or after it."""
    proxy, url = broker_link
    a = Orch(cluster, "orch-a", STRATUS_AMQP_URL=url)
    b = None
    try:
        v = a.wait_healthy_cluster(1)
        b = Orch(cluster, "orch-b", STRATUS_AMQP_URL=url)
        wait_for(lambda: len(s := _statuses(cluster)) == 2 and all(r["broker_up"] for r in s.values()), 15, 0.1,
                 what="both orchestrators to publish a connected bus client")
        rule = proxy.cut()
        try:
            wait_for(lambda: all(m.broker_up is False for m in cluster.members().values()), 5, 0.05,
                     what="every worker to say it lost the broker")
            time.sleep(3.0)   # three times the bound
        finally:
            proxy.heal(rule)
        v2 = a.wait_healthy_cluster(1, timeout=30)
        time.sleep(2.0)       # past the bound after the return too
        v2 = a.view()
        assert v2["orchestrator"]["leading"] and not b.view()["orchestrator"]["leading"]
        assert v2["term"] == v["term"] and len(v2["elections"]) == len(v["elections"])
        # (a tick may have started a clock while the records caught up: decided nothing)
        log = cluster.log("orch-a")
        assert ": deposing it\n" not in log and "resigning the lead" not in log
        assert a.post("/api/v1/db/write", {"ops": [EV_TABLE]}, timeout=15)[0] == 200
    finally:
        cleanup(cluster, *[o for o in (b, a) if o is not None])
