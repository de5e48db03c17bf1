"""The pure parts of the walls (orchestrator/runtimes/confine.py, netwall.py):
the command line that confines an instance, its environment inside, the
limits and the accounts' names. The walls themselves are tested from inside
a deployed app (tests/integration/test_escape.py) and through the runtime
(tests/integration/test_instance_runtime.py)."""
from __future__ import annotations

import pytest

from orchestrator.runtimes import confine, netwall
from orchestrator.runtimes.confine import Limits


def argv(**kw):
    args = dict(uid=200123, gid=200123, limits=Limits(), package="/state/unpacked/acme/shop/sha256-ab",
                bus_dir="/repo/bus", python_dirs=["/opt/py/3.11", "/repo/.venv"],
                heartbeat_dir=None, cgroup_procs=["/sys/fs/cgroup/memory/stratus/k/i-1/cgroup.procs"])
    args.update(kw)
    return confine.jail_argv(["python", "-m", "shop.web"], **args)


def pairs(a, flag):
    return [(a[i + 1], a[i + 2]) for i, x in enumerate(a) if x == flag]


def test_the_command_drops_to_the_tenants_uid_without_privileges_and_runs_last():
    a = argv()
    assert a[-3:] == ["python", "-m", "shop.web"]
    drop = a[a.index("setpriv"):]
    assert "--reuid=200123" in drop and "--regid=200123" in drop and "--clear-groups" in drop
    assert "--no-new-privs" in drop and "--bounding-set=-all" in drop
    # SIGTERM: ignored by the wrappers, given back to the command
    assert a[:2] == ["sh", "-c"] and "trap '' TERM" in a[2]
    assert a.index("--default-signal=TERM") < a.index("setpriv")


def test_the_sandbox_shows_only_what_the_instance_needs():
    a = argv(heartbeat_dir="/state/heartbeats/i-1")
    ro = pairs(a, "--ro-bind")
    assert ("/usr", "/usr") in ro and ("/repo/bus", "/opt/stratus/bus") in ro
    assert ("/state/unpacked/acme/shop/sha256-ab", "/app") in ro        # its package, read-only
    assert ("/opt/py/3.11", "/opt/py/3.11") in ro and ("/repo/.venv", "/repo/.venv") in ro
    assert pairs(a, "--bind") == [("/state/heartbeats/i-1", "/run/stratus")]   # the one writable bind
    sources = [s for s, _ in ro + pairs(a, "--bind")]
    assert not any(s in ("/", "/repo", "/state", "/root", "/home", "/etc", "/proc", "/sys", "/var")
                   for s in sources)
    assert all(s.startswith("/etc/") for s, _ in pairs(a, "--ro-bind-try"))
    assert not any(s in ("/etc/passwd", "/etc/shadow", "/etc/group") for s, _ in pairs(a, "--ro-bind-try"))
    for flag in ("--unshare-pid", "--unshare-ipc", "--unshare-uts"):
        assert flag in a
    assert "--die-with-parent" not in a     # it outlives the orchestrator: a successor adopts it
    # a scratch /tmp of the disk limit's size
    i = a.index("/tmp")
    assert a[i - 1] == "--tmpfs" and a[i - 2] == str(64 * 1024 ** 2) and a[i - 3] == "--size"
    assert a[a.index("--chdir") + 1] == "/app"
    # mounted before every bind, so that a venv or package under /tmp is not hidden by it
    binds = [j for j, x in enumerate(a) if x in ("--ro-bind", "--bind") and a[j + 1] != "/usr"]
    assert binds and all(j > i for j in binds)


def test_a_platform_cloned_under_tmp_keeps_its_python_visible():
    a = argv(python_dirs=["/tmp/ci/.venv", "/opt/py/3.11"], bus_dir="/tmp/ci/bus")
    tmpfs = a.index("--tmpfs")
    venv = [j for j, x in enumerate(a) if x == "--ro-bind" and a[j + 1] == "/tmp/ci/.venv"]
    assert venv and venv[0] > tmpfs
    # the directories above it are made readable inside the tmpfs
    assert a[a.index("/tmp/ci") - 2:a.index("/tmp/ci")] == ["0755", "--dir"]


def test_the_limits_reach_the_kernel():
    lim = Limits(memory_mb=300, cpus=0.5, pids=64, disk_mb=10, log_mb=2)
    a = argv(limits=lim)
    assert f"--fsize={2 * 1024 ** 2}" in a
    s = confine.cgroup_settings(lim)
    assert s["memory"]["memory.limit_in_bytes"] == str(300 * 1024 ** 2)
    assert s["cpu"]["cpu.cfs_quota_us"] == "50000" and s["cpu"]["cpu.cfs_period_us"] == "100000"
    assert s["pids"]["pids.max"] == "64"
    # the shell joins every cgroup before anything of the instance runs
    assert 'echo $$ > "/sys/fs/cgroup/memory/stratus/k/i-1/cgroup.procs"' in a[2]
    assert a[2].index("cgroup.procs") < a[2].index('exec "$@"')


