"""A RabbitMQ cluster and a ZooKeeper ensemble of their own for a test,
started and stopped through scripts/services.sh (STRATUS_BROKER_NODES,
STRATUS_ZK_NODES) with a state directory of the test's and port bases that
clash with nothing listening (so the shared single node on 5672 and the
single ZooKeeper on 2181 are never touched).

    with MultiNode(tmp, brokers=3, zks=3) as mn:
        mn.env              # the exports services.sh printed (STRATUS_SECRETS_DIR, ...), and
                            # STRATUS_AMQP_URL: the cluster's admin account (every node)
        mn.stream_leader(q) # i of the node whose stream replica is the writer
        mn.kill_broker(i)   # kill -9 of rabbit<i>@localhost
        mn.bring_back()     # services.sh start again: the killed ones return

Node i (1-based) is rabbit<i>@localhost on AMQP port broker_port + i - 1;
ZooKeeper server i serves clients on zk_port + i - 1 (services.sh's layout).
Every wait is bounded; stop() stops only what this state directory started."""
from __future__ import annotations

import base64
import json
import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ROOT / "scripts" / "services.sh"
RMQ_BIN = Path("/usr/lib/rabbitmq/bin")
ZK_JAR = Path("/usr/share/java/zookeeper.jar")


class Unavailable(Exception):
    """What a cluster needs is not on this machine (the reason says what)."""


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.3):
            return False
    except OSError:
        return True


def broker_ports(base: int, i: int) -> list[int]:
    """AMQP, management, prometheus and distribution ports of node i."""
    amqp = base + i - 1
    return [amqp, amqp + 10000, amqp + 10020, amqp + 20000]


def zk_ports(base: int, i: int) -> list[int]:
    """Client, quorum and election ports of server i."""
    client = base + i - 1
    return [client, client + 707, client + 1707]


def pick_base(candidates, nodes: int, ports_of) -> int:
    for base in candidates:
        if all(port_free(p) for i in range(1, nodes + 1) for p in ports_of(base, i)):
            return base
    raise Unavailable("no free port base for the test's servers")


def zk_ask(port: int, word: str = "srvr", timeout: float = 1.0) -> str | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(word.encode())   # the server answers and closes
            out = b""
            while chunk := s.recv(4096):
                out += chunk
            return out.decode(errors="replace")
    except OSError:
        return None


def zk_mode(port: int) -> str | None:
    """leader, follower or standalone; None when the server does not serve."""
    for line in (zk_ask(port) or "").splitlines():
        if line.startswith("Mode: "):
            return line[6:].strip()
    return None


