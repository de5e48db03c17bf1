"""The process runtime running app instances, with real processes: a small
HTTP server, written into a package directory as a tenant would ship it,
started through `make_runtime(settings, kind="instance")`.

Checked: it serves on its PORT with `bus` importable, its environment holds
nothing of the orchestrator's (no admin password, token secret or broker URL),
its output lands in logs/instances/<tenant>/<app>/<id>.log, stop and kill
report their exit codes through on_exit and signal the whole process group, a
second runtime (a new orchestrator) adopts it with its labels, host and port
and sees it die, a pid file naming a recycled or foreign pid is never adopted
(nor signalled), and workers and instances never see each other."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from bus.ports import free_port
from orchestrator.runtimes import Spec, StartError, instance_log, make_runtime
from orchestrator.runtimes.process import ProcessRuntime, pid_alive, proc_start_time
from stratus.measure import wait_for

SERVER = r'''
import json, os, signal, subprocess, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import bus  # importable through PYTHONPATH (the repository root)

# stays in our group; the test finds it on the host by its marker (its pid in here is the sandbox's)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                          "child-of-" + os.environ["STRATUS_INSTANCE"]])

class H(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/health":
            body = b"ok"
        elif self.path == "/env":
            body = json.dumps({"env": dict(os.environ), "cwd": os.getcwd(), "uid": os.getuid(),
                               "child": "child-of-" + os.environ["STRATUS_INSTANCE"],
                               "bus": bus.__file__, "python": sys.executable}).encode()
        else:
            self.send_response(404); self.end_headers(); return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        print("request", fmt % args, flush=True)

def term(*_):
    print("got SIGTERM, exiting 3", flush=True)
    os._exit(3)

signal.signal(signal.SIGTERM, term)
srv = ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H)
print("hello from", os.environ["STRATUS_INSTANCE"], "on port", os.environ["PORT"], flush=True)
srv.serve_forever()
'''

SECRETS = {"STRATUS_ADMIN_PASSWORD": "admin-pw-not-for-tenants", "STRATUS_TOKEN_SECRET": "token-secret-xyz",
           "STRATUS_AMQP_URL": "amqp://platform:broker-pw@127.0.0.1:5672/%2F"}


@pytest.fixture
def secrets_in_env(monkeypatch):
    """The orchestrator's environment holds the platform's secrets, as in production."""
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def package(tmp_path):
    d = tmp_path / "pkg"
    d.mkdir()
    (d / "server.py").write_text(SERVER)
    return d


def spec_for(package, iid: str, port: int, *, tenant="acme", app="shop") -> Spec:
    return Spec(id=iid, argv=("python", "server.py"), cwd=str(package), port=port,
                env={"STRATUS_TENANT": tenant, "STRATUS_APP": app, "STRATUS_ROLE": "web", "STRATUS_INSTANCE": iid,
                     "STRATUS_AMQP_URL": f"amqp://{tenant}:tenant-pw@127.0.0.1:5672/%2F"},
                labels={"tenant": tenant, "app": app, "role": "web", "digest": "sha256:" + "ab" * 32},
                log=instance_log(tenant, app, iid))


def get(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.status, r.read()


def serving(port: int) -> bool:
    try:
        return get(port, "/health") == (200, b"ok")
    except OSError:
        return False


class Exits:
    def __init__(self, rt):
        self.seen: list[tuple[str, int | None]] = []
        self.cond = threading.Condition()
        rt.on_exit(self.add)

    def add(self, uid, code):
        with self.cond:
            self.seen.append((uid, code))
            self.cond.notify_all()

    def wait(self, uid, timeout=10.0):
        with self.cond:
            assert self.cond.wait_for(lambda: any(u == uid for u, _ in self.seen), timeout), \
                f"no exit report for {uid}: {self.seen}"
            return [c for u, c in self.seen if u == uid]


def marked(marker: str) -> list[int]:
    """The host pids whose command line carries `marker`."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if marker.encode() in open(f"/proc/{d}/cmdline", "rb").read().split(b"\0"):
                    out.append(int(d))
            except OSError:
                pass
    return out


