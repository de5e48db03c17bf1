"""Stratus on a RabbitMQ cluster of 3 nodes and a ZooKeeper ensemble of 3
servers (STRATUS_BROKER_NODES=3, STRATUS_ZK_NODES=3, docs/cluster.md).

The module starts them itself through scripts/services.sh, with a state
directory of its own and port bases where nothing listens (never the shared
5672 or 2181), and stops them at the end; it is skipped, with the reason,
when RabbitMQ or ZooKeeper is not installed or no ports are free. What it
proves:
  - services.sh runs the cluster (3 running nodes, one cookie, the
    management plugin and the impersonator tag) and the ensemble (one leader,
    two followers, tickTime 200), idempotently, and prints the exports;
  - a broker account is made (bus/broker_admin.py) with node 1, the first
    management API of STRATUS_AMQP_MANAGEMENT_URL, killed;
  - the replication stream has a replica on every node (x-initial-cluster-size
    3) and the request queues are quorum queues on every node;
  - kill -9 of the node leading the stream, under write load through a
    master worker: writes are acknowledged again within 5 s, and every
    acknowledged write is there once; the slave's stream consumer is on a
    live node and applies everything;
  - kill -9 of the node a slave's stream consumer is connected to: it
    reconnects to another node and keeps applying;
  - kill -9 of the ZooKeeper leader: the orchestrator still elects (a crashed
    master is replaced) and writes are still acknowledged."""
from __future__ import annotations

import stat
import time

import pytest

from harness import EV_TABLE, LocalCluster, Writers, check_no_loss, wait_for
from kits.multinode import MultiNode, Unavailable
from test_orchestrator import Orch, cleanup

RECOVERY_LIMIT = 5.0   # s: writes acknowledged again after the loss of any one node
WRITERS = 4


def recovery_time(writers: Writers, t_kill: float, what: str) -> float:
    """Seconds from the kill until a write sent after it was acknowledged:
    the (WRITERS + 1)-th acknowledgement after the kill (each writer has at
    most one write in flight, so at most WRITERS of them were sent before)."""
    after = wait_for(lambda: (a := writers.acked_after(t_kill)) and len(a) > WRITERS and a, 30, 0.01,
                     what=f"a write sent after {what} to be acknowledged")
    return sorted(x[0] for x in after)[WRITERS] - t_kill


@pytest.fixture(scope="module")
def mn(tmp_path_factory):
    try:
        m = MultiNode(tmp_path_factory.mktemp("multinode"), brokers=3, zks=3)
    except Unavailable as exc:
        pytest.skip(f"a 3-node RabbitMQ cluster and ZooKeeper ensemble cannot run here: {exc}")
    with m:
        yield m


def make_cluster(mn: MultiNode, tmp_path, **over) -> LocalCluster:
    e = mn.env
    return LocalCluster(tmp_path, amqp_url=e["STRATUS_AMQP_URL"], amqp_management_url=e["STRATUS_AMQP_MANAGEMENT_URL"],
                        zk_hosts=e["STRATUS_ZK_HOSTS"], broker_nodes=3, zk_nodes=3, **over)


def healthy_everywhere(mn: MultiNode) -> None:
    """Every node back in the cluster and every ZooKeeper server serving (a
    test that killed one brings it back first, through services.sh)."""
    mn.bring_back()
    wait_for(lambda: len(mn.running_nodes()) == 3, 60, 0.5, what="3 running RabbitMQ nodes")
    wait_for(lambda: all(mn.zk_modes().values()), 60, 0.5, what="3 ZooKeeper servers serving")