def wait(pred, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class MultiNode:
    def __init__(self, state_dir: Path, *, brokers: int = 3, zks: int = 3, start_timeout: float = 240.0):
        missing = [str(p) for p in (RMQ_BIN / "rabbitmq-server", ZK_JAR, Path("/usr/bin/java")) if not p.exists()]
        if missing:
            raise Unavailable(f"RabbitMQ and ZooKeeper from the OS packages are needed (missing: {', '.join(missing)}); "
                              "scripts/services.sh install installs them")
        if brokers < 2 and zks < 2:
            raise ValueError("MultiNode runs several RabbitMQ nodes or ZooKeeper servers (brokers or zks >= 2)")
        self.state_dir = Path(state_dir)
        self.brokers, self.zks = brokers, zks
        self.start_timeout = start_timeout
        self.broker_port = pick_base(range(5780, 6400, 20), brokers, broker_ports)
        self.zk_port = pick_base(range(2281, 2700, 10), zks, zk_ports)
        self.env: dict[str, str] = {}
        self.output = ""

    # --- services.sh ------------------------------------------------------------------------
    def services(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STRATUS_")}
        env.update(STRATUS_STATE_DIR=str(self.state_dir), STRATUS_BROKER_NODES=str(self.brokers),
                   STRATUS_BROKER_PORT=str(self.broker_port), STRATUS_ZK_NODES=str(self.zks),
                   STRATUS_ZK_PORT=str(self.zk_port))
        return subprocess.run([str(SERVICES), *args], env=env, capture_output=True, text=True,
                              timeout=timeout or self.start_timeout)

    def start(self) -> "MultiNode":
        comps = [c for c, n in (("rabbitmq", self.brokers), ("zookeeper", self.zks)) if n > 1]
        r = self.services("start", *comps)
        self.output = r.stdout + r.stderr
        if r.returncode != 0:
            raise RuntimeError(f"scripts/services.sh start failed ({r.returncode}):\n{self.output[-4000:]}")
        self.env = {}
        for line in (self.state_dir / "services.env").read_text().splitlines():
            if line.startswith("export "):
                k, _, v = line[len("export "):].partition("=")
                self.env[k] = shlex.split(v)[0] if v else ""
        # The tests' own account on this cluster (services.sh made the
        # platform's accounts there, no guest); components started with
        # STRATUS_SECRETS_DIR and no STRATUS_AMQP_URL use their own.
        self.env["STRATUS_AMQP_URL"] = self.account_url("admin")
        return self

    def account_url(self, component: str) -> str:
        """STRATUS_AMQP_URL of a platform account of this cluster (every node)."""
        return (Path(self.env.get("STRATUS_SECRETS_DIR") or self.state_dir / "secrets")
                / f"broker-{component}.url").read_text().strip()

    def bring_back(self) -> str:
        """services.sh start again: nodes and servers that died start, the rest are left alone."""
        r = self.services("start", *[c for c, n in (("rabbitmq", self.brokers), ("zookeeper", self.zks)) if n > 1])
        if r.returncode != 0:
            raise RuntimeError(f"scripts/services.sh start failed ({r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")
        return r.stdout

    def stop(self) -> str:
        r = self.services("stop", "rabbitmq", "zookeeper", timeout=180)
        return r.stdout + r.stderr

    def __enter__(self) -> "MultiNode":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- RabbitMQ ------------------------------------------------------------------------------
    def node_dir(self, i: int) -> Path:
        return self.state_dir / "rabbitmq-cluster" / f"rabbit{i}"

    def amqp_port(self, i: int) -> int:
        return self.broker_port + i - 1

    def mgmt_port(self, i: int) -> int:
        return self.broker_port + i - 1 + 10000

    def broker_pid(self, i: int) -> int | None:
        try:
            pid = int((self.node_dir(i) / "rabbit.pid").read_text().strip())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def broker_alive(self, i: int) -> bool:
        return self.broker_pid(i) is not None

    def kill_broker(self, i: int) -> int:
        """kill -9 of node i (its Erlang VM); returns the pid killed."""
        pid = self.broker_pid(i)
        assert pid, f"rabbit{i} is not running"
        os.kill(pid, signal.SIGKILL)
        wait(lambda: not _alive(pid), 10, f"rabbit{i} (pid {pid}) to die")
        return pid

    def cli(self, tool: str, i: int, *args: str, timeout: float = 60) -> str:
        """rabbitmqctl / rabbitmq-streams / rabbitmq-queues against node i."""
        env = {**os.environ, "HOME": str(self.state_dir / "rabbitmq-cluster")}
        r = subprocess.run([str(RMQ_BIN / tool), "-q", "-n", f"rabbit{i}@localhost", *args], env=env,
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} on rabbit{i}: {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout

    def live_brokers(self) -> list[int]:
        return [i for i in range(1, self.brokers + 1) if self.broker_alive(i)]

    def running_nodes(self) -> set[str]:
        i = self.live_brokers()[0]
        return set(json.loads(self.cli("rabbitmqctl", i, "cluster_status", "--formatter", "json"))["running_nodes"])

    def stream_status(self, queue: str) -> list[dict]:
        """rabbitmq-streams stream_status, asked of a live node: [{role, node, ...}]."""
        i = self.live_brokers()[0]
        return json.loads(self.cli("rabbitmq-streams", i, "stream_status", queue, "--formatter", "json"))

    def stream_leader(self, queue: str) -> int:
        """i of the node whose replica of `queue` is the writer (the stream's leader)."""
        writer = [m["node"] for m in self.stream_status(queue) if m.get("role") == "writer"]
        assert len(writer) == 1, f"no single writer for {queue}: {writer}"
        return int(writer[0].split("@")[0].removeprefix("rabbit"))

    def mgmt(self, path: str, timeout: float = 10):
        """GET on the management API of the first live node."""
        u = urllib.parse.urlparse(self.env["STRATUS_AMQP_URL"].split(",")[0])
        user, password = urllib.parse.unquote(u.username or ""), urllib.parse.unquote(u.password or "")
        auth = base64.b64encode(f"{user}:{password}".encode()).decode()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        last = None
        for i in self.live_brokers():
            req = urllib.request.Request(f"http://127.0.0.1:{self.mgmt_port(i)}{path}",
                                         headers={"Authorization": f"Basic {auth}"})
            try:
                with opener.open(req, timeout=timeout) as r:
                    return json.loads(r.read())
            except OSError as exc:
                last = exc
        raise RuntimeError(f"no management API answered {path}: {last}")

    def node_of_process(self, pid: int) -> set[int]:
        """The broker nodes (i) that process `pid` holds an established TCP
        connection to, read from /proc (its sockets' inodes in /proc/net/tcp*)."""
        inodes = set()
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            return set()
        ports = {self.amqp_port(i): i for i in range(1, self.brokers + 1)}
        found = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                lines = Path(table).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                f = line.split()
                remote_port = int(f[2].rsplit(":", 1)[1], 16)
                if f[3] == "01" and f[9] in inodes and remote_port in ports:   # 01: ESTABLISHED
                    found.add(ports[remote_port])
        return found

    # --- ZooKeeper -----------------------------------------------------------------------------
    def zk_client_port(self, i: int) -> int:
        return self.zk_port + i - 1

    def zk_modes(self) -> dict[int, str | None]:
        return {i: zk_mode(self.zk_client_port(i)) for i in range(1, self.zks + 1)}

    def zk_pid(self, i: int) -> int | None:
        try:
            pid = int((self.state_dir / "zookeeper-ensemble" / str(i) / "zookeeper.pid").read_text().strip())
            return pid if _alive(pid) else None   # a killed server not reaped yet is a zombie, not alive
        except (OSError, ValueError):
            return None

    def kill_zk(self, i: int) -> int:
        pid = self.zk_pid(i)
        assert pid, f"ZooKeeper server {i} is not running"
        os.kill(pid, signal.SIGKILL)
        wait(lambda: not _alive(pid), 10, f"ZooKeeper server {i} (pid {pid}) to die")
        return pid


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
