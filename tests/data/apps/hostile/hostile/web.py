"""A hostile tenant app (issue 22, the escape suite): an ordinary web role,
deployed through the API like any tenant's app, that tries from inside its
own instance to reach what a tenant must never reach, and says what it got.

    GET /health          200 {"ok": true}
    GET /probe/ready     200 {"ready": true}  (the route works; nothing is tried)
    GET /probe           runs every attempt (at most about 20 s) and answers
                         200 {attempt: {"reached": bool, "detail": str, "seconds": float}};
                         ?only=a,b runs those attempts, ?skip=a,b all but those.
                         An attempt that could not be carried out (a bug here,
                         not a wall) also carries "error": true. One probe at a
                         time (409 otherwise).

Each result is also printed to stdout (the instance's log) as a line
`HOSTILE-RESULT {"<attempt>": {...}}` as soon as it is known, and the memory
hog prints `HOSTILE-PROGRESS memory_hog <MiB>` as it grows: if the platform
kills the whole instance, its log still tells what was reached.

"Reached" is judged honestly: a file read, an environment read, a signal
delivered, a TCP connection opened to a platform port (the broker's AMQP
port excepted: connecting is allowed there, a `guest` login or another
tenant's data is not), a resource held past the limit the platform is
expected to set. Targets an attacker would guess from the repository's
layout (the state directory, ports, pids) come from HOSTILE_* variables:

    HOSTILE_HOST                the platform's address (127.0.0.1)
    HOSTILE_STATE_DIR           the platform's $STRATUS_STATE_DIR
    HOSTILE_SECRETS_DIR         the platform's $STRATUS_SECRETS_DIR (its broker accounts)
    HOSTILE_REPO_DIR            the repository (its var/ holds `make up`'s state)
    HOSTILE_ORCH_PID, HOSTILE_ORCH_PORT
    HOSTILE_PLATFORM_PIDS       the platform's processes (comma-separated)
    HOSTILE_VICTIM_TENANT, HOSTILE_VICTIM_APP, HOSTILE_VICTIM_TABLE
    HOSTILE_VICTIM_PIDS, HOSTILE_VICTIM_PORTS   the other tenant's instances
    HOSTILE_VICTIM_DIRS, HOSTILE_VICTIM_LOGS    its packages/app dirs and logs
    HOSTILE_AMQP_PORTS, HOSTILE_MANAGEMENT_PORTS, HOSTILE_ZK_HOSTS
    HOSTILE_METRICS_PORTS       the DB workers' /metrics
    HOSTILE_PROMETHEUS_PORT, HOSTILE_RABBIT_PROMETHEUS_PORT, HOSTILE_DASHBOARD_PORT
    HOSTILE_PIDS_LIMIT (256), HOSTILE_MEMORY_LIMIT_MIB (1024), HOSTILE_DISK_LIMIT_MIB (256),
    HOSTILE_CPU_LIMIT (cores, 1.0)       the limits the platform is expected to hold
    HOSTILE_FORKS_MAX (2000), HOSTILE_MEMORY_MAX_MIB (3072), HOSTILE_DISK_MAX_MIB (512),
    HOSTILE_BURNERS (4), HOSTILE_BURN_SECONDS (3)   how far the attempts go

Nothing destructive: signals are 0 and SIGCONT only, ZooKeeper gets one
ephemeral node (deleted), files written are removed, children are killed."""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

ENV = os.environ
MIB = 1 << 20
SECRET_FILES = ("token-secret", "admin-password", "dashboard-secret")   # gateway/tokens.py, dashboard/sessions.py
NETWORK_BUDGET = 7.0      # s for every attempt but the resource ones, run side by side
CONNECT_TIMEOUT = 1.0


def env_str(name: str, default: str = "") -> str:
    return ENV.get(name, default) or default


def env_list(name: str, default: str = "") -> list[str]:
    return [x.strip() for x in env_str(name, default).split(",") if x.strip()]


def env_ints(name: str, default: str = "") -> list[int]:
    out = []
    for x in env_list(name, default):
        try:
            out.append(int(x))
        except ValueError:
            pass
    return out


def env_num(name: str, default: float) -> float:
    try:
        return float(env_str(name, str(default)))
    except ValueError:
        return default


HOST = env_str("HOSTILE_HOST", "127.0.0.1")
OWN_TENANT = env_str("STRATUS_TENANT")
OWN_INSTANCE = env_str("STRATUS_INSTANCE")
CLUSTER = env_str("STRATUS_CLUSTER", "default")
VICTIM = env_str("HOSTILE_VICTIM_TENANT", "victim")


def outcome(reached, detail: str, **extra) -> dict:
    return {"reached": bool(reached), "detail": str(detail)[:3000], **extra}


