"""A whole fault-injection run (python -m stratus.chaos) with a short
schedule: every fault once, on the servers the settings name (private ones by
default: STRATUS_BROKER_NODES, STRATUS_ZK_NODES, STRATUS_CHAOS_SERVICES).
The chaos stage of `make test` runs it (tests/chaos/conftest.py).

What it holds the platform to, under every fault: no acknowledged write
lost, none written twice, nothing read that was never written, no stale read
(a register read carries its write's LSN as the db route's min_lsn), and
writes acknowledged again after each fault."""
from __future__ import annotations

import json
import os

import pytest

from stratus.chaos import schedule
from stratus.chaos.__main__ import main

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]


def test_short_schedule_every_fault_once(tmp_path):
    out = tmp_path / "report.json"
    seed = os.environ.get("STRATUS_CHAOS_SEED") or "17"
    rc = main(["--seconds", "0", "--seed", seed, "--lsn-via", "header", "--json", str(out), "--quiet", "2"])
    assert rc == 0, "the chaos run could not be carried out (see its output)"
    data = json.loads(out.read_text())
    played = [e["name"] for e in data["events"]]
    expected = set(schedule.FAULT_NAMES)
    if data["broker_nodes"] < 2:
        expected.discard("kill-stream-leader")   # one node: kill-broker is that node's restart
    assert set(played) == expected, f"faults not played: {expected - set(played)}"
    rows = {r["fault"]: r for r in data["report"]["rows"]}
    total = data["report"]["total"]
    assert total["acked"] > 500, "the workloads hardly ran"
    assert total["reads"] > 200
    problems = {name: {k: r[k] for k in ("lost", "unexpected", "duplicated", "stale") if r[k]}
                for name, r in rows.items() if any(r[k] for k in ("lost", "unexpected", "duplicated", "stale"))}
    assert not problems, f"anomalies by fault: {problems}; lost keys {data['report']['lost_keys'][:10]}"
    never = [name for name, r in rows.items() if r["never_recovered"]]
    assert not never, f"writes were never acknowledged again after: {never}"
    assert data["recovered_after_last_heal"]
