"""ZooKeeper access: one kazoo client factory with Stratus' short session
timeout, its identity and ACLs, and small JSON helpers over znodes.

Identity and ACLs (docs/architecture.md, ZooKeeper identity): every platform
client authenticates with a digest identity, `stratus:<secret>`, and creates
every znode with an ACL granting ALL to that identity alone (no world read).
The secret is STRATUS_ZK_AUTH ("user:password"; "none" turns auth off) when
set, else generated once into $STRATUS_STATE_DIR/secrets/zookeeper (0600, in
a 0700 directory). An app instance (STRATUS_INSTANCE set) never touches that
file: without a STRATUS_ZK_AUTH of its own it connects anonymously and can
read nothing the platform wrote.

The shared parent /stratus lets anyone create and delete a child (every
cluster may have an identity of its own) but lists nothing; a cluster's root
and everything under it is the cluster identity's alone. A tree created
before ACLs (world-readable) is re-ACL'd by the first platform client that
connects (secure_cluster, bounded in time)."""
from __future__ import annotations

import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kazoo.client import KazooClient
from contextlib import contextmanager

from kazoo.exceptions import KazooException, LockTimeout, NoAuthError, NodeExistsError, NoNodeError
from kazoo.retry import KazooRetry
from kazoo.security import ACL, Id, Permissions, make_digest_acl_credential

from .names import Paths
from .settings import Settings

log = logging.getLogger("stratus.zk")

AUTH_ENV = "STRATUS_ZK_AUTH"      # "user:password" of this client's digest identity; "none": no auth
PLATFORM_USER = "stratus"
TOP = "/stratus"                  # the parent of every cluster's root (Paths.root)
# Anyone may create (and delete, once empty) a cluster's root under /stratus;
# nobody but the identity that set this ACL can list or change it.
TOP_PERMS = Permissions.CREATE | Permissions.DELETE
SECURE_BUDGET = 10.0              # seconds secure_cluster may take at a start
SECURE_MAX_NODES = 100_000


@dataclass(frozen=True)
class Identity:
    user: str
    password: str

    @property
    def credential(self) -> str:
        return f"{self.user}:{self.password}"

    @property
    def digest_id(self) -> str:
        """The ACL id ("user:base64(sha1)"): names the identity, reveals no secret."""
        return make_digest_acl_credential(self.user, self.password)

    def acl(self, perms: int = Permissions.ALL) -> ACL:
        return ACL(perms, Id("digest", self.digest_id))


def parse_credential(raw: str) -> Identity:
    user, sep, password = raw.partition(":")
    if not sep or not user or not password:
        raise ValueError(f"{AUTH_ENV} must be user:password")
    return Identity(user, password)


def secret_path(settings: Settings) -> Path:
    """$STRATUS_STATE_DIR/secrets/zookeeper: from the settings' state dir alone
    (a test cluster's in-process client and its processes share that one)."""
    return settings.state_path / "secrets" / "zookeeper"


def _platform_secret(settings: Settings) -> str:
    """The generated secret, created once: written whole to a temporary file,
    then linked into place (link fails if another process was first; then
    its secret is read), so processes starting together agree."""
    path = secret_path(settings)
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    if not path.parent.is_dir():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            os.chmod(path.parent, 0o700)   # whatever the umask
        except OSError:
            pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    return _read_secret(path)


def _read_secret(path: Path) -> str:
    value = path.read_text().strip()
    if not value:
        raise ValueError(f"{path} is empty: remove it (a new secret is generated) or set {AUTH_ENV}")
    return value


def platform_identity(settings: Settings) -> Identity | None:
    """The platform's identity (None: auth off, STRATUS_ZK_AUTH=none)."""
    raw = os.environ.get(AUTH_ENV, "").strip()
    if raw:
        return None if raw.lower() in ("none", "off") else parse_credential(raw)
    return Identity(PLATFORM_USER, _platform_secret(settings))


def client_identity(settings: Settings) -> Identity | None:
    """This process's identity: an app instance's (STRATUS_INSTANCE set: the
    platform started it) only from STRATUS_ZK_AUTH."""
    if os.environ.get("STRATUS_INSTANCE"):
        raw = os.environ.get(AUTH_ENV, "").strip()
        return parse_credential(raw) if raw and raw.lower() not in ("none", "off") else None
    return platform_identity(settings)


def default_acl(ident: Identity | None) -> list[ACL] | None:
    """What every znode this client creates carries: ALL for ident alone."""
    return [ident.acl()] if ident is not None else None


def _world(acl) -> bool:
    return any(a.id.scheme == "world" for a in acl)


def connect(settings: Settings, *, timeout: float | None = None, start_timeout: float = 15.0,
            secure: bool = True) -> KazooClient:
    """A started kazoo client, authenticated as this process's identity, whose
    znodes get that identity's ACL. The session timeout decides how fast a
    dead process's ephemeral znodes vanish; the ensemble's own config must
    allow it (etc/zoo.cfg sets minSessionTimeout=400ms). A platform client
    also makes sure the cluster's tree carries its ACL (secure_cluster)."""
    ident = client_identity(settings)
    zk = KazooClient(
        hosts=settings.zk_hosts,
        timeout=timeout if timeout is not None else settings.zk_timeout,
        connection_retry=KazooRetry(max_tries=-1, delay=0.1, max_delay=1.0),
        command_retry=KazooRetry(max_tries=3, delay=0.05, max_delay=0.5),
        auth_data=[("digest", ident.credential)] if ident else None,
        default_acl=default_acl(ident),
    )
    zk.start(timeout=start_timeout)
    if ident is not None and secure and not settings.tenant:
        try:
            secure_cluster(zk, settings, ident)
        except KazooException as exc:   # never a reason not to start: logged
            log.warning("could not check the ACLs of the cluster's znodes: %r", exc)
    return zk


