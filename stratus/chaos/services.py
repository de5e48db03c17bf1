"""The servers a chaos run stands on: RabbitMQ nodes and ZooKeeper servers
that the run may kill -9 and start again.

Two kinds, chosen by the runner's --services (STRATUS_CHAOS_SERVICES):

  private (the default)  the run starts its own RabbitMQ node(s) and ZooKeeper
      server(s) from the OS packages, on free ports, with their data under the
      run's directory, and removes them at the end. Killing them harms no one
      else on the machine (other tests keep the shared 5672/2181). With more
      than one node, the RabbitMQ nodes form one cluster (join_cluster, one
      Erlang cookie) and the ZooKeeper servers one ensemble (server.N lines,
      myid files).
  shared  the servers that scripts/services.sh runs, as STRATUS_AMQP_URL (a
      comma-separated list of nodes, as bus/client.py takes it) and
      STRATUS_ZK_HOSTS name them. A killed one is brought back by
      `scripts/services.sh start`. This disturbs every other user of those
      servers: use it on a machine of its own.

Each server is a Node: name, host, port, pid(), kill() (SIGKILL to its process
group), start() (bounded wait until it answers), alive(). A Services holds
.brokers and .zks and knows, for RabbitMQ, which node leads a stream."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import uuid
from pathlib import Path

from bus.ports import free_port

log = logging.getLogger("stratus.chaos.services")

ROOT = Path(__file__).resolve().parents[2]
RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
RABBITMQCTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
ZK_CLASSPATH = "/etc/zookeeper/conf:/usr/share/java/zookeeper.jar"


class ServiceError(RuntimeError):
    pass


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def zk_mode(host: str, port: int, timeout: float = 1.0) -> str | None:
    """The server's mode by the `srvr` four-letter word: standalone, leader,
    follower; None when it does not serve."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"srvr")
            s.settimeout(timeout)
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("Mode:"):
            return line.split(":", 1)[1].strip()
    return None


