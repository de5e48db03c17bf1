"""The network wall of the process runtime (docs/security.md): an nftables
table that refuses every new connection a tenant's uid opens, except to the
broker's AMQP port(s). Loopback is no boundary when tenant code shares the
host: this is what makes ZooKeeper, the orchestrator's API, the management
API, Prometheus, the workers' metrics and other tenants' instances
unreachable from inside an instance. Answers to connections made *to* an
instance (the gateway's) are established traffic and pass.

One table for the host, `inet stratus_walls`, shared by every platform on it
(every test cluster too): the rules are fixed, keyed by the tenants' uid
range; each platform adds its broker ports to the set `tenant_ports`
(adding an element that is there is a no-op). Made under a file lock, so two
orchestrators starting together make it once."""
from __future__ import annotations

import fcntl
import logging
import subprocess
from urllib.parse import urlsplit

log = logging.getLogger("stratus.orchestrator.netwall")

TABLE = "stratus_walls"
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
  set tenant_ports {{ type inet_service; }}
  chain output {{
    type filter hook output priority 0; policy accept;
    meta skuid != {lo}-{hi} accept
    ct state established,related accept
    tcp dport @tenant_ports accept
    meta l4proto tcp reject with tcp reset
    reject
  }}
}}
"""


def _nft(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["nft", *args], input=stdin, capture_output=True, text=True, timeout=20)


def ensure(uids: tuple[int, int], ports: list[int]) -> None:
    """Make the table if it is missing, and let tenants reach `ports`."""
    with open(LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        if _nft("list", "table", "inet", TABLE).returncode != 0:
            r = _nft("-f", "-", stdin=ruleset(uids))
            if r.returncode != 0:
                raise RuntimeError(f"cannot load the network wall: {r.stderr.strip()}")
            log.info("network wall loaded: tenant uids %d-%d may connect to the broker only", *uids)
        if ports:
            elems = ", ".join(str(p) for p in ports)
            r = _nft("add", "element", "inet", TABLE, "tenant_ports", f"{{ {elems} }}")
            if r.returncode != 0:
                raise RuntimeError(f"cannot open the broker's ports {elems} to tenants: {r.stderr.strip()}")
