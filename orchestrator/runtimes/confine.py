"""The walls around a tenant's instance on the process runtime (issue #22,
docs/security.md). Tenant code is hostile: it must reach nothing of the
platform and nothing of another tenant.

Each instance runs as

    sh -c '<join its cgroups>' -- prlimit --fsize=LOG -- \\
      bwrap <a filesystem of its own> -- env --default-signal=TERM -- \\
      setpriv --reuid=U --regid=G --clear-groups --no-new-privs --bounding-set=-all -- COMMAND

- **An account per tenant.** U is the tenant's own unprivileged uid (a system
  account `st<hash>` in TENANT_UIDS, made with useradd on the tenant's first
  start and removed with the tenant): it cannot read the platform's files (the
  state directory is 0700 root), signal or ptrace another account's
  processes, or read their /proc environ.
- **A filesystem of its own** (bubblewrap, as root, then setpriv drops to U
  with no capabilities and no_new_privs): read-only /usr and the Python
  install and venv; the platform's `bus` package at /opt/stratus/bus; the
  app's unpacked package read-only at /app (its working directory); a tmpfs
  of DISK bytes at /tmp (HOME and scratch); for a worker role, its heartbeat
  directory at /run/stratus. Nothing of the repository, the state directory,
  /root, /home or another tenant exists inside. Its own pid, IPC and UTS
  namespaces: /proc shows its own processes only. When the instance's first
  process is gone, whatever it left behind is killed through its cgroup,
  which nothing of it can leave (not even by a session of its own).
- **The network wall** (netwall.py): a tenant uid reaches the broker's AMQP
  port(s), and on this host only sockets of its own account. ZooKeeper, the
  orchestrator's API, the management API, Prometheus, the workers' metrics,
  the gateway, other tenants' instances: never connected, on any address.
- **Limits** (cgroups v1, this machine's hierarchy; `Limits`): memory (the
  kernel's OOM killer kills inside the instance, which then exits and is
  restarted with an event, never the platform), CPU (a CFS quota), number of
  processes (pids.max: a fork bomb stops there), disk written (the tmpfs's
  size, counted in its memory too), log volume (RLIMIT_FSIZE on its log file:
  a write past it fails with EFBIG; the log is rotated once at the next
  start).

SIGTERM reaches the instance: the wrappers before setpriv ignore it (their
disposition is inherited: `trap '' TERM`), and `env --default-signal=TERM`
gives the command the default back, so the runtime's signal to the process
group stops the instance gracefully while bwrap waits for it. The sandbox
does not die with the orchestrator (a successor adopts it); when its first
process exits, the runtime kills what is left in its cgroup.

Everything here needs root; a platform not started as root refuses to start
tenant instances on the process runtime (`ConfinementUnavailable`), with the
reason. The pure parts (Limits, account names, the argv) are unit-tested in
tests/unit/test_confine.py."""
from __future__ import annotations

import hashlib
import logging
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from .limits import Limits

log = logging.getLogger("stratus.orchestrator.confine")

TENANT_UIDS = (200000, 299999)   # the accounts of tenants: the network wall's range
INSIDE_APP = "/app"              # the package, read-only, the working directory
INSIDE_BUS = "/opt/stratus"      # PYTHONPATH: /opt/stratus/bus
INSIDE_RUN = "/run/stratus"      # a worker role's heartbeat directory
CGROUP_ROOT = Path("/sys/fs/cgroup")
TOOLS = ("bwrap", "setpriv", "prlimit", "useradd", "userdel", "nft", "env", "sh")
# /etc files a program may need; nothing of /etc's accounts (passwd, shadow, group)
ETC = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "hosts", "resolv.conf", "nsswitch.conf",
       "ssl", "ca-certificates", "alternatives", "mime.types", "protocols", "services")
MIB = 1024 ** 2


class ConfinementUnavailable(RuntimeError):
    """Tenant code cannot be confined here (not root, a tool missing, no cgroups)."""


def account_name(scope: str, tenant: str) -> str:
    """The system account of `tenant` in the platform `scope` (its state
    directory and cluster): 'st' and 14 hex digits, within useradd's 32."""
    return "st" + hashlib.sha256(f"{scope}\0{tenant}".encode()).hexdigest()[:14]