def test_services_sh_runs_a_cluster_and_an_ensemble(mn):
    e = mn.env
    urls = e["STRATUS_AMQP_URL"].split(",")
    assert [u.rsplit(":", 1)[1].split("/")[0] for u in urls] == [str(mn.broker_port + i) for i in range(3)]
    assert e["STRATUS_ZK_HOSTS"] == ",".join(f"127.0.0.1:{mn.zk_port + i}" for i in range(3))
    assert e["STRATUS_BROKER_NODES"] == "3" and e["STRATUS_ZK_NODES"] == "3"
    assert e["STRATUS_AMQP_MANAGEMENT_URL"] == ",".join(f"http://127.0.0.1:{mn.broker_port + 10000 + i}" for i in range(3))
    assert f"export STRATUS_SECRETS_DIR={mn.state_dir / 'secrets'}" in mn.output   # printed, not only written
    assert "STRATUS_AMQP_URL" not in (mn.state_dir / "services.env").read_text()   # no credentials there
    # RabbitMQ: one cluster of 3 nodes, named rabbit<i>@localhost, one cookie.
    assert mn.running_nodes() == {f"rabbit{i}@localhost" for i in (1, 2, 3)}
    cookie = mn.state_dir / "rabbitmq-cluster" / ".erlang.cookie"
    assert stat.S_IMODE(cookie.stat().st_mode) == 0o400 and len(cookie.read_text()) >= 20
    for i in (1, 2, 3):
        assert (mn.node_dir(i) / "mnesia").is_dir()
        conf = (mn.node_dir(i) / "rabbitmq.conf").read_text()
        assert f"management.tcp.port = {mn.broker_port + i - 1 + 10000}" in conf
    overview = mn.mgmt("/api/nodes")
    assert sorted(n["name"] for n in overview if n["running"]) == [f"rabbit{i}@localhost" for i in (1, 2, 3)]
    # The platform's accounts, cluster-wide, and no guest (bus/broker_accounts.py).
    assert "guest" not in [row.split("\t")[0] for row in mn.cli("rabbitmqctl", 1, "list_users").splitlines()]
    for component, tags in (("orchestrator", {"administrator", "impersonator"}), ("worker", {"impersonator"}),
                            ("gateway", {"impersonator"}), ("admin", {"administrator", "impersonator"})):
        user = mn.mgmt(f"/api/users/stratus-{component}")
        assert set(user["tags"] if isinstance(user["tags"], list) else user["tags"].split(",")) == tags, user
        url = (mn.state_dir / "secrets" / f"broker-{component}.url").read_text().strip()
        assert url.count(f"stratus-{component}:") == 3 and all(f":{mn.amqp_port(i)}/" in url for i in (1, 2, 3))
    # ZooKeeper: one leader, two followers, 1 s sessions possible.
    modes = sorted(mn.zk_modes().values())
    assert modes == ["follower", "follower", "leader"], modes
    for i in (1, 2, 3):
        d = mn.state_dir / "zookeeper-ensemble" / str(i)
        assert (d / "data" / "myid").read_text().strip() == str(i)
        cfg = (d / "zoo.cfg").read_text()
        assert "tickTime=200" in cfg and f"clientPort={mn.zk_port + i - 1}" in cfg
        assert all(f"server.{j}=127.0.0.1:{mn.zk_port + j - 1 + 707}:{mn.zk_port + j - 1 + 1707}" in cfg
                   for j in (1, 2, 3))
    # Twice does no harm: nothing restarts, every password is kept, and an
    # account the broker lost (as after its data was wiped) is made again.
    pids = [mn.broker_pid(i) for i in (1, 2, 3)] + [mn.zk_pid(i) for i in (1, 2, 3)]
    files = {f: f.read_text() for f in (mn.state_dir / "secrets").iterdir()}
    mn.cli("rabbitmqctl", 1, "delete_user", "stratus-gateway")
    out = mn.bring_back()
    assert out.count("already running") == 6, out
    assert [mn.broker_pid(i) for i in (1, 2, 3)] + [mn.zk_pid(i) for i in (1, 2, 3)] == pids
    assert {f: f.read_text() for f in (mn.state_dir / "secrets").iterdir()} == files
    import pika
    from bus.client import connection_params
    pika.BlockingConnection(connection_params(mn.account_url("gateway"))).close()   # it logs in again
    status = mn.services("status", "rabbitmq", "zookeeper").stdout
    assert status.count(": up on") == 3 and status.count("leader on") == 1 and status.count("follower on") == 2, status