def test_limits_from_settings_and_bad_ones_refused(monkeypatch):
    monkeypatch.setenv("STRATUS_INSTANCE_MEMORY_MB", "512")
    monkeypatch.setenv("STRATUS_INSTANCE_CPUS", "0.25")
    assert Limits.from_env().to_dict() == {"memory_mb": 512, "cpus": 0.25, "pids": 128, "disk_mb": 64,
                                           "log_mb": 64}
    monkeypatch.setenv("STRATUS_INSTANCE_PIDS", "2")
    with pytest.raises(ValueError, match="at least"):
        Limits.from_env()
    monkeypatch.setenv("STRATUS_INSTANCE_PIDS", "many")
    with pytest.raises(ValueError, match="STRATUS_INSTANCE_PIDS"):
        Limits.from_env()


def test_inside_the_environment_points_at_the_sandbox():
    env = confine.inside_env({"PATH": "/x", "HOME": "/state/unpacked/acme", "PYTHONPATH": "/repo",
                              "STRATUS_HEARTBEAT_FILE": "/state/heartbeats/i-1/beat", "PORT": "9000"},
                             python="/repo/.venv/bin/python", heartbeat_file="/state/heartbeats/i-1/beat")
    assert env["HOME"] == env["TMPDIR"] == "/tmp" and env["PYTHONPATH"] == "/opt/stratus"
    assert env["STRATUS_HEARTBEAT_FILE"] == "/run/stratus/beat" and env["PORT"] == "9000"
    assert env["PATH"].split(":")[0] == "/repo/.venv/bin"
    assert "/state" not in "".join(env.values())


def test_each_tenant_of_each_platform_has_its_own_account_name():
    names = {confine.account_name(scope, t) for scope in ("/var/a\0c1", "/var/a\0c2", "/var/b\0c1")
             for t in ("acme", "beta")}
    assert len(names) == 6
    n = confine.account_name("/var/a\0c1", "acme")
    assert n == confine.account_name("/var/a\0c1", "acme") and n.startswith("st") and len(n) <= 32


def test_the_network_wall_lets_tenants_reach_the_broker_and_their_own_sockets_only():
    rules = netwall.ruleset((200000, 299999))
    lines = [ln.strip() for ln in rules.splitlines()]
    # the listener's answer to a tenant's connection is checked first: its owner must be the caller
    answer = "ct direction reply ct mark 200000-299999 tcp flags & (syn | ack) == syn | ack jump answer"
    assert lines.index(answer) < lines.index("meta skuid != 200000-299999 accept")
    assert "meta skuid . ct mark @same_uid accept" in lines
    assert lines[lines.index("meta skuid . ct mark @same_uid accept") + 1] == "reject with tcp reset"
    # the broker, then this host (marked with the caller's uid), then nothing
    order = ["ct state established,related accept", "tcp dport @tenant_ports accept",
             "fib daddr type local meta l4proto tcp ct mark set meta skuid map @uid_mark accept",
             "meta l4proto tcp reject with tcp reset", "reject"]
    assert [lines.index(x) for x in order] == sorted(lines.index(x) for x in order)
    assert netwall.broker_ports("amqp://u:p@127.0.0.1:5672/%2F,amqp://u:p@127.0.0.1:5673/%2F") == [5672, 5673]
    assert netwall.broker_ports("amqps://h/%2F") == [5671]


def test_a_platform_not_started_as_root_refuses_to_run_tenant_code(monkeypatch, tmp_path):
    """No walls, no tenant code: the start fails with the reason and the way out."""
    from types import SimpleNamespace
    monkeypatch.setattr(confine.os, "geteuid", lambda: 1000)
    jail = confine.Jail(SimpleNamespace(state_path=tmp_path, cluster="c1", amqp_url="amqp://u:p@h:5672/%2F"))
    with pytest.raises(confine.ConfinementUnavailable, match="needs root.*STRATUS_RUNTIME=docker"):
        jail.wrap("i-1", "acme", ["python", "-m", "shop.web"], {}, None, "/usr/bin/python3")
    assert not (tmp_path / "secrets").exists()


def test_a_missing_tool_is_named(monkeypatch, tmp_path):
    from types import SimpleNamespace
    monkeypatch.setattr(confine.os, "geteuid", lambda: 0)
    monkeypatch.setattr(confine.shutil, "which", lambda t: None if t == "bwrap" else f"/usr/bin/{t}")
    jail = confine.Jail(SimpleNamespace(state_path=tmp_path, cluster="c1", amqp_url=""))
    with pytest.raises(confine.ConfinementUnavailable, match="bwrap is not installed"):
        jail.prepare()


def test_the_cpu_is_shared_tenant_by_tenant():
    d = confine.cgroup_dirs("k", "i-1", "st0123")
    assert d["cpu"] == confine.CGROUP_ROOT / "cpu" / "stratus" / "k" / "st0123" / "i-1"
    assert d["memory"] == confine.CGROUP_ROOT / "memory" / "stratus" / "k" / "i-1"
    assert d["pids"] == confine.CGROUP_ROOT / "pids" / "stratus" / "k" / "i-1"