def kill_quietly(*pids):
    pids = [p for pid in pids for p in (marked(pid) if isinstance(pid, str) else [pid])]
    for pid in pids:
        if pid and pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_an_instance_serves_with_a_clean_env_logs_and_stops_with_its_exit_code(cluster, package, secrets_in_env):
    rt = make_runtime(cluster.settings, kind="instance")
    assert isinstance(rt, ProcessRuntime) and rt.kind == "instance"
    exits = Exits(rt)
    port = free_port()
    h = rt.start(spec_for(package, "i-0000aaaa", port))
    child = None
    try:
        assert (h.id, h.port, h.host) == ("i-0000aaaa", port, "127.0.0.1")
        assert h.labels == {"tenant": "acme", "app": "shop", "role": "web", "digest": "sha256:" + "ab" * 32}
        wait_for(lambda: serving(port), 15, what="the instance to serve")
        assert set(rt.running()) == {"i-0000aaaa"} and rt.pid_of("i-0000aaaa") == h.pid

        info = json.loads(get(port, "/env")[1])
        env, child = info["env"], info["child"]
        # exactly the instance environment, nothing of the orchestrator's
        assert set(env) == {"PATH", "LANG", "HOME", "TMPDIR", "PWD", "PYTHONUNBUFFERED", "PYTHONPATH", "PORT",
                            "STRATUS_TENANT", "STRATUS_APP", "STRATUS_ROLE", "STRATUS_INSTANCE", "STRATUS_AMQP_URL"}
        assert env["STRATUS_AMQP_URL"] == "amqp://acme:tenant-pw@127.0.0.1:5672/%2F"   # its own, not ours
        assert "STRATUS_ADMIN_PASSWORD" not in env and "STRATUS_TOKEN_SECRET" not in env
        assert not any(v in json.dumps(env) for v in SECRETS.values())
        # inside its walls (docs/security.md): its package read-only at /app, a scratch /tmp, its own uid
        assert env["HOME"] == "/tmp" and info["cwd"] == "/app" and env["PORT"] == str(port)
        assert 200000 <= info["uid"] <= 299999
        assert env["LANG"] == "C.UTF-8" and env["PYTHONUNBUFFERED"] == "1"
        assert info["python"] == sys.executable and info["bus"].startswith(env["PYTHONPATH"])

        # the pid file keeps what a successor needs, and not the environment (credentials)
        pidfile = cluster.settings.cluster_state_path() / "runtime" / "instances" / "i-0000aaaa.json"
        rec = json.loads(pidfile.read_text())
        assert rec["pid"] == h.pid and rec["pstart"] == proc_start_time(h.pid) and rec["port"] == port
        assert rec["labels"] == h.labels and rec["cwd"] == str(package) and rec["argv"][1:] == ["server.py"]
        assert "tenant-pw" not in pidfile.read_text()
        assert not (cluster.settings.cluster_state_path() / "runtime" / "i-0000aaaa.json").exists()

        # its own output file
        logf = cluster.settings.cluster_state_path() / "logs" / "instances" / "acme" / "shop" / "i-0000aaaa.log"
        assert h.log == str(logf)
        wait_for(lambda: "hello from i-0000aaaa on port" in logf.read_text(), 5, what="the greeting in the log")
        wait_for(lambda: "GET /env" in logf.read_text(), 5, what="the request line in the log")

        # stop: SIGTERM to the group, the instance's own exit status reported
        rt.stop("i-0000aaaa", timeout=5)
        assert exits.wait("i-0000aaaa") == [3]
        assert rt.running() == {} and not pidfile.exists()
        wait_for(lambda: not marked(child), 5, what="the instance's child to go with its group")
        assert "got SIGTERM" in logf.read_text()
        rt.stop("i-0000aaaa")   # stopping what is gone is a no-op
        with pytest.raises(KeyError):
            rt.kill("i-0000aaaa")
    finally:
        rt.close()
        kill_quietly(h.pid, child)


