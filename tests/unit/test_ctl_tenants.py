"""`stratus tenant`: argument parsing and the list's rendering (pure logic;
the commands against a real orchestrator are in tests/integration/test_tenants_api.py)."""
from __future__ import annotations

import pytest

from stratus import ctl


def test_tenant_list_table():
    out = ctl.render_tenants([{"name": "acme", "apps": 2, "instances": 5, "storage_bytes": 3 * 1024 * 1024},
                              {"name": "beta", "apps": 0, "instances": 0, "storage_bytes": 0}])
    lines = out.splitlines()
    assert "Tenant" in lines[1] and "Storage" in lines[1]
    assert "acme" in out and "3.0 MiB" in out and "0 B" in out
    assert ctl.render_tenants([]) == "no tenants"


@pytest.mark.parametrize("n,text", [(0, "0 B"), (1023, "1023 B"), (2048, "2.0 KiB"), (5 * 1024 ** 3, "5.0 GiB")])
def test_sizes(n, text):
    assert ctl._size(n) == text


@pytest.mark.parametrize("args", [[], ["create"], ["delete"], ["rename", "x"], ["create", "a", "b"]])
def test_bad_arguments_exit_2(args, capsys):
    with pytest.raises(SystemExit) as exc:
        ctl.main("tenant", args)
    assert exc.value.code == 2
    assert "usage: stratus tenant" in capsys.readouterr().err


def test_unreachable_orchestrator(capsys):
    assert ctl.main("tenant", ["list", "--url", "http://127.0.0.1:1"]) == 1
    assert "cannot reach the orchestrator" in capsys.readouterr().err


def test_url_before_the_action(capsys):
    assert ctl.main("tenant", ["--url", "http://127.0.0.1:1", "delete", "acme"]) == 1
    assert "127.0.0.1:1" in capsys.readouterr().err


def test_api_error_prints_the_answers_json():
    import json
    assert json.loads(ctl.ApiError("409: taken", 409, {"error": "taken", "code": "x"}).json()) == \
        {"error": "taken", "code": "x"}
    assert json.loads(ctl.ApiError("cannot reach the orchestrator at http://h:1: refused").json()) == \
        {"error": "cannot reach the orchestrator at http://h:1: refused"}
    assert json.loads(ctl.ApiError("502: Bad Gateway", 502, None).json()) == {"error": "502: Bad Gateway"}
