"""The network wall of the process runtime (docs/security.md): an nftables
table that lets a tenant's uid reach the broker's AMQP port(s), and on this
host only sockets of its own account. Loopback is no boundary when tenant
code shares the host: this is what makes ZooKeeper, the orchestrator's API,
the management API, Prometheus, the workers' metrics, the gateway and other
tenants' instances unreachable from inside an instance, while the instance
may still talk to itself (pika, for one, wakes its I/O loop through a TCP
pair on 127.0.0.1) and the gateway's connections to it pass.

How, in the output hook (the only place a packet's socket owner is known):

- a tenant uid's new TCP connection to the broker's ports passes; to any
  other address of this host it passes too, but its conntrack entry is
  marked with the connecting uid (the map `uid_mark`, one element per
  tenant account); anything else (other hosts, UDP, ICMP) is refused;
- the answer to a marked connection, the listener's SYN-ACK, carries the
  listener's owner (the kernel gives the listening socket for a request
  socket): it passes only when that owner is the connecting uid (the set
  `same_uid`), and is refused otherwise, so no connection to another
  account's socket (root's, a service account's, another tenant's) is ever
  established and no byte reaches it; the tenant's connect times out;
- answers to connections made *to* a tenant's socket (the gateway's) are
  not marked and pass.

One table for the host, `inet stratus_walls`, shared by every platform on it
(every test cluster too): the rules are fixed, keyed by the tenants' uid
range; each platform adds its broker ports to `tenant_ports` and each
account its elements (adding what is there is a no-op). Made under a file
lock, so two orchestrators starting together make it once; a table of an
older layout is replaced."""
from __future__ import annotations

import fcntl
import logging
import subprocess
from urllib.parse import urlsplit

log = logging.getLogger("stratus.orchestrator.netwall")

TABLE = "stratus_walls"
LAYOUT = "stratus-walls-2"     # the table's comment: another one is an older layout, replaced
LOCK = "/run/stratus-walls.lock"


def broker_ports(amqp_url: str) -> list[int]:
    """Every AMQP port of a (comma-separated) broker URL list."""
    ports = set()
    for url in (u.strip() for u in amqp_url.split(",")):
        if url:
            p = urlsplit(url)
            ports.add(p.port or (5671 if p.scheme == "amqps" else 5672))
    return sorted(ports)


def ruleset(uids: tuple[int, int]) -> str:
    """The table (pure): what nft -f loads when it is missing."""
    lo, hi = uids
    return f"""table inet {TABLE} {{
  comment "{LAYOUT}"
  set tenant_ports {{ type inet_service; }}
  map uid_mark {{ type uid : mark; }}
  set same_uid {{ type uid . mark; }}
  chain output {{
    type filter hook output priority 0; policy accept;
    ct direction reply ct mark {lo}-{hi} tcp flags & (syn | ack) == syn | ack jump answer
    meta skuid != {lo}-{hi} accept
    ct state established,related accept
    tcp dport @tenant_ports accept
    fib daddr type local meta l4proto tcp ct mark set meta skuid map @uid_mark accept
    meta l4proto tcp reject with tcp reset
    reject
  }}
  chain answer {{
    meta skuid . ct mark @same_uid accept
    reject with tcp reset
  }}
}}
"""


def _nft(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["nft", *args], input=stdin, capture_output=True, text=True, timeout=20)


def ensure(uids: tuple[int, int], ports: list[int]) -> None:
    """Make the table if it is missing (or of an older layout), and let
    tenants reach `ports`."""
    with open(LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        listed = _nft("list", "table", "inet", TABLE)
        if listed.returncode == 0 and LAYOUT not in listed.stdout:
            _nft("delete", "table", "inet", TABLE)
            listed = _nft("list", "table", "inet", TABLE)
        if listed.returncode != 0:
            r = _nft("-f", "-", stdin=ruleset(uids))
            if r.returncode != 0:
                raise RuntimeError(f"cannot load the network wall: {r.stderr.strip()}")
            log.info("network wall loaded: tenant uids %d-%d reach the broker and their own sockets only", *uids)
        if ports:
            elems = ", ".join(str(p) for p in ports)
            r = _nft("add", "element", "inet", TABLE, "tenant_ports", f"{{ {elems} }}")
            if r.returncode != 0:
                raise RuntimeError(f"cannot open the broker's ports {elems} to tenants: {r.stderr.strip()}")


def admit(uid: int) -> None:
    """Let tenant account `uid` reach its own sockets on this host."""
    for what, elem in (("uid_mark", f"{{ {uid} : {uid} }}"), ("same_uid", f"{{ {uid} . {uid} }}")):
        r = _nft("add", "element", "inet", TABLE, what, elem)
        if r.returncode != 0:
            raise RuntimeError(f"cannot admit uid {uid} to the network wall: {r.stderr.strip()}")


def forget(uid: int) -> None:
    """The account is gone: its elements go (best effort)."""
    _nft("delete", "element", "inet", TABLE, "uid_mark", f"{{ {uid} : {uid} }}")
    _nft("delete", "element", "inet", TABLE, "same_uid", f"{{ {uid} . {uid} }}")
