"""The process runtime's bookkeeping with real processes: a stand-in
interpreter that keeps the worker's command line but only sleeps (the data
plane itself is exercised in the integration tests)."""
import dataclasses
import os
import signal
import threading
import time

from bus.settings import load
from orchestrator.runtimes import make_runtime
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
