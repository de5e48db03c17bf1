"""stratus/apps_cli.py: argument parsing, where it talks and as whom, the
package it builds from a real directory (members, exclusions, links left
out, accepted by the platform's own package check, the same bytes twice),
the manifest in JSON and YAML, the progress lines, following without
repeats; and `stratus logs` over HTTP against the real logs blueprint (its
lines, and a JSON error with exit 1). The commands against the running
platform's apps routes are the lead's end-to-end test."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
import threading
import time

import jwt
import pytest

from bus.service import base_app
from bus.settings import load
from orchestrator import logs as logs_api
from orchestrator.api import identity
from orchestrator.apps.packages import check_archive
from stratus import apps_cli, cli
from stratus.apps_cli import Target


# --- arguments -----------------------------------------------------------------------------
def test_scale_and_restart_references():
    a = apps_cli.parse("scale", ["acme/shop/web", "3"])
    assert (a.tenant, a.app, a.role, a.instances, a.no_wait, a.timeout) == ("acme", "shop", "web", 3, False, 120.0)
    a = apps_cli.parse("scale", ["acme/shop/web", "0", "--no-wait", "--url", "http://h:1"])
    assert a.instances == 0 and a.no_wait and a.url == "http://h:1"
    a = apps_cli.parse("restart", ["acme/shop", "--timeout", "5"])
    assert (a.tenant, a.app, a.timeout) == ("acme", "shop", 5.0)


@pytest.mark.parametrize("cmd,args", [
    ("scale", []), ("scale", ["acme/shop", "3"]), ("scale", ["acme/shop/web/x", "3"]), ("scale", ["acme//web", "3"]),
    ("scale", ["acme/shop/web", "three"]), ("scale", ["acme/shop/web", "-1"]), ("restart", ["acme"]),
    ("restart", ["acme/shop/web"]), ("deploy", []), ("logs", ["--since", "yesterday"]), ("logs", ["--limit", "0"]),
    ("logs", ["--limit", "10001"]), ("events", ["--since", "-3"]), ("events", ["a", "b"]),
])
def test_bad_arguments_exit_2(cmd, args, capsys):
    with pytest.raises(SystemExit) as exc:
        apps_cli.parse(cmd, args)
    assert exc.value.code == 2
    assert f"usage: stratus {cmd}" in capsys.readouterr().err


def test_optional_arguments():
    a = apps_cli.parse("deploy", ["./shop", "--tenant", "acme", "--app", "web-shop"])
    assert (a.path, a.tenant, a.app) == ("./shop", "acme", "web-shop")
    assert apps_cli.parse("apps", []).tenant is None and apps_cli.parse("apps", ["acme", "--json"]).json
    a = apps_cli.parse("events", ["acme", "--since", "7", "-f"])
    assert (a.tenant, a.since, a.follow) == ("acme", 7, True)
    a = apps_cli.parse("logs", ["acme/shop", "--grep", "rid-1", "--since", "1700000000.5", "--follow"])
    assert (a.component, a.grep, a.since_t, a.follow, a.limit) == ("acme/shop", "rid-1", 1700000000.5, True, 1000)
    assert apps_cli.parse("logs", []).component is None


@pytest.mark.parametrize("text,ago", [("90s", 90), ("15m", 900), ("2h", 7200), ("1d", 86400), ("1.5m", 90)])
def test_since_durations(text, ago):
    assert apps_cli.parse_since(text, now=1_000_000.0) == 1_000_000.0 - ago


def test_where_and_as_whom():
    settings = dataclasses.replace(load(), orchestrator_url="http://orch:1", gateway_url="http://gw:2")
    assert apps_cli.target(None, None, settings, env={}) == Target("http://orch:1", None)
    assert apps_cli.target(None, "tok", settings, env={}) == Target("http://gw:2", "tok")
    assert apps_cli.target("http://x:3", None, settings, env={"STRATUS_URL": "http://y:4"}) == Target("http://x:3", None)
    assert apps_cli.target(None, None, settings, env={"STRATUS_URL": "http://y:4", "STRATUS_TOKEN": "t"}) == \
        Target("http://y:4", "t")
    assert apps_cli.target(None, "mine", settings, env={"STRATUS_TOKEN": "env"}).token == "mine"


def test_the_tenant_comes_from_the_argument_the_environment_or_the_token():
    tok = jwt.encode({"sub": "acme", "role": "tenant", "tenant": "acme", "exp": time.time() + 60}, "s" * 32,
                     algorithm="HS256")
    admin = jwt.encode({"sub": "admin", "role": "admin"}, "s" * 32, algorithm="HS256")
    assert apps_cli.token_tenant(tok) == "acme"
    assert apps_cli.token_tenant(admin) is None
    for bad in (None, "", "abc", "a.b.c", "a.!!!.c"):
        assert apps_cli.token_tenant(bad) is None
    t = Target("http://gw", tok)
    assert apps_cli.tenant_of("beta", t, env={"STRATUS_TENANT": "gamma"}) == "beta"
    assert apps_cli.tenant_of(None, t, env={"STRATUS_TENANT": "gamma"}) == "gamma"
    assert apps_cli.tenant_of(None, t, env={}) == "acme"
    assert apps_cli.tenant_of(None, Target("http://orch", None), env={}) is None


# --- the package ------------------------------------------------------------------------------
@pytest.fixture
def shop(tmp_path):
    d = tmp_path / "shop"
    (d / "shop" / "__pycache__").mkdir(parents=True)
    (d / ".git" / "objects").mkdir(parents=True)
    (d / ".pytest_cache").mkdir()
    (d / ".pytest_cache" / "v").write_text("x")
    (d / "static" / "empty").mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"roles": {"web": {"kind": "web", "command": ["python", "-m", "shop"],
                                                                   "instances": 2, "routes": ["/shop"]}}}))
    (d / "shop" / "__init__.py").write_text("")
    (d / "shop" / "__main__.py").write_text("print('hi')\n")
    (d / "shop" / "old.pyc").write_bytes(b"\x00compiled")
    (d / "shop" / "old.pyo").write_bytes(b"\x00compiled")
    (d / "shop" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\x00")
    (d / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (d / ".gitignore").write_text("*.pyc\n")                # a file, not the .git directory: kept
    (d / "static" / "style.css").write_text("body {}\n")
    (d / "pyc.txt").write_text("not compiled\n")
    os.symlink("/etc/hostname", d / "link-out")
    os.symlink("shop", d / "shop-link")
    return d


def test_package_members_and_exclusions(shop, tmp_path):
    data, members, skipped = apps_cli.package(shop)
    assert members == [".gitignore", "manifest.json", "pyc.txt", "shop/__init__.py", "shop/__main__.py",
                       "static/style.css"]
    assert sorted(skipped) == ["link-out", "shop-link"]
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        got = {m.name: m for m in tar.getmembers()}
        assert sorted(got) == members
        assert tar.extractfile("shop/__main__.py").read() == b"print('hi')\n"
        assert all(m.isreg() and m.uid == 0 and m.gid == 0 and not m.uname and m.mtime == 0 for m in got.values())
    # The platform's own check accepts it; the same tree packs to the same bytes.
    path = tmp_path / "p.tar.gz"
    path.write_bytes(data)
    assert check_archive(path) == len(members)
    assert apps_cli.package(shop)[0] == data


def test_package_limit_and_not_a_directory(shop, tmp_path):
    (shop / "blob.bin").write_bytes(os.urandom(200_000))
    with pytest.raises(apps_cli.Usage, match="MiB"):
        apps_cli.package(shop, limit=100_000)
    with pytest.raises(apps_cli.Usage, match="not a directory"):
        apps_cli.package(shop / "manifest.json")


def test_manifest_json_and_yaml(shop, tmp_path):
    assert apps_cli.read_manifest(shop)["roles"]["web"]["instances"] == 2
    y = tmp_path / "y"
    y.mkdir()
    (y / "manifest.yml").write_text("roles:\n  jobs:\n    kind: worker\n    command: [python, -m, jobs]\n"
                                    "    instances: 1\n")
    assert apps_cli.read_manifest(y) == {"roles": {"jobs": {"kind": "worker", "command": ["python", "-m", "jobs"],
                                                            "instances": 1}}}
    (y / "manifest.json").write_text("[1, 2]")              # JSON first; and a manifest is an object
    with pytest.raises(apps_cli.Usage, match="mapping"):
        apps_cli.read_manifest(y)
    (y / "manifest.json").write_text("{not json")
    with pytest.raises(apps_cli.Usage, match="JSON"):
        apps_cli.read_manifest(y)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(apps_cli.Usage, match="no manifest"):
        apps_cli.read_manifest(empty)


def test_deploy_without_a_tenant_exits_2(shop, capsys, monkeypatch):
    monkeypatch.delenv("STRATUS_TENANT", raising=False)
    monkeypatch.delenv("STRATUS_TOKEN", raising=False)
    assert apps_cli.main("deploy", [str(shop), "--url", "http://127.0.0.1:1"]) == 2
    assert "name the tenant" in capsys.readouterr().err


# --- progress -------------------------------------------------------------------------------------
def view(**roles):
    """An app as GET shows it: role -> list of instance states (desired = len, unless given)."""
    out = {"tenant": "acme", "name": "shop", "generation": 1, "roles": {}}
    for name, spec in roles.items():
        states, desired = spec if isinstance(spec, tuple) else (spec, len(spec))
        inst = [{"id": f"{name}-{i}", "state": s, "started": 100.0 + i, "restarts": 0} for i, s in enumerate(states)]
        out["roles"][name] = {"kind": "web", "desired": desired, "routes": ["/shop"],
                              "running": sum(s == "running" for s in states), "instances": inst}
    return out


def test_progress_lines_and_settling():
    v = view(web=(["running", "starting"], 2), jobs=([], 1))
    assert apps_cli.progress_line(v) == "jobs 0/1 running; web 1/2 running (1 starting)"
    assert not apps_cli.settled(v)
    assert apps_cli.settled(view(web=["running", "running"], jobs=(["running"], 1)))
    assert not apps_cli.settled(view(web=(["running", "running", "exited"], 2)))   # an extra one still going
    assert apps_cli.settled(view(web=([], 0)))
    assert apps_cli.progress_line({"roles": {}}) == "no roles"


def test_wait_prints_one_line_per_change_until_settled(monkeypatch):
    seq = [view(web=(["starting"], 2)), view(web=(["starting"], 2)), view(web=(["running", "starting"], 2)),
           view(web=(["running", "running"], 2))]
    answers = iter(seq)
    monkeypatch.setattr(apps_cli, "call", lambda *a, **k: next(answers))
    out, clock = io.StringIO(), iter(range(100))
    assert apps_cli.wait_for_app(Target("u", None), "acme", "shop", 60, out=out, sleep=lambda s: None,
                                 clock=lambda: next(clock))
    lines = out.getvalue().splitlines()
    assert [x.split("] ", 1)[1] for x in lines] == ["web 0/2 running (1 starting)", "web 1/2 running (1 starting)",
                                                   "web 2/2 running"]


def test_wait_gives_up_after_the_timeout(monkeypatch):
    monkeypatch.setattr(apps_cli, "call", lambda *a, **k: view(web=(["unhealthy"], 1)))
    out, clock = io.StringIO(), iter(range(0, 1000, 10))
    assert not apps_cli.wait_for_app(Target("u", None), "acme", "shop", 30, out=out, sleep=lambda s: None,
                                     clock=lambda: next(clock))
    assert "not settled after 30s: web 0/1 running (1 unhealthy)" in out.getvalue()


def test_a_restart_waits_for_every_instance_seen_before(monkeypatch):
    before_view = view(web=["running", "running"])
    before = apps_cli.instance_marks(before_view)
    one_new = json.loads(json.dumps(before_view))
    one_new["roles"]["web"]["instances"][0].update(started=200.0, restarts=1)
    both_new = json.loads(json.dumps(one_new))
    both_new["roles"]["web"]["instances"][1]["id"] = "web-9"
    answers = iter([before_view, one_new, both_new])
    monkeypatch.setattr(apps_cli, "call", lambda *a, **k: next(answers))
    out, clock = io.StringIO(), iter(range(100))
    assert apps_cli.wait_for_app(Target("u", None), "acme", "shop", 60, before=before, out=out,
                                 sleep=lambda s: None, clock=lambda: next(clock))
    assert [x.split("] ", 1)[1] for x in out.getvalue().splitlines()] == [
        "web 2/2 running; 2 instance(s) not restarted yet", "web 2/2 running; 1 instance(s) not restarted yet",
        "web 2/2 running"]


def test_renderings():
    out = apps_cli.render_apps([view(web=["running", "starting"])])
    assert "acme" in out and "shop" in out and "1/2" in out and "/shop" in out
    assert apps_cli.render_apps([]) == "no apps"
    line = apps_cli.render_event({"seq": 4, "time": 1_790_000_000, "type": "exited", "instance": "i-1", "code": 137},
                                 "acme")
    assert line.endswith("acme #4 exited instance=i-1 code=137") and line[:4].isdigit()
    assert apps_cli.render_log({"component": "gateway", "time": 1.0, "line": "GET / 200"}) == "gateway | GET / 200"


def test_following_prints_each_line_once():
    seen = apps_cli.Seen()
    a = {"component": "g", "time": 1.0, "line": "a"}
    b = {"component": "g", "time": 2.0, "line": "b"}
    c = {"component": "w", "time": 2.0, "line": "c"}
    d = {"component": "g", "time": 3.0, "line": "d"}
    assert seen.new([a, b]) == [a, b] and seen.since == 2.0
    assert seen.new([b, c]) == [c]           # asked again from time 2.0: b came back
    assert seen.new([b, c, d]) == [d] and seen.since == 3.0
    assert seen.new([d]) == []


# --- over HTTP, against the real logs blueprint ----------------------------------------------------
@pytest.fixture
def logs_server(tmp_path):
    from werkzeug.serving import make_server
    settings = dataclasses.replace(load(), state_dir=str(tmp_path / "state"), cluster="tcli")
    lay = logs_api.Layout(settings)
    lay.platform.mkdir(parents=True)
    now = time.time()
    stamp = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + ",000"  # noqa: E731
    (lay.platform / "gateway.log").write_text(f"{stamp(now - 60)} gateway INFO GET /a rid=r-1\n"
                                              f"{stamp(now - 30)} gateway INFO GET /b rid=r-2\n")
    app = base_app("orchestrator")
    logs_api.register(app, settings, identity)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(5)


def test_stratus_logs_over_http(logs_server, capsys):
    assert cli.main(["logs", "--url", logs_server]) == 0
    both = capsys.readouterr().out.splitlines()
    assert len(both) == 2 and both[0].startswith("gateway | ") and both[1].endswith("GET /b rid=r-2")
    assert cli.main(["logs", "gateway", "--grep", "r-1", "--url", logs_server]) == 0
    assert capsys.readouterr().out.splitlines() == both[:1]
    assert cli.main(["logs", "--since", "45s", "--url", logs_server]) == 0
    assert capsys.readouterr().out.splitlines() == both[1:]


def test_an_error_answer_prints_its_json_and_exits_1(logs_server, capsys):
    assert cli.main(["logs", "nope", "--url", logs_server]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("stratus logs (404): ")
    assert json.loads(err.split(": ", 1)[1]) == {"error": "no such component: 'nope'"}
    assert cli.main(["apps", "acme", "--url", "http://127.0.0.1:1"]) == 1
    assert "cannot reach" in json.loads(capsys.readouterr().err.split(": ", 1)[1])["error"]


def test_stratus_logs_follow_prints_new_lines_once(logs_server, tmp_path, capsys):
    path = tmp_path / "state" / "logs" / "gateway.log"
    added = iter([" gateway INFO GET /c rid=r-3", None, " gateway INFO GET /d rid=r-4"])

    def between_polls(seconds):
        assert seconds == apps_cli.FOLLOW_POLL
        text = next(added)
        if text:
            with open(path, "a") as f:
                f.write(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime()) + ",999" + text + "\n")

    a = apps_cli.parse("logs", ["--follow", "--url", logs_server])
    assert apps_cli.logs(a, apps_cli.target(a.url, None), polls=4, sleep=between_polls) == 0
    out = [x.rsplit(" ", 1)[1] for x in capsys.readouterr().out.splitlines()]
    assert out == ["rid=r-1", "rid=r-2", "rid=r-3", "rid=r-4"]
