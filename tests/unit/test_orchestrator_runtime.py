"""The process runtime's bookkeeping with real processes: a stand-in
interpreter that keeps the worker's command line but only sleeps (the data
plane itself is exercised in the integration tests). Then the pure part of
units of any kind: specs, the instance environment (nothing of the
orchestrator's), paths and kinds; app instances with real processes are in
tests/integration/test_instance_runtime.py."""
import dataclasses
import os
import signal
import threading
import time

import pytest

from bus.settings import load
from orchestrator.runtimes import Spec, StartError, instance_env, instance_log, make_runtime, worker_spec
from orchestrator.runtimes.base import ROOT, Handle, WorkerHandle
from orchestrator.runtimes.process import ProcessRuntime, pid_alive


def wait(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def runtime(tmp_path, stand_in):
    settings = dataclasses.replace(load(), cluster="rtunit", state_dir=str(tmp_path))
    return ProcessRuntime(settings, python=str(stand_in))


def make_stand_in(tmp_path):
    # `python -m worker --id ID` becomes: python3 -c <sleep, exit 0 on SIGTERM> -m worker --id ID
    script = tmp_path / "fake-python"
    # it writes <tmp>/<id>.up once its SIGTERM handler is in place
    script.write_text("#!/bin/sh\nexec python3 -c 'import signal,sys,time\n"
                      "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
                      f"open(\"{tmp_path}/\" + sys.argv[-1] + \".up\", \"w\").close()\n"
                      "time.sleep(120)' \"$@\"\n")
    script.chmod(0o755)
    return script


def test_start_exit_callback_adopt_and_close(tmp_path):
    fake = make_stand_in(tmp_path)
    rt = runtime(tmp_path, fake)
    exits = []
    got = threading.Event()
    rt.on_exit(lambda wid, code: (exits.append((wid, code)), got.set()))
    started = []
    try:
        a = rt.start_worker("w-a")
        b = rt.start_worker("w-b")
        started = [a.pid, b.pid]
        assert set(rt.workers()) == {"w-a", "w-b"}
        assert (rt.run_dir / "w-a.json").exists() and (rt.log_dir / "w-a.log").exists()
        assert wait(lambda: (tmp_path / "w-a.up").exists() and (tmp_path / "w-b.up").exists())  # both exec'd
        assert pid_alive(a.pid, "w-a") and pid_alive(b.pid, "w-b")
        assert not pid_alive(a.pid, "w-b")        # a pid is matched to its worker id

        # a crash is reported by the reaper at once, with the exit status
        rt.kill_worker("w-a")
        assert got.wait(5)
        assert exits == [("w-a", -signal.SIGKILL)]
        assert set(rt.workers()) == {"w-b"} and not (rt.run_dir / "w-a.json").exists()

        # a successor adopts the survivor by its pid file, and sees its death through polling
        rt2 = runtime(tmp_path, fake)
        exits2 = []
        rt2.on_exit(lambda wid, code: exits2.append((wid, code)))
        adopted = rt2.adopt()
        assert [(h.id, h.pid) for h in adopted] == [("w-b", b.pid)]
        assert set(rt2.workers()) == {"w-b"}
        os.kill(b.pid, signal.SIGKILL)
        assert wait(lambda: exits2 == [("w-b", None)], 5)
        assert rt2.workers() == {}

        # a clean close stops the workers it runs (SIGTERM: they exit 0)
        c = rt2.start_worker("w-c")
        started.append(c.pid)
        assert wait(lambda: (tmp_path / "w-c.up").exists())
        rt2.close(remove_workers=True)
        assert ("w-c", 0) in exits2 and not pid_alive(c.pid)
        assert list(rt2.run_dir.glob("*.json")) == []
    finally:
        for pid in started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_stale_pid_files_are_removed_and_factory_picks_the_runtime(tmp_path):
    fake = make_stand_in(tmp_path)
    rt = runtime(tmp_path, fake)
    (rt.run_dir / "w-gone.json").write_text('{"id": "w-gone", "pid": 999999999, "started": 0}')
    (rt.run_dir / "w-junk.json").write_text("not json")
    assert rt.adopt() == []
    assert list(rt.run_dir.glob("*.json")) == []
    settings = dataclasses.replace(load(), cluster="rtunit", state_dir=str(tmp_path), runtime="process")
    assert isinstance(make_runtime(settings), ProcessRuntime)
    try:
        make_runtime(dataclasses.replace(settings, runtime="nope"))
    except ValueError as exc:
        assert "nope" in str(exc)
    else:
        raise AssertionError("an unknown runtime must be refused")


# --- units of any kind: specs and the instance environment (pure) ----------------------
PLATFORM_SECRETS = {"STRATUS_ADMIN_PASSWORD": "admin-pw", "STRATUS_TOKEN_SECRET": "tok-secret",
                    "STRATUS_AMQP_URL": "amqp://platform:platform-pw@127.0.0.1:5672/%2F"}


def test_spec_normalises_and_refuses_bad_fields():
    s = Spec(id="i-1a2b3c4d", argv=["python", "-m", "shop.web"], port="8000", env={"A": 1}, labels={"tenant": "acme"})
    assert s.argv == ("python", "-m", "shop.web") and s.port == 8000 and dict(s.env) == {"A": "1"}
    with pytest.raises(TypeError):
        s.env["B"] = "2"          # read-only: a spec does not change after it is made
    assert s.to_dict()["labels"] == {"tenant": "acme"}
    for bad in (dict(id="", argv=("x",)), dict(id="a/b", argv=("x",)), dict(id="-x", argv=("x",)),
                dict(id="i-1", argv=()), dict(id="i-1", argv=("x",), port=0), dict(id="i-1", argv=("x",), port=65536),
                dict(id="i-1", argv=("x",), log="/abs.log"), dict(id="i-1", argv=("x",), log="a/../../b.log"),
                dict(id="i-1", argv=("x",), labels={"bad key": "v"})):
        with pytest.raises(ValueError):
            Spec(**bad)
    assert Spec(id="i-1", argv=(), image="img:1").argv == ()   # an image's own command
    assert instance_log("acme", "shop", "i-1") == "instances/acme/shop/i-1.log"
    w = worker_spec("w-1")
    assert w.argv == ("python", "-m", "worker", "--id", "w-1") and w.cwd == str(ROOT) and w.log == "w-1.log"
    assert WorkerHandle is Handle
    h = WorkerHandle("m", 11, started=900)
    assert (h.id, h.pid, h.started, h.host, h.port, h.adopted) == ("m", 11, 900, "127.0.0.1", None, False)


def test_instance_env_is_built_from_nothing():
    s = Spec(id="i-1", argv=("python", "app.py"), cwd="/pkg", port=9000,
             env={"STRATUS_TENANT": "acme", "STRATUS_AMQP_URL": "amqp://acme:pw@h/%2F", "GREETING": "hi"})
    env = instance_env(s, path="/venv/bin:/usr/bin", home="/pkg", pythonpath="/repo")
    assert env == {"PATH": "/venv/bin:/usr/bin", "LANG": "C.UTF-8", "HOME": "/pkg", "PYTHONUNBUFFERED": "1",
                   "PYTHONPATH": "/repo", "PORT": "9000", "STRATUS_TENANT": "acme",
                   "STRATUS_AMQP_URL": "amqp://acme:pw@h/%2F", "GREETING": "hi"}
    assert "PYTHONPATH" not in instance_env(s, path=None, home="/app", pythonpath=None)


def test_an_instance_gets_none_of_the_orchestrators_environment_and_a_worker_all_of_it(tmp_path, monkeypatch):
    for k, v in PLATFORM_SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("STRATUS_WORKER_ID", "w-leak")
    settings = dataclasses.replace(load(), cluster="rtunit", state_dir=str(tmp_path))
    pkg = tmp_path / "pkg"
    inst = ProcessRuntime(settings, kind="instance")
    spec = Spec(id="i-1a2b3c4d", argv=("python", "-m", "shop.web"), cwd=str(pkg), port=8001,
                env={"STRATUS_TENANT": "acme"}, log=instance_log("acme", "shop", "i-1a2b3c4d"))
    env = inst.env_of(spec)
    assert set(env) == {"PATH", "LANG", "HOME", "PYTHONUNBUFFERED", "PYTHONPATH", "PORT", "STRATUS_TENANT"}
    for k in PLATFORM_SECRETS:
        assert k not in env
    assert not any(v in str(env) for v in PLATFORM_SECRETS.values())
    assert env["PYTHONPATH"] == str(ROOT) and env["HOME"] == str(pkg)
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(inst.python)
    assert inst.argv_of(spec)[0] == inst.python                      # `python` is our interpreter
    assert inst.argv_of(Spec(id="i-2", argv=("/bin/echo", "x")))[0] == "/bin/echo"   # anything else as given
    with pytest.raises(StartError):
        inst.argv_of(Spec(id="i-3", argv=(), image="img"))
    base = tmp_path / "clusters" / "rtunit"
    assert inst.log_path(spec) == base / "logs" / "instances" / "acme" / "shop" / "i-1a2b3c4d.log"
    assert inst.run_dir == tmp_path / "clusters" / "rtunit" / "runtime" / "instances"

    work = ProcessRuntime(settings, kind="worker")
    wenv = work.env_of(worker_spec("w-1"))
    assert wenv["STRATUS_AMQP_URL"] == PLATFORM_SECRETS["STRATUS_AMQP_URL"]   # a worker is the platform
    assert "STRATUS_WORKER_ID" not in wenv and wenv["PYTHONUNBUFFERED"] == "1"
    assert work.run_dir == tmp_path / "clusters" / "rtunit" / "runtime"
    assert work.log_path(worker_spec("w-1")) == tmp_path / "clusters" / "rtunit" / "logs" / "w-1.log"


def test_make_runtime_kinds(tmp_path):
    settings = dataclasses.replace(load(), cluster="rtunit", state_dir=str(tmp_path), runtime="process")
    assert make_runtime(settings).kind == "worker"
    assert make_runtime(settings, kind="instance").kind == "instance"
    with pytest.raises(ValueError):
        make_runtime(settings, kind="gateway")