def test_a_broker_account_is_made_with_the_first_management_node_dead(mn):
    """Users and permissions are cluster-wide: with node 1 killed, the
    management API client (every node's API in STRATUS_AMQP_MANAGEMENT_URL)
    makes, reads and deletes an account through another node."""
    import dataclasses
    import uuid

    from bus import broker_admin
    from bus.broker_admin import BrokerAdmin
    from bus.settings import load
    settings = dataclasses.replace(load(), amqp_url=mn.env["STRATUS_AMQP_URL"],
                                   amqp_management_url=mn.env["STRATUS_AMQP_MANAGEMENT_URL"])
    broker_admin._last_good.clear()
    user = f"stratus.test-mn-{uuid.uuid4().hex[:8]}"
    try:
        mn.kill_broker(1)
        admin = BrokerAdmin(settings)
        assert admin.order()[0].endswith(f":{mn.mgmt_port(1)}")
        t0 = time.monotonic()
        admin.put_user(user, uuid.uuid4().hex)
        admin.set_permissions(user, configure="^$", write="^$", read="^$")
        assert (admin.get_user(user) or {}).get("name") == user
        assert admin.delete_user(user) is True and admin.get_user(user) is None
        assert time.monotonic() - t0 < 10
        assert not admin.order()[0].endswith(f":{mn.mgmt_port(1)}")   # the node that answered comes first
    finally:
        healthy_everywhere(mn)
        try:
            BrokerAdmin(settings).delete_user(user)
        except Exception:
            pass


def test_the_log_and_the_request_queues_live_on_every_node(mn, tmp_path):
    cluster = make_cluster(mn, tmp_path)
    try:
        db = cluster.client()   # the platform's client declares the cluster's objects
        wait_for(lambda: db.connected, 20, what="the client to connect")
        q = mn.mgmt(f"/api/queues/%2F/{cluster.names.log_stream}")
        assert q["type"] == "stream" and q["arguments"]["x-initial-cluster-size"] == 3
        members = wait_for(lambda: (s := mn.stream_status(cluster.names.log_stream)) and len(s) == 3 and s, 20,
                           what="3 replicas of the stream")
        assert sorted(m["role"] for m in members) == ["replica", "replica", "writer"]
        assert {m["node"] for m in members} == {f"rabbit{i}@localhost" for i in (1, 2, 3)}
        for name in (cluster.names.write_queue, cluster.names.read_queue, cluster.names.master_read_queue,
                     cluster.names.dead_queue, cluster.names.snapshot_queue):
            q = mn.mgmt(f"/api/queues/%2F/{name}")
            assert q["type"] == "quorum", (name, q["type"])
            assert sorted(q["members"]) == [f"rabbit{i}@localhost" for i in (1, 2, 3)], (name, q["members"])
    finally:
        cluster.close()


def _kill_under_load(mn, cluster, victim_of, what: str) -> dict:
    """A master and a slave run by an orchestrator; 4 writers; kill -9 of the
    broker node victim_of(...) names; returns the figures. Asserts recovery
    within RECOVERY_LIMIT, no acknowledged write lost or doubled, and the
    slave applying every write from a live node."""
    orch = Orch(cluster)
    try:
        v = orch.wait_healthy_cluster(1, timeout=60)
        slave = next(w for w in v["workers"] if w["role"] == "slave")
        master = next(w for w in v["workers"] if w["role"] == "master")
        db = cluster.client(name="writers")
        db.write([EV_TABLE], timeout=20)
        with Writers(db, WRITERS) as writers:
            wait_for(lambda: len(writers.acked) >= 100, 30, what="100 acknowledged writes before the kill")
            victim = victim_of(slave, master)
            before = mn.node_of_process(slave["pid"])
            master_nodes = mn.node_of_process(master["pid"])
            mn.kill_broker(victim)
            t_kill = time.monotonic()
            recovery = recovery_time(writers, t_kill, what)
            print(f"\n{what} (rabbit{victim}) -> a write sent after it acknowledged in {recovery * 1000:.0f} ms")
            wait_for(lambda: len(writers.acked_after(t_kill)) >= 100, 30, what="writes flowing again")
        acked, stored = check_no_loss(db, writers)
        print(f"{acked} acknowledged writes, {stored} rows, {len(writers.failed)} unacknowledged attempts")
        assert recovery < RECOVERY_LIMIT, f"writes acknowledged again only after {recovery:.1f} s"
        # The slave (the same process, or its replacement) applies everything,
        # reading the log from a node that is alive.
        top = max(a[2] for a in writers.acked)
        v = wait_for(lambda: (v := orch.view()) and any(w["role"] == "slave" and w["ready"] and
                                                        w["applied_lsn"] >= top for w in v["workers"]) and v,
                     30, 0.2, what=f"a ready slave at LSN {top}")
        slave_now = next(w for w in v["workers"] if w["role"] == "slave" and w["applied_lsn"] >= top)
        after = mn.node_of_process(slave_now["pid"])
        assert after and victim not in after, f"the slave still talks to rabbit{victim}: {after}"
        return {"victim": victim, "recovery": recovery, "slave_before": before, "slave_after": after,
                "same_slave": slave_now["pid"] == slave["pid"], "acked": acked,
                "master_nodes": master_nodes}
    finally:
        cleanup(cluster, orch)