def listener_pid(port: int) -> int | None:
    """The pid of the process listening on TCP `port` (any address)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) > 9 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(int(parts[9]))
        except OSError:
            continue
    if not inodes:
        return None
    from .proxy import pid_of_inode
    for inode in inodes:
        pid = pid_of_inode(inode)
        if pid:
            return pid
    return None


def _wait(pred, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise ServiceError(f"timed out after {timeout:g}s waiting for {what}")


class Node:
    kind = "node"

    def __init__(self, name: str, host: str, port: int):
        self.name, self.host, self.port = name, host, port

    def __repr__(self) -> str:
        return f"{self.kind}:{self.name}@{self.host}:{self.port}"

    def pid(self) -> int | None:
        return listener_pid(self.port)

    def alive(self) -> bool:
        return port_open(self.host, self.port)

    def kill(self) -> int | None:
        """SIGKILL to the server's process group (its helpers die with it)."""
        pid = self.pid()
        if pid is None:
            return None
        try:
            pgid = os.getpgid(pid)
            if pgid == pid or pgid == getattr(self, "_pgid", None):
                os.killpg(pgid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _wait(lambda: not self.alive(), 15, f"{self} to die")
        return pid

    def start(self, timeout: float = 90.0) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self.kill()


# --- private servers ------------------------------------------------------------------
class _Started(Node):
    """A server this run started itself (`proc`, in a session of its own)."""
    proc: subprocess.Popen | None = None

    def pid(self) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            return self.proc.pid
        return None

    def kill(self) -> int | None:
        """SIGKILL to its process group, then reap it."""
        pid = self.pid()
        if pid is None:
            return None
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        return pid


class PrivateZK(_Started):
    kind = "zookeeper"

    def __init__(self, index: int, base: Path, port: int, peer: int, election: int):
        super().__init__(f"zk{index}", "127.0.0.1", port)
        self.index, self.base = index, base
        self.peer, self.election = peer, election
        self.dir = base / f"zk{index}"
        self.proc: subprocess.Popen | None = None

    def write_config(self, ensemble: list["PrivateZK"]) -> None:
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        lines = ["tickTime=200", "initLimit=10", "syncLimit=5", "minSessionTimeout=400",
                 "maxSessionTimeout=20000", f"dataDir={self.dir / 'data'}", f"clientPort={self.port}",
                 "clientPortAddress=127.0.0.1", "maxClientCnxns=0", "admin.enableServer=false",
                 "4lw.commands.whitelist=ruok,srvr,mntr", "autopurge.snapRetainCount=3",
                 "autopurge.purgeInterval=1"]
        if len(ensemble) > 1:
            lines += [f"server.{z.index}=127.0.0.1:{z.peer}:{z.election}" for z in ensemble]
            (self.dir / "data" / "myid").write_text(f"{self.index}\n")
        (self.dir / "zoo.cfg").write_text("\n".join(lines) + "\n")

    def alive(self) -> bool:
        return zk_mode(self.host, self.port) is not None

    def start(self, timeout: float = 60.0, wait: bool = True) -> None:
        if self.pid() is not None:
            return
        logf = open(self.dir / "server.log", "ab")
        self.proc = subprocess.Popen(
            ["java", f"-Dzookeeper.log.dir={self.dir}", "-Dzookeeper.log.file=zookeeper.log", "-Xmx256m",
             "-XX:+UseSerialGC", "-cp", ZK_CLASSPATH, "org.apache.zookeeper.server.quorum.QuorumPeerMain",
             str(self.dir / "zoo.cfg")],
            stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        logf.close()
        if wait:
            self.wait_serving(timeout)

    def wait_serving(self, timeout: float = 60.0) -> None:
        _wait(self.alive, timeout, f"{self} to serve")

    def mode(self) -> str | None:
        return zk_mode(self.host, self.port)


class PrivateRabbit(_Started):
    kind = "rabbitmq"

    def __init__(self, index: int, base: Path, tag: str, port: int, dist: int):
        super().__init__(f"chaos-{tag}-{index}@localhost", "127.0.0.1", port)
        self.index, self.base, self.dist = index, base, dist
        self.dir = base / f"rabbit{index}"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict:
        home = self.base / "erlang-home"
        return {**os.environ, "HOME": str(home), "RABBITMQ_NODENAME": self.name,
                "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_DIST_PORT": str(self.dist), "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.dir / "log"), "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
                "RABBITMQ_PID_FILE": str(self.dir / "pid"), "RABBITMQ_CONF_ENV_FILE": "/dev/null",
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config")}

    def write_config(self) -> None:
        for d in ("mnesia", "log"):
            (self.dir / d).mkdir(parents=True, exist_ok=True)
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "advanced.config").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(
            "loopback_users = none\n"
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            # No disk alarm on a busy CI disk: the run measures faults, not disk space.
            "disk_free_limit.absolute = 50MB\n")

    def ctl(self, *args: str, timeout: float = 60.0, check: bool = True) -> str:
        r = subprocess.run([RABBITMQCTL, "-n", self.name, "-q", *args], env=self.env(), capture_output=True,
                           text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise ServiceError(f"rabbitmqctl {' '.join(args)} on {self.name}: {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout

    def start(self, timeout: float = 90.0, wait: bool = True) -> None:
        if self.pid() is not None:
            return
        logf = open(self.dir / "server.log", "ab")
        self.proc = subprocess.Popen([RABBITMQ_SERVER], env=self.env(), stdout=logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        logf.close()
        if wait:
            self.wait_serving(timeout)

    def wait_serving(self, timeout: float = 90.0) -> None:
        _wait(lambda: self.pid() is None or self.alive(), timeout, f"{self} to listen")
        if self.pid() is None:
            raise ServiceError(f"{self} exited at start; see {self.dir / 'server.log'}")
        self.ctl("await_startup", "--timeout", str(int(timeout)), timeout=timeout + 10)

    def stop(self) -> None:
        if self.pid() is None:
            return
        try:
            self.ctl("stop", timeout=30)
            self.proc.wait(20)
        except (ServiceError, subprocess.TimeoutExpired):
            self.kill()


class Services:
    """The broker nodes and ZooKeeper servers of one run."""
    kind = "services"

    def __init__(self):
        self.brokers: list[Node] = []
        self.zks: list[Node] = []
        self.user, self.password, self.vhost = "", "", "/"

    def amqp_url(self, host: str, port: int) -> str:
        return (f"amqp://{urllib.parse.quote(self.user, safe='')}:{urllib.parse.quote(self.password, safe='')}"
                f"@{host}:{port}/{urllib.parse.quote(self.vhost, safe='')}")

    def direct_amqp_url(self) -> str:
        """Every node, comma-separated (bus/client.py's list of nodes)."""
        return ",".join(self.amqp_url(b.host, b.port) for b in self.brokers)

    def direct_zk_hosts(self) -> str:
        return ",".join(f"{z.host}:{z.port}" for z in self.zks)

    def bring_back(self, node: Node, timeout: float = 90.0) -> None:
        node.start(timeout)

    def stream_leader(self, queue: str) -> Node | None:
        return self.brokers[0] if len(self.brokers) == 1 else None

    def describe(self) -> str:
        return f"{self.kind}: {len(self.brokers)} RabbitMQ node(s), {len(self.zks)} ZooKeeper server(s)"

    def close(self) -> None:
        pass


class PrivateServices(Services):
    kind = "private"

    def __init__(self, base: Path, brokers: int = 1, zks: int = 1):
        super().__init__()
        for tool in (RABBITMQ_SERVER, RABBITMQCTL):
            if not os.path.exists(tool):
                raise ServiceError(f"{tool} is missing: install rabbitmq-server (scripts/services.sh install)")
        if shutil.which("java") is None or not os.path.exists("/usr/share/java/zookeeper.jar"):
            raise ServiceError("java and /usr/share/java/zookeeper.jar are needed: install zookeeper")
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.tag = uuid.uuid4().hex[:6]
        home = self.base / "erlang-home"
        home.mkdir(exist_ok=True)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(uuid.uuid4().hex.upper())
            cookie.chmod(0o400)
        self.zks = [PrivateZK(i, self.base, free_port(), free_port(), free_port()) for i in range(1, zks + 1)]
        self.brokers = [PrivateRabbit(i, self.base, self.tag, free_port(), free_port()) for i in range(1, brokers + 1)]

    def start(self, timeout: float = 120.0) -> "PrivateServices":
        for z in self.zks:
            z.write_config(self.zks)
        for z in self.zks:
            z.start(wait=False)
        for b in self.brokers:
            b.write_config()
        self.brokers[0].start(timeout)
        for b in self.brokers[1:]:   # join the first node's cluster
            b.start(timeout)
            b.ctl("stop_app")
            b.ctl("join_cluster", self.brokers[0].name)
            b.ctl("start_app")
            b.ctl("await_startup", "--timeout", str(int(timeout)), timeout=timeout + 10)
        # No guest: the run's one account, with a generated password, an
        # administrator (tenants' accounts) that publishes for tenants
        # (impersonator: validated user_id); every process of the run uses it.
        import secrets
        self.user, self.password = "stratus-admin", secrets.token_urlsafe(24)
        first = self.brokers[0]
        first.ctl("add_user", self.user, self.password)
        first.ctl("set_user_tags", self.user, "administrator", "impersonator")
        first.ctl("set_permissions", "-p", self.vhost, self.user, ".*", ".*", ".*")
        first.ctl("delete_user", "guest")
        for z in self.zks:
            z.wait_serving(timeout)
        if len(self.zks) > 1:
            _wait(lambda: any(z.mode() == "leader" for z in self.zks), timeout, "the ensemble to elect a leader")
        return self

    def stream_leader(self, queue: str) -> Node | None:
        """The node that leads the stream (or quorum queue) `queue`."""
        if len(self.brokers) == 1:
            return self.brokers[0]
        for b in self.brokers:
            if b.pid() is None:
                continue
            try:
                out = b.ctl("list_queues", "name", "leader", "--formatter", "json", timeout=20)
            except (ServiceError, subprocess.TimeoutExpired):
                continue
            try:
                rows = json.loads(out or "[]")
            except ValueError:
                continue
            for row in rows:
                if row.get("name") == queue and row.get("leader"):
                    return next((x for x in self.brokers if x.name == row["leader"]), None)
            return None
        return None

    def zk_leader(self) -> Node | None:
        for z in self.zks:
            if z.mode() in ("leader", "standalone"):
                return z
        return None

    def close(self) -> None:
        for b in reversed(self.brokers):
            try:
                b.kill()
            except Exception:
                pass
        for z in self.zks:
            try:
                z.kill()
            except Exception:
                pass


class SharedServices(Services):
    """The servers scripts/services.sh runs, named by the settings."""
    kind = "shared"

    def __init__(self, amqp_url: str, zk_hosts: str):
        super().__init__()
        for i, url in enumerate(u.strip() for u in amqp_url.split(",") if u.strip()):
            p = urllib.parse.urlparse(url)
            if i == 0:
                self.user = urllib.parse.unquote(p.username or "")
                self.password = urllib.parse.unquote(p.password or "")
                self.vhost = urllib.parse.unquote(p.path[1:]) if len(p.path) > 1 else "/"
            self.brokers.append(Node(f"rabbit{i + 1}", p.hostname or "127.0.0.1", p.port or 5672))
            self.brokers[-1].kind = "rabbitmq"
        for i, hp in enumerate(h.strip() for h in zk_hosts.split(",") if h.strip()):
            host, _, port = hp.rpartition(":")
            self.zks.append(Node(f"zk{i + 1}", host or "127.0.0.1", int(port or 2181)))
            self.zks[-1].kind = "zookeeper"

    def start(self, timeout: float = 120.0) -> "SharedServices":
        for n in self.brokers + self.zks:
            if not n.alive():
                self.bring_back(n, timeout)
        return self

    def bring_back(self, node: Node, timeout: float = 120.0) -> None:
        subprocess.run([str(ROOT / "scripts" / "services.sh"), "start"], capture_output=True, timeout=timeout + 60)
        _wait(node.alive, timeout, f"{node} to serve again")

    def stream_leader(self, queue: str) -> Node | None:
        """The node leading `queue`, by the management API (the "leader" of a
        stream or quorum queue); scripts/services.sh names node i rabbit<i>,
        the i-th URL of STRATUS_AMQP_URL."""
        if len(self.brokers) == 1:
            return self.brokers[0]
        import base64
        import urllib.request

        from bus.brokers import management_urls
        from bus.settings import load
        s = load()
        auth = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        leader = ""
        # Every node's management API in turn (one may be the node just killed).
        for base in management_urls(s.amqp_management_url, s.amqp_url):
            url = f"{base}/api/queues/{urllib.parse.quote(self.vhost, safe='')}/{urllib.parse.quote(queue, safe='')}"
            req = urllib.request.Request(url, headers={"Authorization": f"Basic {auth}"})
            try:
                with opener.open(req, timeout=5) as resp:
                    leader = json.loads(resp.read()).get("leader") or ""
                break
            except (OSError, ValueError):
                continue
        if not leader:
            return None
        name = leader.split("@")[0]
        for i, b in enumerate(self.brokers):
            if name == f"rabbit{i + 1}":
                return b
        return None


def make_services(kind: str, base: Path, *, brokers: int, zks: int) -> Services:
    if kind == "private":
        return PrivateServices(base, brokers=brokers, zks=zks).start()
    if kind == "shared":
        from bus.settings import load
        s = load()
        return SharedServices(s.amqp_url, s.zk_hosts).start()
    raise ValueError(f"--services {kind!r}: private or shared")
