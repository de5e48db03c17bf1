"""Fixtures of the Docker stage (scripts/docker-stage.sh builds the images
first). Each stack is torn down with `down -v`; anything of it still there
afterwards (a container, a volume, the network) is removed and fails the test."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dockerkit import Stack, docker_available  # noqa: E402


def pytest_collection_modifyitems(config, items):
    why = None
    for item in items:
        if item.get_closest_marker("docker") is None:
            continue
        if why is None:
            why = docker_available() or ""
        if why:
            item.add_marker(pytest.mark.skip(reason=f"no Docker engine: {why}"))


def _finish(stack: Stack, failed: bool) -> None:
    if failed:
        print(f"logs of {stack.id}: {stack.save_logs()}")
    left = stack.teardown()
    assert not left, f"the stack {stack.id} left these behind after `down -v`: {left}"


@pytest.fixture
def make_stack(request):
    made: list[Stack] = []

    def make(hint: str, **settings) -> Stack:
        s = Stack(hint, **settings)
        made.append(s)
        return s
    yield make
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    errors = []
    for s in made:
        try:
            _finish(s, failed)
        except AssertionError as exc:
            errors.append(str(exc))
    assert not errors, "\n".join(errors)


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)