def secure_cluster(zk: KazooClient, settings: Settings, ident: Identity,
                   budget: float = SECURE_BUDGET) -> int:
    """Make /stratus list nothing, and give the cluster's root and every znode
    under it this identity's ACL where it still has a world entry (a tree
    made before ACLs). Cheap when done: one getACL on the root, which is
    re-ACL'd last. Bounded by `budget` seconds; past it the root keeps its old
    ACL and the next start goes on. Returns how many znodes it changed."""
    _secure_top(zk, ident)
    root = Paths(settings.cluster).root
    try:
        acl, _ = zk.get_acls(root)
    except NoNodeError:
        return 0
    except NoAuthError:
        log.error("the znodes of cluster %r belong to another ZooKeeper identity than %s: "
                  "this process can neither read nor write them (check %s or %s)",
                  settings.cluster, ident.user, AUTH_ENV, secret_path(settings))
        return 0
    if not _world(acl):
        return 0
    deadline = time.monotonic() + budget
    t0 = time.monotonic()
    nodes, level = [], [root]
    while level:   # breadth first, one pipelined round trip per level
        nodes += level
        if len(nodes) > SECURE_MAX_NODES or time.monotonic() > deadline:
            log.warning("cluster %r: over %d znodes or %gs; its ACLs are left for the next start",
                        settings.cluster, SECURE_MAX_NODES, budget)
            return 0
        asyncs = [(p, zk.get_children_async(p)) for p in level]
        level = []
        for p, a in asyncs:
            try:
                level += [f"{p}/{c}" for c in a.get(timeout=max(0.1, deadline - time.monotonic()))]
            except NoNodeError:
                pass
    target = [ident.acl()]
    changed = 0
    nodes.reverse()   # the deepest first, the root last
    for start in range(0, len(nodes), 500):
        chunk = nodes[start:start + 500]
        got = [(p, zk.get_acls_async(p)) for p in chunk]
        sets = []
        for p, a in got:
            try:
                node_acl, _ = a.get(timeout=max(0.1, deadline - time.monotonic()))
            except (NoNodeError, NoAuthError):
                continue
            if _world(node_acl):
                sets.append(zk.set_acls_async(p, target))
        for a in sets:
            try:
                a.get(timeout=max(0.1, deadline - time.monotonic()))
                changed += 1
            except NoNodeError:
                pass
        if time.monotonic() > deadline:
            log.warning("cluster %r: ACLs set on %d znodes in %gs, the rest on the next start",
                        settings.cluster, changed, budget)
            return changed
    log.info("cluster %r: gave %d existing znodes the platform identity's ACL in %.2fs",
             settings.cluster, changed, time.monotonic() - t0)
    return changed


def _secure_top(zk: KazooClient, ident: Identity) -> None:
    """/stratus: anyone may create and delete a child, only ident may list it."""
    acl = [ACL(TOP_PERMS, Id("world", "anyone")), ident.acl()]
    try:
        zk.create(TOP, acl=acl)
        return
    except NodeExistsError:
        pass
    try:
        current, _ = zk.get_acls(TOP)
    except (NoAuthError, NoNodeError):
        return   # already made private by another identity
    if any(a.id.scheme == "world" and a.perms & Permissions.READ for a in current):
        try:
            zk.set_acls(TOP, acl)
        except (NoAuthError, NoNodeError):
            pass


class LockBusy(Exception):
    """Another holder kept the lock past the wait."""


@contextmanager
def held_lock(zk: KazooClient, path: str, timeout: float):
    """Hold the kazoo Lock at `path`, waiting at most `timeout` seconds
    (LockBusy past it). A release that fails means our session is gone, and
    the lock node with it."""
    lock = zk.Lock(path)
    try:
        acquired = lock.acquire(timeout=timeout)
    except LockTimeout:
        acquired = False
    if not acquired:
        raise LockBusy(f"{path} is still held after {timeout:g}s")
    try:
        yield
    finally:
        try:
            lock.release()
        except KazooException:
            pass


def get_json(zk: KazooClient, path: str, default: Any = None) -> Any:
    try:
        data, _ = zk.get(path)
    except NoNodeError:
        return default
    try:
        return json.loads(data) if data else default
    except ValueError:
        return default


def put_json(zk: KazooClient, path: str, value: Any, *, ephemeral: bool = False) -> None:
    data = json.dumps(value, separators=(",", ":")).encode()
    try:
        zk.set(path, data)
    except NoNodeError:
        try:
            zk.create(path, data, ephemeral=ephemeral, makepath=True)
        except NodeExistsError:
            zk.set(path, data)


def children_json(zk: KazooClient, path: str) -> dict[str, Any]:
    """{child name: parsed data} for every child that still exists."""
    out = {}
    try:
        names = zk.get_children(path)
    except NoNodeError:
        return out
    for name in names:
        value = get_json(zk, f"{path}/{name}")
        if value is not None:
            out[name] = value
    return out
