"""The platform's own broker accounts: one per component, each with the
least it needs (docs/architecture.md, "The platform's broker accounts"). No `guest`:
scripts/services.sh deletes it and makes these accounts with generated
passwords, bootstrapped through rabbitmqctl (`python3 -m bus.broker_accounts`).

    component      account                tags                        permissions (vhost /)
    orchestrator   stratus-orchestrator   administrator impersonator  everything
    admin          stratus-admin          administrator impersonator  everything
    gateway        stratus-gateway        impersonator                the cluster objects, its reply queues; not the log
    worker         stratus-worker         impersonator                the cluster objects, the log, the default exchange
    dashboard      (none: it never connects to the broker)

Why each needs what it has:
- orchestrator: creates, changes and deletes tenants' accounts and their task
  queues through the management API (administrator), and reads and writes
  for a tenant (/api/v1/db, the user directory, tenant deletion: impersonator).
- admin: the operator's tools, the CLI (`stratus up`, deploy) and the tests.
- gateway: logs rideshare's users in by reading that tenant's table
  (impersonator); its DB client declares the cluster's objects, publishes to
  the request exchange, reads its own reply queues and a server-named queue
  bound to the toy store's invalidations. It may not read the replication
  stream nor publish to the log's exchange or through the default exchange.
- worker: consumes the request queues and the log stream, publishes to the
  log's exchange, answers through the default exchange, and hands a read it
  cannot answer in time to the master with the requester's own user_id
  (impersonator: RabbitMQ refuses any other user_id without it).

Secrets: $STRATUS_SECRETS_DIR (default $STRATUS_STATE_DIR/secrets, mode 0700)
holds broker-<component>.url (mode 0600): the account's STRATUS_AMQP_URL,
every node's URL with the account's credentials. bus/settings.py reads it
when STRATUS_AMQP_URL is unset. A password is generated once and kept across
restarts; the account is written again at every `services.sh start` (so a
broker whose data was wiped gets it back).

The platform's accounts may act as the platform itself (tenant PLATFORM,
bus/tenancy.py) in a request's user_id: `PLATFORM_ACCOUNTS`.

Standard library only (services.sh runs it with the system python3)."""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import secrets
import sys
import urllib.parse
from pathlib import Path

PREFIX = "stratus-"
COMPONENTS = ("orchestrator", "gateway", "worker", "admin")
NO_ACCOUNT = frozenset({"dashboard"})     # never connects to the broker
DEFAULT_COMPONENT = "admin"               # the CLI, tools and tests


def account(component: str) -> str:
    return PREFIX + component


# The accounts whose own user_id means the platform itself (bus/tenancy.py).
PLATFORM_ACCOUNTS = frozenset(account(c) for c in COMPONENTS)

# Object names (bus/names.py: stratus.<cluster>.<name>; a cluster name may hold dots).
_C = r"^stratus\..+\."
QUEUES = _C + r"(readQ|writeQ|readQ\.master|deadQ|snapshotQ)$"
EXCHANGES = _C + r"(requests|dlx|syncQ|invalidate|invalidate\.[a-z][a-z0-9-]*)$"
REQUESTS = _C + r"requests$"
DEAD_LETTERS = _C + r"dlx$"
LOG = _C + r"syncQ\.log$"
REPLIES = _C + r"responseQ\..+$"
SERVER_NAMED = r"^amq\.gen-.*$"          # exclusive queues named by the broker
DEFAULT_EXCHANGE = r"^amq\.default$"     # publishing to a queue by its name
EVERYTHING = ".*"


def _any(*patterns: str) -> str:
    return "|".join(patterns)


# component -> (tags, configure, write, read)
ACCOUNTS: dict[str, tuple[str, str, str, str]] = {
    "orchestrator": ("administrator,impersonator", EVERYTHING, EVERYTHING, EVERYTHING),
    "admin": ("administrator,impersonator", EVERYTHING, EVERYTHING, EVERYTHING),
    # Declaring a request queue with its dead-letter exchange needs read on the
    # queue and write on the exchange (RabbitMQ checks both).
    "gateway": ("impersonator",
                _any(QUEUES, EXCHANGES, LOG, REPLIES, SERVER_NAMED),
                _any(QUEUES, LOG, REQUESTS, DEAD_LETTERS, REPLIES, SERVER_NAMED),
                _any(QUEUES, EXCHANGES, REPLIES, SERVER_NAMED)),
    "worker": ("impersonator",
               _any(QUEUES, EXCHANGES, LOG, SERVER_NAMED),
               _any(QUEUES, EXCHANGES, LOG, SERVER_NAMED, DEFAULT_EXCHANGE),
               _any(QUEUES, EXCHANGES, LOG, SERVER_NAMED)),
}


def url_file(secrets_dir: Path | str, component: str) -> Path:
    return Path(secrets_dir) / f"broker-{component}.url"


def rabbit_hash(password: str) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def with_credentials(nodes: str, user: str, password: str) -> str:
    """Every URL of the comma-separated `nodes` with user:password."""
    cred = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}"
    out = []
    for u in (x.strip() for x in nodes.split(",") if x.strip()):
        p = urllib.parse.urlparse(u)
        out.append(urllib.parse.urlunparse(p._replace(netloc=f"{cred}@{p.netloc.rpartition('@')[2]}")))
    return ",".join(out)


def _kept_password(path: Path, user: str) -> str | None:
    """The password in an existing account file, if it is that account's."""
    try:
        first = path.read_text().strip().split(",")[0]
    except OSError:
        return None
    p = urllib.parse.urlparse(first)
    if p.password and urllib.parse.unquote(p.username or "") == user:
        return urllib.parse.unquote(p.password)
    return None


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def bootstrap(secrets_dir: Path, nodes: str, vhost: str = "/") -> dict:
    """Write (or keep) every account's file in secrets_dir, with the URLs of
    `nodes` (comma-separated amqp:// URLs without credentials); return the
    broker definitions (users with password hashes, their permissions) for
    `rabbitmqctl import_definitions`."""
    secrets_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(secrets_dir, 0o700)
    users, perms = [], []
    for comp in COMPONENTS:
        user = account(comp)
        path = url_file(secrets_dir, comp)
        password = _kept_password(path, user) or secrets.token_urlsafe(24)
        url = with_credentials(nodes, user, password)
        if not path.exists() or path.read_text().strip() != url or (path.stat().st_mode & 0o777) != 0o600:
            _write_private(path, url + "\n")
        tags, configure, write, read = ACCOUNTS[comp]
        users.append({"name": user, "password_hash": rabbit_hash(password),
                      "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": tags, "limits": {}})
        perms.append({"user": user, "vhost": vhost, "configure": configure, "write": write, "read": read})
    return {"users": users, "vhosts": [{"name": vhost}], "permissions": perms}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bus.broker_accounts",
                                 description="Write the platform's broker account files and print their "
                                             "definitions (JSON, for rabbitmqctl import_definitions).")
    ap.add_argument("--secrets", required=True, help="the secrets directory")
    ap.add_argument("--nodes", required=True, help="every node's amqp:// URL, comma-separated, no credentials")
    ap.add_argument("--vhost", default="/")
    a = ap.parse_args(argv)
    json.dump(bootstrap(Path(a.secrets), a.nodes, a.vhost), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
