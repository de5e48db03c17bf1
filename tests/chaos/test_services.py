"""The chaos run's servers (stratus/chaos/services.py): how the settings name
them, how a listener's pid is found, and a private ZooKeeper server killed
with SIGKILL and started again (the one kind of server cheap enough to start
in the main suite; the chaos stage starts RabbitMQ nodes too)."""
from __future__ import annotations

import os
import shutil
import socket
import threading

import pytest

from stratus.chaos.services import PrivateServices, ServiceError, SharedServices, listener_pid, zk_mode


def test_shared_services_are_named_by_the_settings():
    s = SharedServices("amqp://u%40x:p%2Fw@127.0.0.1:5672/v%2Fh, amqp://u%40x:p%2Fw@127.0.0.1:5673/v%2Fh",
                       "127.0.0.1:2181,127.0.0.1:2182")
    assert [(b.host, b.port) for b in s.brokers] == [("127.0.0.1", 5672), ("127.0.0.1", 5673)]
    assert [(z.host, z.port) for z in s.zks] == [("127.0.0.1", 2181), ("127.0.0.1", 2182)]
    assert (s.user, s.password, s.vhost) == ("u@x", "p/w", "v/h")
    # URLs for proxies keep the account and the vhost, quoted
    assert s.amqp_url("127.0.0.1", 9999) == "amqp://u%40x:p%2Fw@127.0.0.1:9999/v%2Fh"
    assert s.direct_zk_hosts() == "127.0.0.1:2181,127.0.0.1:2182"
    assert s.direct_amqp_url().count(",") == 1


def test_listener_pid_finds_this_process():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    try:
        assert listener_pid(srv.getsockname()[1]) == os.getpid()
    finally:
        srv.close()


def test_zk_mode_reads_the_srvr_answer_and_none_when_nothing_serves():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def answer():
        c, _ = srv.accept()
        with c:
            assert c.recv(4) == b"srvr"
            c.sendall(b"Zookeeper version: 3.8.0\nLatency min/avg/max: 0/0/0\nMode: follower\nNode count: 5\n")
    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        assert zk_mode("127.0.0.1", port) == "follower"
    finally:
        t.join(5)
        srv.close()
    assert zk_mode("127.0.0.1", port) is None


@pytest.mark.skipif(shutil.which("java") is None or not os.path.exists("/usr/share/java/zookeeper.jar"),
                    reason="needs the zookeeper package (scripts/services.sh install)")
def test_a_private_zookeeper_server_is_killed_and_started_again(tmp_path):
    try:
        s = PrivateServices(tmp_path, brokers=1, zks=1)
    except ServiceError as exc:
        pytest.skip(str(exc))
    z = s.zks[0]
    try:
        z.write_config(s.zks)
        z.start(timeout=60)
        assert z.mode() == "standalone"
        assert listener_pid(z.port) == z.pid()
        pid = z.kill()
        assert pid and z.pid() is None and z.mode() is None
        z.start(timeout=60)
        assert z.mode() == "standalone" and z.pid() != pid
    finally:
        s.close()
    assert z.pid() is None