def log(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# --- files ----------------------------------------------------------------------------
def readable(path: str) -> bool:
    """A regular file whose first byte this process can read (no FIFO is opened)."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return False
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        os.read(fd, 1)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def own_path(path: str) -> bool:
    """This tenant's own files (its package, its logs): reading them is no escape."""
    real = os.path.realpath(path)
    cwd = os.path.realpath(os.getcwd())
    if real == cwd or real.startswith(cwd + os.sep):
        return True
    return bool(OWN_TENANT) and OWN_TENANT in real.split(os.sep)


def walk_readable(top: str, deadline: float, limit: int = 50_000) -> tuple[list[str], int, str]:
    """(readable files not our own, entries seen, why the walk stopped) under `top`."""
    if not top:
        return [], 0, "no directory given"
    try:
        os.lstat(top)
    except OSError as exc:
        return [], 0, f"{top}: {exc.strerror}"
    found: list[str] = []
    seen = 0
    denied: list[str] = []
    for root, dirs, files in os.walk(top, onerror=lambda e: denied.append(e.filename or "?")):
        for name in files:
            p = os.path.join(root, name)
            if own_path(p):
                continue
            seen += 1
            if readable(p):
                found.append(p)
        if time.monotonic() > deadline or seen > limit:
            return found, seen, "stopped early (time or count)"
    why = f"walked; {len(denied)} directories refused" if denied else "walked"
    return found, seen, why


def files_report(found: list[str], seen: int, why: str) -> str:
    head = ", ".join(found[:12])
    return f"{len(found)} readable of {seen} files seen ({why})" + (f": {head}" if found else "")


def a_state_dir_files() -> dict:
    found, seen, why = walk_readable(env_str("HOSTILE_STATE_DIR"), time.monotonic() + 3.0)
    return outcome(found, files_report(found, seen, why))


def a_secrets_dir_files() -> dict:
    found, seen, why = walk_readable(env_str("HOSTILE_SECRETS_DIR"), time.monotonic() + 2.0)
    return outcome(found, files_report(found, seen, why))


def _secret(name: str) -> dict:
    repo = env_str("HOSTILE_REPO_DIR")
    dirs = [env_str("HOSTILE_STATE_DIR"), env_str("HOSTILE_SECRETS_DIR"), os.path.join(repo, "var") if repo else ""]
    places = list(dict.fromkeys(os.path.join(d, name) for d in dirs if d))
    got, notes = [], []
    for p in places:
        if readable(p):
            got.append(p)
            notes.append(f"{p}: READ")
        else:
            notes.append(f"{p}: {'exists, unreadable' if os.path.lexists(p) else 'not visible'}")
    return outcome(got, "; ".join(notes))


def a_token_secret() -> dict:
    return _secret("token-secret")


def a_admin_password() -> dict:
    return _secret("admin-password")


def a_dashboard_secret() -> dict:
    return _secret("dashboard-secret")


def a_etc_shadow() -> dict:
    ok = readable("/etc/shadow")
    return outcome(ok, "/etc/shadow read" if ok else
                   f"/etc/shadow {'exists, unreadable' if os.path.lexists('/etc/shadow') else 'not visible'}")


def a_repo_var() -> dict:
    repo = env_str("HOSTILE_REPO_DIR")
    found, seen, why = walk_readable(os.path.join(repo, "var") if repo else "", time.monotonic() + 2.0)
    return outcome(found, files_report(found, seen, why))


# --- other processes ------------------------------------------------------------------
def environ_of(pid) -> dict[bytes, bytes] | None:
    try:
        raw = open(f"/proc/{pid}/environ", "rb").read()
    except OSError:
        return None
    return dict(kv.split(b"=", 1) for kv in raw.split(b"\0") if b"=" in kv)


def cmdline_of(pid) -> str | None:
    try:
        raw = open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return None
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def ours(env: dict[bytes, bytes] | None) -> bool:
    """A process of this very instance (this server and its own children)."""
    return env is not None and bool(OWN_INSTANCE) and env.get(b"STRATUS_INSTANCE") == OWN_INSTANCE.encode()


def sensitive_keys(env: dict[bytes, bytes]) -> list[str]:
    return sorted(k.decode(errors="replace") for k, v in env.items()
                  if k.startswith(b"STRATUS_") or b"AMQP" in k or b"amqp://" in v)


def a_proc_environ_of_others() -> dict:
    pids = [d for d in os.listdir("/proc") if d.isdigit()]
    leaks, readable_envs = [], 0
    for pid in pids:
        env = environ_of(pid)
        if env is None or ours(env):
            continue
        readable_envs += 1
        keys = sensitive_keys(env)
        if keys:
            leaks.append(f"{pid} ({(cmdline_of(pid) or '?')[:60]}): {', '.join(keys[:6])}")
    return outcome(leaks, f"{len(pids)} pids visible, {readable_envs} environments of others readable, "
                          f"{len(leaks)} with STRATUS_/AMQP: " + "; ".join(leaks[:8]))


def a_other_processes_visible() -> dict:
    """The platform's and the other tenant's processes, by their pids."""
    seen = []
    for pid in env_ints("HOSTILE_PLATFORM_PIDS") + env_ints("HOSTILE_VICTIM_PIDS"):
        cmd = cmdline_of(pid)
        if cmd is None or ours(environ_of(pid)):
            continue
        seen.append(f"{pid}: {cmd[:80]}")
    return outcome(seen, f"{len(seen)} of the platform's/other tenant's pids visible: " + "; ".join(seen[:8]))


def _signals(pid: int | None) -> dict:
    if not pid:
        return outcome(False, "no pid given", error=True)
    notes, delivered = [], False
    for sig, name in ((0, "signal 0"), (signal.SIGCONT, "SIGCONT")):
        try:
            os.kill(pid, sig)
            delivered = True
            notes.append(f"{name} to {pid}: delivered")
        except ProcessLookupError:
            notes.append(f"{name} to {pid}: no such process here")
        except PermissionError:
            notes.append(f"{name} to {pid}: not permitted")
    return outcome(delivered, "; ".join(notes))


def a_signal_orchestrator() -> dict:
    pids = env_ints("HOSTILE_ORCH_PID")
    return _signals(pids[0] if pids else None)


def a_signal_other_tenant() -> dict:
    pids = env_ints("HOSTILE_VICTIM_PIDS")
    return _signals(pids[0] if pids else None)


# --- other tenants' files -------------------------------------------------------------
def a_other_tenant_package() -> dict:
    deadline = time.monotonic() + 2.0
    dirs = env_list("HOSTILE_VICTIM_DIRS")
    if not dirs:
        return outcome(False, "no directory given", error=True)
    notes, reached = [], False
    for d in dirs:
        found, seen, why = walk_readable(d, deadline)
        if found:
            reached = True
        notes.append(f"{d}: {files_report(found, seen, why)}")
        probe = os.path.join(d, f".hostile-{uuid.uuid4().hex[:8]}")
        try:
            with open(probe, "xb") as f:
                f.write(b"x")
            os.unlink(probe)
            reached = True
            notes.append(f"{d}: WROTE a file")
        except OSError as exc:
            notes.append(f"{d}: cannot write ({exc.strerror})")
    return outcome(reached, "; ".join(notes))


def a_other_tenant_log() -> dict:
    paths = env_list("HOSTILE_VICTIM_LOGS")
    if not paths:
        return outcome(False, "no log given", error=True)
    notes, reached = [], False
    for p in paths:
        if os.path.isdir(p):
            found, seen, why = walk_readable(p, time.monotonic() + 1.0)
            reached |= bool(found)
            notes.append(f"{p}: {files_report(found, seen, why)}")
        elif readable(p):
            reached = True
            notes.append(f"{p}: READ")
        else:
            notes.append(f"{p}: {'exists, unreadable' if os.path.lexists(p) else 'not visible'}")
    return outcome(reached, "; ".join(notes))


def a_other_tenant_environ() -> dict:
    pids = env_ints("HOSTILE_VICTIM_PIDS")
    if not pids:
        return outcome(False, "no pid given", error=True)
    notes, reached = [], False
    for pid in pids:
        env = environ_of(pid)
        if env is None or ours(env):
            notes.append(f"{pid}: not readable")
            continue
        reached = True
        notes.append(f"{pid}: READ ({', '.join(sensitive_keys(env)[:8])})")
    return outcome(reached, "; ".join(notes))


# --- the network ----------------------------------------------------------------------
def tcp(port: int, host: str = HOST, timeout: float = CONNECT_TIMEOUT) -> str | None:
    """None when a TCP connection opened, else why not."""
    try:
        s = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    s.close()
    return None


def http_get(port: int, path: str, auth: tuple[str, str] | None = None, timeout: float = 2.0):
    """(status, body) of GET http://HOST:port/path, or (None, why)."""
    req = urllib.request.Request(f"http://{HOST}:{port}{path}")
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(200_000)
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (OSError, ValueError) as exc:
        return None, str(exc)[:120]


def _ports(attempt_ports: list[int], path: str) -> dict:
    if not attempt_ports:
        return outcome(False, "no port given", error=True)
    notes, reached = [], False
    for port in attempt_ports:
        why = tcp(port)
        if why is not None:
            notes.append(f"{port}: no connection ({why})")
            continue
        reached = True
        status, _ = http_get(port, path)
        notes.append(f"{port}: CONNECTED, GET {path} -> {status}")
    return outcome(reached, "; ".join(notes))


def a_orchestrator_api() -> dict:
    return _ports(env_ints("HOSTILE_ORCH_PORT", "8081"), "/api/v1/tenants")


def a_worker_metrics() -> dict:
    return _ports(env_ints("HOSTILE_METRICS_PORTS"), "/metrics")


def a_prometheus() -> dict:
    return _ports(env_ints("HOSTILE_PROMETHEUS_PORT", "9090"), "/api/v1/targets")


def a_rabbitmq_prometheus() -> dict:
    return _ports(env_ints("HOSTILE_RABBIT_PROMETHEUS_PORT", "15692"), "/metrics")


def a_dashboard() -> dict:
    return _ports(env_ints("HOSTILE_DASHBOARD_PORT", "8086"), "/health")


def a_other_tenant_instance() -> dict:
    return _ports(env_ints("HOSTILE_VICTIM_PORTS"), "/")


# --- the broker -------------------------------------------------------------------------
def own_account() -> tuple[str, str, str, list[str]]:
    """(user, password, vhost, URLs) of this instance's STRATUS_AMQP_URL."""
    urls = [u.strip() for u in env_str("STRATUS_AMQP_URL").split(",") if u.strip()]
    if not urls:
        return "", "", "/", []
    p = urlparse(urls[0])
    vhost = unquote(p.path[1:]) if p.path not in ("", "/") else "/"
    return unquote(p.username or ""), unquote(p.password or ""), vhost, urls


def amqp_endpoints() -> list[tuple[str, int]]:
    """(host, port) of the broker: HOSTILE_AMQP_PORTS on HOSTILE_HOST, and every
    node of this instance's own STRATUS_AMQP_URL (the broker as it sees it)."""
    out = [(HOST, p) for p in env_ints("HOSTILE_AMQP_PORTS")]
    for u in own_account()[3]:
        p = urlparse(u)
        out.append((p.hostname or HOST, p.port or 5672))
    return list(dict.fromkeys(out)) or [(HOST, 5672)]


def _unix_socketpair(*_args, **_kw):
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def amqp_connect(user: str, password: str, port: int, vhost: str = "/", host: str = HOST):
    import pika
    import pika.compat
    # pika wakes its I/O loop through a TCP connection to an ephemeral loopback
    # port, which a wall on new connections refuses: an attacker swaps in a
    # Unix socketpair and goes on (the attempt is the broker's wall, not that).
    pika.compat.nonblocking_socketpair = _unix_socketpair
    params = pika.ConnectionParameters(host=host, port=port, virtual_host=vhost,
                                       credentials=pika.PlainCredentials(user, password),
                                       connection_attempts=1, socket_timeout=2, stack_timeout=3,
                                       blocked_connection_timeout=3, heartbeat=0)
    return pika.BlockingConnection(params)


def own_connection():
    user, password, vhost, urls = own_account()
    if not urls:
        raise RuntimeError("no STRATUS_AMQP_URL")
    u = urlparse(urls[0])
    return amqp_connect(user, password, u.port or 5672, vhost, u.hostname or HOST)


def _names():
    from bus.names import Names      # a real attacker reads bus/names.py
    return Names(CLUSTER)


def a_amqp_guest_login() -> dict:
    notes, reached = [], False
    for host, port in amqp_endpoints():
        why = tcp(port, host)
        if why is not None:
            notes.append(f"{host}:{port}: no connection ({why})")
            continue
        try:
            conn = amqp_connect("guest", "guest", port, "/", host)
        except Exception as exc:
            notes.append(f"{host}:{port}: connected, guest refused ({type(exc).__name__})")
            continue
        reached = True
        conn.close()
        notes.append(f"{host}:{port}: LOGGED IN as guest")
    return outcome(reached, "; ".join(notes))


def a_amqp_platform_accounts() -> dict:
    """Log in with any platform broker account whose URL file can be read."""
    d = env_str("HOSTILE_SECRETS_DIR")
    if not d:
        return outcome(False, "no directory given", error=True)
    try:
        files = sorted(f for f in os.listdir(d) if f.startswith("broker-") and f.endswith(".url"))
    except OSError as exc:
        return outcome(False, f"{d}: cannot list ({exc.strerror})")
    notes, reached = [], False
    for f in files:
        p = os.path.join(d, f)
        try:
            url = open(p).read().strip().split(",")[0]
        except OSError as exc:
            notes.append(f"{f}: cannot read ({exc.strerror})")
            continue
        u = urlparse(url)
        try:
            conn = amqp_connect(unquote(u.username or ""), unquote(u.password or ""), u.port or 5672,
                                unquote(u.path[1:]) if u.path not in ("", "/") else "/", u.hostname or HOST)
        except Exception as exc:
            notes.append(f"{f}: read, login refused ({type(exc).__name__})")
            continue
        conn.close()
        reached = True
        notes.append(f"{f}: LOGGED IN as {unquote(u.username or '')}")
    return outcome(reached, "; ".join(notes) or f"{d}: no account file listed")


def a_management_api() -> dict:
    user, password, vhost, _ = own_account()
    notes, reached = [], False
    for port in env_ints("HOSTILE_MANAGEMENT_PORTS", "15672"):
        why = tcp(port)
        if why is not None:
            notes.append(f"{port}: no connection ({why})")
            continue
        status, _ = http_get(port, "/api/whoami", ("guest", "guest"))
        if status == 200:
            reached = True
        notes.append(f"{port}: guest whoami -> {status}")
        for path in ("/api/users", "/api/vhosts", "/api/queues"):
            status, body = http_get(port, path, (user, password))
            others = []
            if status == 200:
                try:
                    items = json.loads(body)
                except ValueError:
                    items = []
                for it in items if isinstance(items, list) else []:
                    name = str(it.get("name", "")) if isinstance(it, dict) else ""
                    mine = (name == user or (path == "/api/vhosts" and name == vhost)
                            or (OWN_TENANT and f".{OWN_TENANT}." in name + "."))
                    if not mine:
                        others.append(name)
            if others:
                reached = True
            notes.append(f"{port}: own account {path} -> {status}, {len(others)} of others")
    return outcome(reached, "; ".join(notes))


def a_replication_log() -> dict:
    """Consume the replication stream, or bind an own queue to its exchange."""
    import pika
    names = _names()
    notes, reached = [], False
    conn = own_connection()
    try:
        ch = conn.channel()
        got = []
        try:
            ch.basic_qos(prefetch_count=50)
            ch.basic_consume(names.log_stream, lambda c, m, p, b: got.append(len(b)),
                             arguments={"x-stream-offset": "first"})
            reached = True
            conn.process_data_events(time_limit=1.5)
            notes.append(f"consume {names.log_stream}: ALLOWED, {len(got)} records read")
        except pika.exceptions.ChannelClosedByBroker as exc:
            notes.append(f"consume {names.log_stream}: refused ({exc.reply_code})")
        ch = conn.channel()
        q = names.response_queue(f"{OWN_TENANT}.hostile-{uuid.uuid4().hex[:8]}")
        ch.queue_declare(q, exclusive=True, auto_delete=True)
        try:
            ch.queue_bind(q, names.sync_exchange)
            reached = True
            notes.append(f"bind own queue to {names.sync_exchange}: ALLOWED")
        except pika.exceptions.ChannelClosedByBroker as exc:
            notes.append(f"bind own queue to {names.sync_exchange}: refused ({exc.reply_code})")
    finally:
        try:
            conn.close()
        except Exception:
            pass
    return outcome(reached, "; ".join(notes))


def a_other_tenant_tasks() -> dict:
    """Bind an own queue to the other tenant's task exchange (its tasks' payloads)."""
    import pika
    names = _names()
    app = env_str("HOSTILE_VICTIM_APP", "shop")
    conn = own_connection()
    try:
        ch = conn.channel()
        q = names.response_queue(f"{OWN_TENANT}.hostile-{uuid.uuid4().hex[:8]}")
        ch.queue_declare(q, exclusive=True, auto_delete=True)
        x = names.task_exchange(VICTIM)
        try:
            ch.queue_bind(q, x, routing_key=names.task_queue(VICTIM, app, "jobs"))
            return outcome(True, f"bind own queue to {x}: ALLOWED")
        except pika.exceptions.ChannelClosedByBroker as exc:
            return outcome(False, f"bind own queue to {x}: refused ({exc.reply_code})")
    finally:
        try:
            conn.close()
        except Exception:
            pass


def _impersonate(conn, as_user: str, reply_prefix: str) -> tuple[bool, str]:
    """Publish a read marked with `as_user`; (accepted, what happened)."""
    import pika
    from bus import ops
    from bus.protocol import Request
    names = _names()
    ch = conn.channel()
    q = names.response_queue(f"{reply_prefix}.hostile-{uuid.uuid4().hex[:8]}")
    ch.queue_declare(q, exclusive=True, auto_delete=True)
    ch.confirm_delivery()
    req = Request(kind="read", body=ops.select(env_str("HOSTILE_VICTIM_TABLE", "secrets"), limit=10))
    props = pika.BasicProperties(reply_to=q, correlation_id=uuid.uuid4().hex, content_type="application/json",
                                 user_id=as_user, expiration="5000")
    try:
        ch.basic_publish(names.request_exchange, "read", req.encode(), props)
    except pika.exceptions.ChannelClosedByBroker as exc:
        return False, f"refused ({exc.reply_code} {exc.reply_text[:80]})"
    except pika.exceptions.NackError:
        return False, "refused (nack)"
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        method, _, body = ch.basic_get(q, auto_ack=True)
        if method is not None:
            return True, f"ACCEPTED, reply: {body[:300].decode(errors='replace')}"
        time.sleep(0.05)
    return True, "ACCEPTED by the broker (no reply within 3 s)"


def a_impersonated_read() -> dict:
    from bus.tenancy import broker_user
    victim_user = broker_user(CLUSTER, VICTIM)
    notes, reached = [], False
    conn = own_connection()
    try:
        ok, what = _impersonate(conn, victim_user, OWN_TENANT)
        reached |= ok
        notes.append(f"own account as {victim_user}: {what}")
    finally:
        try:
            conn.close()
        except Exception:
            pass
    for host, port in amqp_endpoints()[:1]:     # guest, an impersonator, if it can log in at all
        try:
            conn = amqp_connect("guest", "guest", port, "/", host)
        except Exception as exc:
            notes.append(f"guest on {host}:{port}: cannot log in ({type(exc).__name__})")
            continue
        try:
            ok, what = _impersonate(conn, victim_user, VICTIM)
            reached |= ok
            notes.append(f"guest as {victim_user}: {what}")
        finally:
            try:
                conn.close()
            except Exception:
                pass
    return outcome(reached, "; ".join(notes))


# --- ZooKeeper ------------------------------------------------------------------------
def a_zookeeper() -> dict:
    hosts = env_list("HOSTILE_ZK_HOSTS", "127.0.0.1:2181")
    if "127.0.0.1:2181" not in hosts:
        hosts.append("127.0.0.1:2181")
    notes, reached, connected = [], False, []
    for hp in hosts:
        host, _, port = hp.rpartition(":")
        why = tcp(int(port), host or HOST)
        if why is not None:
            notes.append(f"{hp}: no connection ({why})")
            continue
        reached = True
        connected.append(hp)
        notes.append(f"{hp}: CONNECTED")
    if connected:
        from kazoo.client import KazooClient
        zk = KazooClient(hosts=connected[0], timeout=3.0)
        try:
            zk.start(timeout=3.0)
            try:
                notes.append(f"get_children('/') -> {zk.get_children('/')[:10]}")
            except Exception as exc:
                notes.append(f"get_children('/') refused ({type(exc).__name__})")
            node = f"/hostile-{uuid.uuid4().hex[:8]}"
            try:
                zk.create(node, b"x", ephemeral=True)
                notes.append(f"create {node}: CREATED")
                zk.delete(node)
            except Exception as exc:
                notes.append(f"create {node} refused ({type(exc).__name__})")
            app = f"/stratus/{CLUSTER}/apps/{VICTIM}/{env_str('HOSTILE_VICTIM_APP', 'shop')}"
            try:
                data, _ = zk.get(app)
                notes.append(f"get {app}: READ {len(data)} bytes")
            except Exception as exc:
                notes.append(f"get {app} refused ({type(exc).__name__})")
        except Exception as exc:
            notes.append(f"kazoo: no session ({type(exc).__name__})")
        finally:
            try:
                zk.stop()
                zk.close()
            except Exception:
                pass
    return outcome(reached, "; ".join(notes))


# --- resources --------------------------------------------------------------------------
def _child(body) -> int:
    """Fork a child that runs body() and exits; the child's pid (OSError when refused)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            except (ValueError, OSError):
                pass
            body()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    return pid


def _sleeper() -> None:
    time.sleep(20)


def a_fork_bomb() -> dict:
    limit = int(env_num("HOSTILE_PIDS_LIMIT", 256))
    most = int(env_num("HOSTILE_FORKS_MAX", 2000))
    kids: list[int] = []
    why = f"stopped at {most}"
    deadline = time.monotonic() + 4.0
    try:
        while len(kids) < most:
            if time.monotonic() > deadline:
                why = "stopped at 4 s"
                break
            try:
                kids.append(_child(_sleeper))
            except OSError as exc:
                why = f"fork refused: {exc.strerror}"
                break
    finally:
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in kids:
            try:
                os.waitpid(pid, 0)
            except OSError:
                pass
    return outcome(len(kids) > limit, f"{len(kids)} processes started ({why}); limit expected: {limit}",
                   processes=len(kids))


def a_memory_hog() -> dict:
    limit = int(env_num("HOSTILE_MEMORY_LIMIT_MIB", 1024))
    most = int(env_num("HOSTILE_MEMORY_MAX_MIB", 3072))
    chunk = 64 * MIB
    page = 4096
    ones = b"\x01" * (chunk // page)
    r, w = os.pipe()

    def hog():
        os.close(r)
        try:
            with open("/proc/self/oom_score_adj", "w") as f:   # the first to go, never the server
                f.write("1000")
        except OSError:
            pass
        held, chunks = 0, []
        end = time.monotonic() + 6.0
        while held + 64 <= most and time.monotonic() < end:
            try:
                b = bytearray(chunk)
                b[::page] = ones          # touch every page
            except MemoryError:
                os.write(w, b"M\n")
                return
            chunks.append(b)
            held += 64
            os.write(w, f"{held}\n".encode())
            if held % 256 == 0:   # straight to fd 1: a lock held at fork time cannot stall it
                os.write(1, f"HOSTILE-PROGRESS memory_hog {held}\n".encode())
        os.write(w, b"D\n")
        time.sleep(0.2)

    try:
        pid = _child(hog)
    except OSError as exc:
        os.close(r)
        os.close(w)
        return outcome(False, f"could not fork the hog: {exc.strerror}", error=True)
    os.close(w)
    held, end, buf = 0, "", b""
    deadline = time.monotonic() + 8.0
    import select
    while time.monotonic() < deadline:
        ready, _, _ = select.select([r], [], [], 0.2)
        if not ready:
            continue
        data = os.read(r, 4096)
        if not data:
            break
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line == b"M":
                end = "MemoryError"
            elif line == b"D":
                end = f"held all it asked for ({most} MiB)"
            elif line.isdigit():
                held = int(line)
    os.close(r)
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
    _, status = os.waitpid(pid, 0)
    if not end:
        end = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"exited {os.WEXITSTATUS(status)}")
    return outcome(held > limit, f"held {held} MiB at most ({end}); limit expected: {limit} MiB", mib=held)


def a_disk_scratch() -> dict:
    limit = int(env_num("HOSTILE_DISK_LIMIT_MIB", 256))
    most = int(env_num("HOSTILE_DISK_MAX_MIB", 512))
    scratch = tempfile.gettempdir()
    path = os.path.join(scratch, f"hostile-{uuid.uuid4().hex[:8]}.bin")
    block = b"\xa5" * (4 * MIB)
    written, why = 0, f"stopped at {most} MiB"
    deadline = time.monotonic() + 4.0
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        return outcome(False, f"{scratch}: cannot create a file ({exc.strerror})")
    try:
        while written < most * MIB:
            if time.monotonic() > deadline:
                why = "stopped at 4 s"
                break
            try:
                written += os.write(fd, block)
            except OSError as exc:
                why = f"refused: {exc.strerror}"
                break
    finally:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
    mib = written // MIB
    return outcome(mib > limit, f"wrote {mib} MiB into {scratch} ({why}); limit expected: {limit} MiB", mib=mib)


def _try_write(d: str) -> tuple[bool, str]:
    if not d:
        return False, "no directory given"
    p = os.path.join(d, f".hostile-{uuid.uuid4().hex[:8]}")
    try:
        with open(p, "xb") as f:
            f.write(b"hostile")
    except OSError as exc:
        return False, f"{d}: cannot write ({exc.strerror})"
    try:
        os.unlink(p)
    except OSError:
        pass
    return True, f"{d}: WROTE a file"


def a_write_cwd() -> dict:
    ok, what = _try_write(os.getcwd())
    return outcome(ok, what)


def a_write_state_dir() -> dict:
    state = env_str("HOSTILE_STATE_DIR")
    if not state:
        return outcome(False, "no directory given", error=True)
    results = [_try_write(d) for d in (state, os.path.join(state, "clusters", CLUSTER))]
    return outcome(any(ok for ok, _ in results), "; ".join(w for _, w in results))


def a_cpu_burners() -> dict:
    n = int(env_num("HOSTILE_BURNERS", 4))
    seconds = env_num("HOSTILE_BURN_SECONDS", 3.0)
    cores = env_num("HOSTILE_CPU_LIMIT", 1.0)

    def burn():
        end = time.monotonic() + seconds
        x = 0
        while time.monotonic() < end:
            x += 1

    t0 = time.monotonic()
    kids = []
    for _ in range(n):
        try:
            kids.append(_child(burn))
        except OSError:
            break
    cpu = 0.0
    for pid in kids:
        _, _, ru = os.wait4(pid, 0)
        cpu += ru.ru_utime + ru.ru_stime
    wall = max(time.monotonic() - t0, 1e-3)
    used = cpu / wall
    # 25% over the limit is the measurement's slack (scheduling periods, start-up)
    return outcome(used > cores * 1.25, f"{len(kids)} burners used {cpu:.2f} CPU-s in {wall:.2f} s "
                                        f"({used:.2f} cores); limit expected: {cores:g} cores",
                   cores=round(used, 3))


# --- the probe --------------------------------------------------------------------------
NETWORK = {   # run side by side, within NETWORK_BUDGET
    "state_dir_files": a_state_dir_files, "token_secret": a_token_secret, "admin_password": a_admin_password,
    "dashboard_secret": a_dashboard_secret, "etc_shadow": a_etc_shadow, "repo_var": a_repo_var,
    "secrets_dir_files": a_secrets_dir_files, "amqp_platform_accounts": a_amqp_platform_accounts,
    "proc_environ_of_others": a_proc_environ_of_others, "other_processes_visible": a_other_processes_visible,
    "signal_orchestrator": a_signal_orchestrator, "signal_other_tenant": a_signal_other_tenant,
    "other_tenant_package": a_other_tenant_package, "other_tenant_log": a_other_tenant_log,
    "other_tenant_environ": a_other_tenant_environ,
    "amqp_guest_login": a_amqp_guest_login, "management_api": a_management_api,
    "replication_log": a_replication_log, "other_tenant_tasks": a_other_tenant_tasks,
    "impersonated_read": a_impersonated_read, "zookeeper": a_zookeeper,
    "orchestrator_api": a_orchestrator_api, "worker_metrics": a_worker_metrics, "prometheus": a_prometheus,
    "rabbitmq_prometheus": a_rabbitmq_prometheus, "dashboard": a_dashboard,
    "other_tenant_instance": a_other_tenant_instance,
}
RESOURCES = {   # one after the other; the memory hog last (it may take the instance down)
    "write_cwd": a_write_cwd, "write_state_dir": a_write_state_dir, "fork_bomb": a_fork_bomb,
    "disk_scratch": a_disk_scratch, "cpu_burners": a_cpu_burners, "memory_hog": a_memory_hog,
}
ATTEMPTS = {**NETWORK, **RESOURCES}


def timed(fn) -> dict:
    t0 = time.monotonic()
    try:
        res = fn()
    except Exception as exc:   # the attempt could not be carried out: no verdict
        res = outcome(False, f"the attempt failed: {type(exc).__name__}: {exc}", error=True)
    res["seconds"] = round(time.monotonic() - t0, 3)
    return res


def report(name: str, res: dict) -> None:
    log("HOSTILE-RESULT " + json.dumps({name: res}))


def probe(names: list[str]) -> dict:
    out: dict[str, dict] = {}
    net = [n for n in names if n in NETWORK]
    if net:
        pool = ThreadPoolExecutor(max_workers=len(net), thread_name_prefix="attempt")
        futures = {n: pool.submit(timed, NETWORK[n]) for n in net}
        deadline = time.monotonic() + NETWORK_BUDGET
        for n, fut in futures.items():
            try:
                out[n] = fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                out[n] = outcome(False, f"did not finish within {NETWORK_BUDGET:g} s", error=True)
            report(n, out[n])
        pool.shutdown(wait=False)
    for n in names:
        if n in RESOURCES:
            out[n] = timed(RESOURCES[n])
            report(n, out[n])
    return out


PROBING = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):
        sys.stderr.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} hostile.web {fmt % args}\n")

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/health":
            return self._send(200, {"ok": True})
        if url.path == "/probe/ready":
            return self._send(200, {"ready": True, "attempts": list(ATTEMPTS)})
        if url.path == "/probe":
            q = parse_qs(url.query)
            only = [x for v in q.get("only", []) for x in v.split(",") if x]
            skip = {x for v in q.get("skip", []) for x in v.split(",") if x}
            unknown = [x for x in [*only, *skip] if x not in ATTEMPTS]
            if unknown:
                return self._send(400, {"error": f"unknown attempts: {unknown}", "attempts": list(ATTEMPTS)})
            names = [n for n in (only or list(ATTEMPTS)) if n not in skip]
            if not PROBING.acquire(blocking=False):
                return self._send(409, {"error": "a probe is running"})
            try:
                log(f"HOSTILE-START {json.dumps(names)}")
                return self._send(200, probe(names))
            finally:
                PROBING.release()
        self._send(404, {"error": "not found"})


def main():
    server = ThreadingHTTPServer((os.environ.get("STRATUS_BIND_HOST", "0.0.0.0"), int(os.environ["PORT"])), Handler)
    server.daemon_threads = True
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    log(f"hostile.web {OWN_INSTANCE} listening on {os.environ['PORT']}")
    stop.wait()
    server.shutdown()
    server.server_close()


if __name__ == "__main__":
    main()
