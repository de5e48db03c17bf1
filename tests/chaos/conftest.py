"""The chaos suite's tests. The unit tests (proxy, checker, schedule) run in
the main suite; a whole fault-injection run (test_chaos_run.py, marked
`chaos`) runs only in the chaos stage of `make test` (STRATUS_CHAOS_STAGE=1,
set by the Makefile) or when asked for by name, so the main suite does not
play it a second time."""
from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "chaos: a fault-injection run (the chaos stage of make test)")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("STRATUS_CHAOS_STAGE"):
        return
    asked = "chaos" in (config.getoption("markexpr") or "").replace("not chaos", "")
    named = any("test_chaos_run" in a for a in config.args)
    if asked or named:
        return
    skip = pytest.mark.skip(reason="a whole chaos run: the chaos stage of make test runs it (STRATUS_CHAOS_STAGE=1)")
    for item in items:
        if item.get_closest_marker("chaos"):
            item.add_marker(skip)
