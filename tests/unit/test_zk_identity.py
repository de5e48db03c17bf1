"""The platform's ZooKeeper identity (bus/zk.py): its secret is generated once
per state dir (0600 in a 0700 directory) and every process agrees on it;
STRATUS_ZK_AUTH overrides it; an app instance never makes or reads the file;
the Docker runtime hands the identity to workers and never to instances."""
import dataclasses
import multiprocessing
import stat

import pytest
from kazoo.security import Permissions

from bus import zk as bzk
from bus.settings import Settings


def _settings(tmp_path, **kw) -> Settings:
    return dataclasses.replace(Settings(), state_dir=str(tmp_path), **kw)


def _secret_in(state_dir: str, q) -> None:
    q.put(bzk.platform_identity(dataclasses.replace(Settings(), state_dir=state_dir)).password)


@pytest.fixture(autouse=True)
def _no_secrets_dir(monkeypatch):
    monkeypatch.delenv("STRATUS_SECRETS_DIR", raising=False)


def test_secret_is_made_once_private_and_reused(tmp_path, monkeypatch):
    monkeypatch.delenv(bzk.AUTH_ENV, raising=False)
    a = bzk.platform_identity(_settings(tmp_path))
    path = tmp_path / "secrets" / "zookeeper"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert a.user == "stratus" and len(a.password) >= 40
    assert bzk.platform_identity(_settings(tmp_path)) == a
    assert [p.name for p in path.parent.iterdir()] == ["zookeeper"]   # no temporary file left
    other = bzk.platform_identity(_settings(tmp_path / "elsewhere"))
    assert other.password != a.password
    monkeypatch.setenv("STRATUS_SECRETS_DIR", str(tmp_path / "shared"))   # the broker accounts' dir: not used
    assert bzk.platform_identity(_settings(tmp_path)) == a


def test_processes_starting_together_agree(tmp_path, monkeypatch):
    monkeypatch.delenv(bzk.AUTH_ENV, raising=False)
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_secret_in, args=(str(tmp_path), q)) for _ in range(8)]
    for p in procs:
        p.start()
    got = [q.get(timeout=20) for _ in procs]
    for p in procs:
        p.join(10)
    assert len(set(got)) == 1
    assert (tmp_path / "secrets" / "zookeeper").read_text().strip() == got[0]


def test_env_override_and_off(tmp_path, monkeypatch):
    monkeypatch.setenv(bzk.AUTH_ENV, "ops:s3cret:with:colons")
    ident = bzk.platform_identity(_settings(tmp_path))
    assert (ident.user, ident.password) == ("ops", "s3cret:with:colons")
    assert not (tmp_path / "secrets").exists()
    [acl] = bzk.default_acl(ident)
    assert acl.perms == Permissions.ALL and acl.id.scheme == "digest" and acl.id.id.startswith("ops:")
    monkeypatch.setenv(bzk.AUTH_ENV, "none")
    assert bzk.platform_identity(_settings(tmp_path)) is None and bzk.default_acl(None) is None
    monkeypatch.setenv(bzk.AUTH_ENV, "no-colon")
    with pytest.raises(ValueError, match="user:password"):
        bzk.platform_identity(_settings(tmp_path))


def test_an_app_instance_never_uses_the_platform_secret(tmp_path, monkeypatch):
    monkeypatch.delenv(bzk.AUTH_ENV, raising=False)
    bzk.platform_identity(_settings(tmp_path))   # the platform's secret exists...
    monkeypatch.setenv("STRATUS_INSTANCE", "i-1")   # ...a process the platform started as an app instance
    assert bzk.client_identity(_settings(tmp_path, tenant="acme")) is None   # ...is anonymous
    assert bzk.client_identity(_settings(tmp_path / "x", tenant="acme")) is None
    assert not (tmp_path / "x").exists()


def test_workers_get_the_identity_instances_do_not(tmp_path, monkeypatch):
    from orchestrator.runtimes.base import Spec, instance_env
    from orchestrator.runtimes.docker import container_instance_env, worker_env
    monkeypatch.setenv(bzk.AUTH_ENV, "stratus:abc")
    environ = {bzk.AUTH_ENV: "stratus:abc", "STRATUS_CLUSTER": "c1"}
    assert worker_env(environ, _settings(tmp_path, cluster="c1"), "w-1")[bzk.AUTH_ENV] == "stratus:abc"
    spec = Spec(id="i-1", argv=("python", "app.py"), env={"STRATUS_TENANT": "acme"}, port=8000)
    assert bzk.AUTH_ENV not in container_instance_env(spec)
    env = instance_env(spec, path="/usr/bin", home=str(tmp_path), pythonpath=None)
    assert bzk.AUTH_ENV not in env and "STRATUS_STATE_DIR" not in env and env["STRATUS_TENANT"] == "acme"