def cgroup_dirs(scope_key: str, unit_id: str, account: str = "") -> dict[str, Path]:
    """The instance's cgroup in each controller it is limited by. In `cpu`
    it sits in its tenant's group (`account`), so that under contention the
    CPU is shared tenant by tenant, not instance by instance."""
    base = {c: CGROUP_ROOT / c / "stratus" / scope_key for c in ("memory", "cpu", "pids")}
    return {c: (p / account / unit_id if c == "cpu" and account else p / unit_id) for c, p in base.items()}


def cgroup_settings(limits: Limits) -> dict[str, dict[str, str]]:
    """What is written in each controller's files (cgroups v1)."""
    period = 100_000
    return {"memory": {"memory.limit_in_bytes": str(limits.memory_mb * MIB)},
            "cpu": {"cpu.cfs_period_us": str(period), "cpu.cfs_quota_us": str(max(1000, int(limits.cpus * period)))},
            "pids": {"pids.max": str(limits.pids)}}


def python_roots() -> list[str]:
    """The directories the platform's interpreter runs from (the venv and the
    Python it was made from), outside /usr."""
    roots = []
    for p in {os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix),
              os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))}:
        if p and p != "/usr" and not p.startswith("/usr/"):
            roots.append(p)
    return sorted(roots)


def jail_argv(argv: list[str], *, uid: int, gid: int, limits: Limits, package: str | None, bus_dir: str,
              python_dirs: list[str], heartbeat_dir: str | None, cgroup_procs: list[str]) -> list[str]:
    """The whole command line that runs `argv` inside the walls (pure)."""
    join = "".join(f'echo $$ > "{p}" || exit 125; ' for p in cgroup_procs)
    sh = ["sh", "-c", f"trap '' TERM; {join}exec \"$@\"", "stratus-jail"]
    prlimit = ["prlimit", f"--fsize={limits.log_mb * MIB}", "--core=0", "--"]
    bw = ["bwrap", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
          "--hostname", "stratus-instance",
          "--ro-bind", "/usr", "/usr"]
    for link in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        p = Path("/") / link
        if p.is_symlink():
            bw += ["--symlink", os.readlink(p), f"/{link}"]
        elif p.is_dir():
            bw += ["--ro-bind", str(p), f"/{link}"]
    for name in ETC:
        bw += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    # The scratch /tmp first: what is bound below it (a venv under /tmp) stays visible.
    bw += ["--perms", "1777", "--size", str(limits.disk_mb * MIB), "--tmpfs", "/tmp"]
    made: set[str] = set()

    def parents(path: str) -> list[str]:
        """Make the directories above a mount point readable (bwrap makes them 0700)."""
        out = []
        for parent in reversed(Path(path).parents):
            d = str(parent)
            if d != "/" and d not in made and not d.startswith("/usr"):
                made.add(d)
                out += ["--perms", "0755", "--dir", d]
        return out

    for d in python_dirs:
        bw += parents(d) + ["--ro-bind", d, d]
    bw += parents(f"{INSIDE_BUS}/bus") + ["--ro-bind", bus_dir, f"{INSIDE_BUS}/bus",
           "--proc", "/proc", "--dev", "/dev"]
    if package:
        bw += ["--ro-bind", package, INSIDE_APP, "--chdir", INSIDE_APP]
    else:
        bw += ["--chdir", "/tmp"]
    if heartbeat_dir:
        bw += parents(INSIDE_RUN) + ["--bind", heartbeat_dir, INSIDE_RUN]
    bw += ["--"]
    drop = ["env", "--default-signal=TERM", "--",
            "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--no-new-privs",
            "--bounding-set=-all", "--inh-caps=-all", "--"]
    return sh + prlimit + bw + drop + list(argv)


def inside_path(python: str) -> list[str]:
    """The instance's PATH: the platform's interpreter's directory, then /usr's."""
    return [os.path.dirname(python), "/usr/local/bin", "/usr/bin", "/bin"]


def inside_env(env: dict[str, str], *, python: str, heartbeat_file: str | None) -> dict[str, str]:
    """The instance's environment as seen from inside (pure): HOME and TMPDIR
    its scratch, `bus` from /opt/stratus, the heartbeat at /run/stratus."""
    out = dict(env)
    out["HOME"] = "/tmp"
    out["TMPDIR"] = "/tmp"
    out["PYTHONPATH"] = INSIDE_BUS
    out["PATH"] = os.pathsep.join(inside_path(python))
    if heartbeat_file:
        out["STRATUS_HEARTBEAT_FILE"] = f"{INSIDE_RUN}/{os.path.basename(heartbeat_file)}"
    return out


