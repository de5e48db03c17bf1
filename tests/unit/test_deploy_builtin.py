"""stratus/deploy_builtin.py, the Docker stack's one-shot deploy: where it
finds the sources, that its packages are byte for byte those `stratus up`
deploys from the checkout, and its usage errors. (Its deploy through a real
orchestrator runs in the Docker stage: tests/e2e/docker/test_docker_stack.py.)"""
from __future__ import annotations

import json
import shutil

from stratus import builtin, deploy_builtin


def test_the_sources_come_from_the_option_then_the_setting_then_the_checkout(monkeypatch, tmp_path):
    monkeypatch.delenv(deploy_builtin.SOURCE_ENV, raising=False)
    assert deploy_builtin.source_root() == builtin.ROOT
    monkeypatch.setenv(deploy_builtin.SOURCE_ENV, str(tmp_path))
    assert deploy_builtin.source_root() == tmp_path
    assert deploy_builtin.source_root("/elsewhere").as_posix() == "/elsewhere"


def test_a_copy_of_the_sources_gives_the_same_package_as_the_checkout(tmp_path):
    # What docker-images.sh stages into the deploy image: the directories package.txt lists.
    for tenant in builtin.BUILT_IN:
        manifest, package = builtin.builtin_package(tenant)
        dirs = [ln.strip() for ln in (builtin.ROOT / tenant / "package.txt").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
        assert dirs
        assert tenant in dirs        # the app's own directory: its manifest and schema
        for d in dirs:
            if not (tmp_path / d).exists():
                shutil.copytree(builtin.ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        m2, p2 = deploy_builtin.package(tmp_path, tenant)
        assert m2 == manifest and p2 == package


def test_missing_sources_are_a_usage_error(tmp_path, capsys):
    assert deploy_builtin.main(["--source", str(tmp_path)]) == 2
    assert "rideshare/manifest.json" in capsys.readouterr().err


def test_a_broken_manifest_is_a_deploy_error(tmp_path):
    d = tmp_path / "rideshare"
    d.mkdir(parents=True)
    (d / "manifest.json").write_text("{not json")
    (d / "package.txt").write_text("users\n")
    try:
        deploy_builtin.package(tmp_path, "rideshare")
    except builtin.DeployError as exc:
        assert "manifest.json" in str(exc)
    else:
        raise AssertionError("a broken manifest was packaged")
    (d / "manifest.json").write_text(json.dumps({"roles": {}}))
    try:
        deploy_builtin.package(tmp_path, "rideshare")   # users/ is not there
    except builtin.DeployError as exc:
        assert "users" in str(exc)
    else:
        raise AssertionError("a package of a missing directory was made")