def test_kill_is_a_crash_of_the_whole_group_and_a_stubborn_instance_is_killed_after_the_timeout(cluster, package):
    rt = make_runtime(cluster.settings, kind="instance")
    exits = Exits(rt)
    p1 = free_port()
    a = rt.start(spec_for(package, "i-0000000a", p1))
    # an instance that ignores SIGTERM
    stubborn = Spec(id="i-0000000b", argv=("python", "-c", "import signal, time\n"
                                           "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                           "print('ignoring SIGTERM', flush=True)\ntime.sleep(120)"),
                    cwd=str(package), labels={"tenant": "acme", "app": "shop"},
                    log=instance_log("acme", "shop", "i-0000000b"))
    b = rt.start(stubborn)
    child = None
    try:
        wait_for(lambda: serving(p1), 15, what="instance a to serve")
        child = json.loads(get(p1, "/env")[1])["child"]
        assert marked(child), "the instance's child runs on the host"
        rt.kill("i-0000000a")
        assert exits.wait("i-0000000a") == [-signal.SIGKILL]
        wait_for(lambda: not marked(child), 5, what="the killed instance's child to die with it")
        assert not serving(p1)

        logb = cluster.settings.cluster_state_path() / "logs" / "instances" / "acme" / "shop" / "i-0000000b.log"
        wait_for(lambda: logb.exists() and "ignoring SIGTERM" in logb.read_text(), 10, what="b's handler in place")
        t0 = time.monotonic()
        rt.stop("i-0000000b", timeout=1.0)
        took = time.monotonic() - t0
        assert exits.wait("i-0000000b") == [-signal.SIGKILL]
        assert 1.0 <= took < 5.0, took
        assert rt.running() == {}
    finally:
        rt.close()
        kill_quietly(a.pid, b.pid, child)


def test_a_new_orchestrator_adopts_a_running_instance_with_its_labels_and_sees_it_die(cluster, package):
    first = make_runtime(cluster.settings, kind="instance")
    first_exits = Exits(first)
    port = free_port()
    h = first.start(spec_for(package, "i-00adab7e", port, tenant="beta", app="blog"))
    second = None
    try:
        wait_for(lambda: serving(port), 15, what="the instance to serve")
        first.close(remove=False)   # the orchestrator goes away; its instance keeps serving
        assert serving(port)

        second = make_runtime(cluster.settings, kind="instance")
        exits = Exits(second)
        adopted = second.adopt()
        assert [(x.id, x.pid, x.host, x.port, x.adopted) for x in adopted] == \
            [("i-00adab7e", h.pid, "127.0.0.1", port, True)]
        assert adopted[0].labels == {"tenant": "beta", "app": "blog", "role": "web",
                                     "digest": "sha256:" + "ab" * 32}
        assert adopted[0].started == pytest.approx(h.started)
        assert adopted[0].log == h.log
        assert set(second.running()) == {"i-00adab7e"}
        assert second.adopt() == []   # idempotent

        # it is not our child: its death is seen by polling, with no exit code
        os.killpg(h.pid, signal.SIGKILL)
        assert exits.wait("i-00adab7e") == [None]
        assert second.running() == {}
        assert not (second.run_dir / "i-00adab7e.json").exists()
        time.sleep(0.3)
        assert first_exits.seen == []   # the orchestrator that let go reports nothing
    finally:
        first.close(remove=False)
        if second is not None:
            second.close()
        kill_quietly(h.pid)


def test_a_recycled_or_foreign_pid_is_never_adopted_nor_signalled(cluster):
    rt = make_runtime(cluster.settings, kind="instance")
    foreign = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        wait_for(lambda: proc_start_time(foreign.pid) is not None, 5, what="the foreign process")
        real = proc_start_time(foreign.pid)
        rec = {"id": "i-0000f0e1", "kind": "instance", "pid": foreign.pid, "pstart": real + 1, "host": "127.0.0.1",
               "port": 1234, "labels": {"tenant": "x"}, "started": time.time()}
        (rt.run_dir / "i-0000f0e1.json").write_text(json.dumps(rec))       # the pid was recycled
        rec2 = {**rec, "id": "i-0000f0e2"}
        rec2.pop("pstart")
        (rt.run_dir / "i-0000f0e2.json").write_text(json.dumps(rec2))      # no start time: no proof
        rec3 = {**rec, "id": "i-0000f0e3", "pstart": real, "boot": "another-boot"}
        (rt.run_dir / "i-0000f0e3.json").write_text(json.dumps(rec3))      # before a reboot
        rec4 = {**rec, "id": "i-0000f0e4", "pid": 999999999}
        (rt.run_dir / "i-0000f0e4.json").write_text(json.dumps(rec4))      # gone
        (rt.run_dir / "i-0000f0e5.json").write_text("{not json")
        assert rt.adopt() == []
        assert list(rt.run_dir.glob("*.json")) == []
        assert rt.running() == {}
        rt.close()
        assert foreign.poll() is None   # never signalled

        # the same process with its true start time is adopted (the check is the start time)
        rt2 = make_runtime(cluster.settings, kind="instance")
        (rt2.run_dir / "i-0000f0e6.json").write_text(json.dumps({**rec, "id": "i-0000f0e6", "pstart": real}))
        assert [x.id for x in rt2.adopt()] == ["i-0000f0e6"]
        rt2.close(remove=False)
    finally:
        foreign.kill()
        foreign.wait(5)


def test_bad_specs_are_refused_and_a_missing_program_is_a_start_error(cluster, package):
    rt = make_runtime(cluster.settings, kind="instance")
    try:
        with pytest.raises(ValueError):
            Spec(id="../etc", argv=("python",))
        with pytest.raises(ValueError):
            Spec(id="i-1", argv=("python",), log="../../escape.log")
        with pytest.raises(ValueError):
            Spec(id="i-1", argv=("python",), port=70000)
        with pytest.raises(StartError):
            rt.start(Spec(id="i-00000001", argv=("python", "server.py"), cwd=str(package / "missing")))
        with pytest.raises(StartError):
            rt.start(Spec(id="i-00000002", argv=("no-such-program-here",), cwd=str(package),
                          labels={"tenant": "acme"}, log=instance_log("acme", "shop", "i-00000002")))
        with pytest.raises(StartError, match="needs its tenant"):   # no walls without a tenant's account
            rt.start(Spec(id="i-00000003", argv=("python", "server.py"), cwd=str(package)))
        logf = rt.log_dir / "instances" / "acme" / "shop" / "i-00000002.log"
        assert "cannot start i-00000002" in logf.read_text()
        assert rt.running() == {} and list(rt.run_dir.glob("*.json")) == []
    finally:
        rt.close()


def make_stand_in(tmp_path):
    """`python -m worker --id ID` that only sleeps (the DB is not under test here)."""
    script = tmp_path / "fake-python"
    script.write_text("#!/bin/sh\nexec python3 -c 'import signal,sys,time\n"
                      "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
                      "time.sleep(120)' \"$@\"\n")
    script.chmod(0o755)
    return script


def test_workers_and_instances_never_see_each_other(cluster, package, tmp_path):
    workers = ProcessRuntime(cluster.settings, python=str(make_stand_in(tmp_path)), kind="worker")
    instances = make_runtime(cluster.settings, kind="instance")
    port = free_port()
    w = workers.start_worker("w-0000beef")
    i = instances.start(spec_for(package, "i-0000beef", port))
    others = []
    try:
        wait_for(lambda: serving(port), 15, what="the instance to serve")
        wait_for(lambda: pid_alive(w.pid, "w-0000beef"), 5, what="the worker to exec")
        assert set(workers.workers()) == {"w-0000beef"} and set(instances.running()) == {"i-0000beef"}

        # successors of each kind adopt their own kind only
        w2 = ProcessRuntime(cluster.settings, python=str(make_stand_in(tmp_path)), kind="worker")
        i2 = make_runtime(cluster.settings, kind="instance")
        others = [w2, i2]
        assert [h.id for h in w2.adopt()] == ["w-0000beef"]
        assert [h.id for h in i2.adopt()] == ["i-0000beef"]
        with pytest.raises(KeyError):
            w2.kill_worker("i-0000beef")
        with pytest.raises(KeyError):
            i2.kill("w-0000beef")

        # closing the workers' runtime stops the workers, and leaves the instance serving
        w2.close(remove_workers=False)
        workers.close(remove_workers=True)
        assert not pid_alive(w.pid) and serving(port)
        instances.close(remove=True)
        assert not serving(port)
    finally:
        for rt in others:
            rt.close(remove=False)
        workers.close()
        instances.close()
        kill_quietly(w.pid, i.pid)


def test_an_instance_past_its_limits_is_stopped_there_and_the_platform_says_why(cluster, package, monkeypatch):
    """The walls' limits (docs/security.md): memory (the kernel kills the
    instance, the runtime says why), processes (a fork bomb stops at the
    limit), disk (the scratch /tmp is full at its size) and log volume."""
    monkeypatch.setenv("STRATUS_INSTANCE_MEMORY_MB", "64")
    monkeypatch.setenv("STRATUS_INSTANCE_PIDS", "40")
    monkeypatch.setenv("STRATUS_INSTANCE_DISK_MB", "8")
    monkeypatch.setenv("STRATUS_INSTANCE_LOG_MB", "1")
    rt = make_runtime(cluster.settings, kind="instance")
    exits = Exits(rt)
    (package / "hog.py").write_text(
        "chunks = []\n"
        "for n in range(1, 64):\n"
        "    chunks.append(bytearray(16 * 1024 * 1024)); print('held', 16 * n, 'MiB', flush=True)\n")
    (package / "greedy.py").write_text(
        "import os, time\n"
        "kids = 0\n"
        "try:\n"
        "    for _ in range(500):\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(3); os._exit(0)\n"
        "        kids += 1\n"
        "except OSError as e:\n"
        "    print('fork refused after', kids, e.errno, flush=True)\n"
        "written = 0\n"
        "try:\n"
        "    with open('/tmp/fill', 'wb') as f:\n"
        "        while written < 64 * 1024 * 1024:\n"
        "            f.write(b'x' * 65536); f.flush(); written += 65536\n"
        "except OSError as e:\n"
        "    print('disk full after', written, e.errno, flush=True)\n"
        "try:\n"
        "    while True:\n"
        "        os.write(1, b'y' * 65536)\n"
        "except OSError as e:\n"
        "    print('log refused', e.errno, file=open('/tmp/x', 'w'))\n"
        "os._exit(7)\n")
    hog = rt.start(Spec(id="i-000000c1", argv=("python", "hog.py"), cwd=str(package),
                        labels={"tenant": "acme", "app": "shop"}, log=instance_log("acme", "shop", "i-000000c1")))
    greedy = rt.start(Spec(id="i-000000c2", argv=("python", "greedy.py"), cwd=str(package),
                           labels={"tenant": "acme", "app": "shop"},
                           log=instance_log("acme", "shop", "i-000000c2")))
    try:
        [code] = exits.wait("i-000000c1")
        assert code in (137, -signal.SIGKILL), code
        assert rt.exit_reason("i-000000c1") == "out of memory (limit 64 MiB)"
        log_text = Path(hog.log).read_text()
        held = [int(line.split()[1]) for line in log_text.splitlines() if line.startswith("held")]
        assert held and max(held) < 64, held
        assert "was killed: out of memory" in log_text

        assert exits.wait("i-000000c2") == [7]
        text = Path(greedy.log).read_bytes()
        fork_line = next(ln for ln in text.split(b"\n") if ln.startswith(b"fork refused after"))
        assert int(fork_line.split()[3]) < 40, fork_line
        disk_line = next(ln for ln in text.split(b"\n") if ln.startswith(b"disk full after"))
        assert int(disk_line.split()[3]) <= 8 * 1024 * 1024, disk_line
        assert len(text) <= 1024 * 1024, len(text)   # the log stopped at its limit
        assert rt.exit_reason("i-000000c2") is None
    finally:
        rt.close()