def test_kill_the_stream_leader_node_loses_no_acknowledged_write(mn, tmp_path):
    healthy_everywhere(mn)
    cluster = make_cluster(mn, tmp_path)
    try:
        r = _kill_under_load(mn, cluster, lambda slave, master: mn.stream_leader(cluster.names.log_stream),
                             "kill -9 of the stream's leader node")
        # A new leader among the two left, the stream still replicated on them.
        leader = mn.stream_leader(cluster.names.log_stream)
        assert leader != r["victim"]
    finally:
        cluster.close()


def test_a_slave_whose_node_dies_reads_the_log_from_another(mn, tmp_path):
    healthy_everywhere(mn)
    cluster = make_cluster(mn, tmp_path)
    try:
        def slave_node(slave, master):
            """A node the slave is connected to, one the master is not if there is one
            (a master cut mid-batch exits by design, and its slave would then be promoted)."""
            nodes = wait_for(lambda: mn.node_of_process(slave["pid"]), 10, what="the slave's broker connection")
            alone = nodes - mn.node_of_process(master["pid"])
            return min(alone or nodes)
        r = _kill_under_load(mn, cluster, slave_node, "kill -9 of the slave's broker node")
        assert r["victim"] in r["slave_before"]
        print(f"slave connected to rabbit{sorted(r['slave_before'])} before, rabbit{sorted(r['slave_after'])} after"
              f" ({'same process' if r['same_slave'] else 'replaced'}); master on rabbit{sorted(r['master_nodes'])}")
        if r["victim"] not in r["master_nodes"]:
            assert r["same_slave"], "the slave was replaced although only its own node died"
    finally:
        cluster.close()


def test_kill_the_zookeeper_leader_keeps_electing_and_serving(mn, tmp_path):
    healthy_everywhere(mn)
    cluster = make_cluster(mn, tmp_path)
    orch = Orch(cluster)
    try:
        v = orch.wait_healthy_cluster(1, timeout=60)
        db = cluster.client(name="writers")
        db.write([EV_TABLE], timeout=20)
        with Writers(db, WRITERS) as writers:
            wait_for(lambda: len(writers.acked) >= 50, 30, what="50 acknowledged writes before the kill")
            zk_leader = next(i for i, m in mn.zk_modes().items() if m == "leader")
            mn.kill_zk(zk_leader)
            t_kill = time.monotonic()
            modes = wait_for(lambda: (m := mn.zk_modes()) and sorted(x for x in m.values() if x) == ["follower", "leader"]
                             and m, 30, 0.1, what="a new ZooKeeper leader among the two left")
            print(f"\nZooKeeper leader (server {zk_leader}) killed -> new leader in "
                  f"{(time.monotonic() - t_kill) * 1000:.0f} ms: {modes}")
            recovery = recovery_time(writers, t_kill, "the ZooKeeper kill")
            print(f"a write sent after the ZooKeeper kill acknowledged in {recovery * 1000:.0f} ms")
            # Still electing: crash the master; the orchestrator elects the slave.
            term = orch.view()["term"]
            status, body, _ = orch.post("/api/v1/crash/master")
            assert status == 200, body
            t_crash = time.monotonic()
            v = orch.wait_healthy_cluster(1, timeout=60)
            assert v["term"] > term
            elected = recovery_time(writers, t_crash, "the master's crash")
            print(f"master crashed with a ZooKeeper server down -> term {v['term']}; a write sent after the "
                  f"crash call returned acknowledged {elected * 1000:.0f} ms later")
            wait_for(lambda: len(writers.acked_after(t_crash)) >= 50, 30, what="writes flowing again")
        acked, stored = check_no_loss(db, writers)
        print(f"{acked} acknowledged writes, {stored} rows; term {v['term']}")
        assert recovery < RECOVERY_LIMIT
        assert mn.zk_pid(zk_leader) is None   # served by two servers throughout
    finally:
        cleanup(cluster, orch)
        cluster.close()
    healthy_everywhere(mn)   # and the third comes back
    assert sorted(mn.zk_modes().values()) == ["follower", "follower", "leader"]