class Jail:
    """The walls of one platform (state directory and cluster) on this host:
    tenants' accounts, cgroups and the network wall. `prepare()` checks that
    they can be built here, once; `wrap()` gives the command and environment
    of one instance; `release()` cleans up after it."""

    def __init__(self, settings, limits: Limits | None = None):
        self.settings = settings
        self.scope = f"{settings.state_path}\0{settings.cluster}"
        self.scope_key = hashlib.sha256(self.scope.encode()).hexdigest()[:12]
        self.limits = limits or Limits.from_env()
        self.bus_dir = str(Path(__file__).resolve().parent.parent.parent / "bus")
        self._ready = False

    # --- checks -------------------------------------------------------------------------
    def prepare(self) -> None:
        if self._ready:
            return
        if os.geteuid() != 0:
            raise ConfinementUnavailable(
                "tenant instances run confined (a uid of their own, bubblewrap, cgroups, nftables: "
                "docs/security.md), which needs root: run the platform as root, or use STRATUS_RUNTIME=docker")
        missing = [t for t in TOOLS if shutil.which(t) is None]
        if missing:
            raise ConfinementUnavailable(f"tenant instances run confined, but {', '.join(missing)} "
                                         "is not installed (make venv installs bubblewrap and nftables)")
        for c in ("memory", "cpu", "pids"):
            if not (CGROUP_ROOT / c).is_dir():
                raise ConfinementUnavailable(f"tenant instances run confined, but this host has no "
                                             f"cgroup v1 '{c}' controller at {CGROUP_ROOT / c}")
        from . import netwall
        netwall.ensure(TENANT_UIDS, netwall.broker_ports(self.settings.amqp_url))
        os.chmod(self.settings.state_path, 0o700)
        self._ready = True

    # --- accounts -----------------------------------------------------------------------
    def account(self, tenant: str) -> tuple[int, int]:
        """(uid, gid) of the tenant's account, made on first use."""
        name = account_name(self.scope, tenant)
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            r = subprocess.run(["useradd", "--system", "--no-create-home", "--user-group",
                                "--shell", "/usr/sbin/nologin", "--home-dir", "/nonexistent",
                                "--comment", f"stratus tenant {self.scope_key}", "-K", f"SYS_UID_MIN={TENANT_UIDS[0]}",
                                "-K", f"SYS_UID_MAX={TENANT_UIDS[1]}", "-K", f"SYS_GID_MIN={TENANT_UIDS[0]}",
                                "-K", f"SYS_GID_MAX={TENANT_UIDS[1]}", name],
                               capture_output=True, text=True, timeout=30)
            if r.returncode not in (0, 9):     # 9: made meanwhile by another orchestrator
                raise ConfinementUnavailable(f"cannot make the account of tenant {tenant}: "
                                             f"{r.stderr.strip() or r.returncode}")
            pw = pwd.getpwnam(name)
            log.info("made account %s (uid %d) for tenant %s", name, pw.pw_uid, tenant)
        if not TENANT_UIDS[0] <= pw.pw_uid <= TENANT_UIDS[1]:
            raise ConfinementUnavailable(f"account {name} of tenant {tenant} has uid {pw.pw_uid}, "
                                         f"outside the tenants' range {TENANT_UIDS}")
        return pw.pw_uid, pw.pw_gid

    def remove_account(self, tenant: str) -> bool:
        """Remove the tenant's account (its processes are gone by then)."""
        name = account_name(self.scope, tenant)
        try:
            pwd.getpwnam(name)
        except KeyError:
            return False
        from . import netwall
        netwall.forget(pwd.getpwnam(name).pw_uid)
        r = subprocess.run(["userdel", name], capture_output=True, text=True, timeout=30)
        if r.returncode not in (0, 6):
            log.warning("cannot remove account %s of tenant %s: %s", name, tenant, r.stderr.strip())
            return False
        return True

    def remove_all_accounts(self) -> int:
        """Remove every tenant account of this platform (its state directory
        and cluster), after killing whatever still runs under them, and its
        cgroups: a test cluster's end. Each account is marked with the
        platform's key in its comment; returns how many went."""
        gone = 0
        for pw in pwd.getpwall():
            if pw.pw_gecos == f"stratus tenant {self.scope_key}" and TENANT_UIDS[0] <= pw.pw_uid <= TENANT_UIDS[1]:
                from . import netwall
                subprocess.run(["pkill", "-KILL", "-U", str(pw.pw_uid)], capture_output=True, timeout=10)
                netwall.forget(pw.pw_uid)
                r = subprocess.run(["userdel", pw.pw_name], capture_output=True, text=True, timeout=30)
                gone += r.returncode == 0
        for ctrl in ("pids", "memory", "cpu"):
            scope = CGROUP_ROOT / ctrl / "stratus" / self.scope_key
            if ctrl == "pids" and scope.is_dir():
                for d in scope.iterdir():
                    if d.is_dir():
                        self.kill_all(d.name)
            for root, _dirs, _files in os.walk(scope, topdown=False):
                try:
                    os.rmdir(root)
                except OSError:
                    pass
        return gone

    # --- one instance -------------------------------------------------------------------
    def wrap(self, unit_id: str, tenant: str, argv: list[str], env: dict[str, str], package: str | None,
             python: str) -> tuple[list[str], dict[str, str]]:
        self.prepare()
        uid, gid = self.account(tenant)
        from . import netwall
        netwall.admit(uid)
        heartbeat = env.get("STRATUS_HEARTBEAT_FILE")
        beat_dir = None
        if heartbeat:
            beat_dir = os.path.dirname(heartbeat)
            os.makedirs(beat_dir, mode=0o700, exist_ok=True)
            os.chown(beat_dir, uid, gid)
        if package:   # its root is made 0700 by the unpacking; inside, the tenant's uid reads it
            os.chmod(package, 0o755)
        procs = self._cgroups(unit_id, account_name(self.scope, tenant))
        full = jail_argv(argv, uid=uid, gid=gid, limits=self.limits, package=package, bus_dir=self.bus_dir,
                         python_dirs=python_roots(), heartbeat_dir=beat_dir, cgroup_procs=procs)
        return full, inside_env(env, python=python, heartbeat_file=heartbeat)

    def _cgroups(self, unit_id: str, account: str) -> list[str]:
        procs = []
        for ctrl, path in cgroup_dirs(self.scope_key, unit_id, account).items():
            path.mkdir(parents=True, exist_ok=True)
            for fname, value in cgroup_settings(self.limits)[ctrl].items():
                (path / fname).write_text(value)
            if ctrl == "memory" and (path / "memory.memsw.limit_in_bytes").exists():
                try:   # no swap past the limit either, where the kernel accounts swap
                    (path / "memory.memsw.limit_in_bytes").write_text(str(self.limits.memory_mb * MIB))
                except OSError:
                    pass
            procs.append(str(path / "cgroup.procs"))
        return procs

    def oom_killed(self, unit_id: str) -> bool:
        """Whether the kernel killed something of the instance for memory."""
        f = cgroup_dirs(self.scope_key, unit_id)["memory"] / "memory.oom_control"
        try:
            for line in f.read_text().splitlines():
                k, _, v = line.partition(" ")
                if k == "oom_kill" and int(v) > 0:
                    return True
        except (OSError, ValueError):
            pass
        return False

    def kill_all(self, unit_id: str) -> int:
        """SIGKILL every process left in the instance's cgroup: what it forked,
        even into a session of its own, cannot leave it. Returns how many."""
        procs = cgroup_dirs(self.scope_key, unit_id)["pids"] / "cgroup.procs"
        killed = 0
        for _ in range(50):
            try:
                pids = [int(x) for x in procs.read_text().split()]
            except (OSError, ValueError):
                return killed
            if not pids:
                return killed
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
            time.sleep(0.02)
        return killed

    def release(self, unit_id: str, heartbeat: str | None = None, wait: float = 10.0, tenant: str = "") -> None:
        """After the instance is gone: its cgroups (once the last of its
        processes has left them: the kernel kills what its pid namespace
        held a moment after its pid 1) and heartbeat directory."""
        deadline = time.monotonic() + wait
        dirs = cgroup_dirs(self.scope_key, unit_id, account_name(self.scope, tenant) if tenant else "")
        self.kill_all(unit_id)
        for path in dirs.values():
            while True:
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if time.monotonic() > deadline:
                        log.warning("cgroup %s of %s stays: %s", path, unit_id, exc)
                        break
                    time.sleep(0.05)
        if heartbeat and os.path.basename(os.path.dirname(heartbeat)) == unit_id:
            shutil.rmtree(os.path.dirname(heartbeat), ignore_errors=True)
