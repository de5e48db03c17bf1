"""`stratus load rides` against the real rides service and the real
orchestrator (which runs the workers): one line per second with reads,
errors, latency and the number of slaves; "?" when the orchestrator does not
answer. The reads it sends are the ones the orchestrator's scaling rule counts."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request

import requests

from harness import ROOT, free_port, wait_for

LINE = re.compile(r"^\[\s*(\d+)s\] reads\s+(\d+)\s+errors\s+(\d+)\s+p50\s+(\S+)\s+p95\s+(\S+)\s+slaves (\S+)$")


def get_json(url: str):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return json.loads(r.read())
    except OSError:
        return None


def start_rides(cluster) -> str:
    port = free_port()
    cluster.spawn("rides", ["-m", "rides"], STRATUS_RIDES_PORT=port)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _status(url + "/api/v1/rides/count") == 200, 30, what="rides service with its tables")
    return url


def _status(url: str):
    try:
        return requests.get(url, timeout=2).status_code
    except requests.RequestException:
        return None


def run_load(cluster, *args, timeout: float = 60) -> tuple[int, list[tuple], str]:
    p = subprocess.run([sys.executable, "-m", "stratus.cli", "load", "rides", *args], cwd=ROOT, env=cluster.env,
                       capture_output=True, text=True, timeout=timeout)
    lines = [m.groups() for m in map(LINE.match, p.stdout.splitlines()) if m]
    return p.returncode, lines, p.stdout + p.stderr


def test_load_rides_reports_each_second_with_slaves(cluster):
    orch_port = free_port()
    orch = f"http://127.0.0.1:{orch_port}"
    cluster.spawn("orch", ["-m", "orchestrator"], STRATUS_ORCHESTRATOR_PORT=orch_port)

    def healthy():
        v = get_json(orch + "/api/v1/cluster")
        return v and sum(1 for w in v["workers"] if w["role"] == "slave" and w["ready"]) >= 1 and v
    wait_for(healthy, 60, 0.2, what="the orchestrator's master and a ready slave")
    rides = start_rides(cluster)
    before = get_json(orch + "/api/v1/cluster")["reads_in_window"]

    rc, lines, out = run_load(cluster, "--rate", "20", "--duration", "3", "--url", rides, "--orchestrator", orch,
                              "--seed", "1")
    assert rc == 0, out
    assert 3 <= len(lines) <= 4, out
    sent = sum(int(x[1]) for x in lines)
    assert 55 <= sent <= 61, out                       # 20 per second for 3 seconds
    assert all(x[2] == "0" for x in lines), out        # no errors
    assert all(x[3].endswith("ms") and x[4].endswith("ms") for x in lines), out
    slaves = get_json(orch + "/api/v1/worker/list")
    assert all(x[5] == str(len(slaves) - 1) for x in lines[1:]), (out, slaves)
    assert f"total: {sent} reads, 0 errors" in out
    # every list read entered the bus, where the orchestrator counts reads for scaling
    wait_for(lambda: get_json(orch + "/api/v1/cluster")["reads_in_window"] - before >= sent, 10,
             what="the orchestrator to count the reads")


def test_load_rides_without_orchestrator_prints_question_mark(cluster):
    cluster.bootstrap(slaves=1)
    rides = start_rides(cluster)
    dead = f"http://127.0.0.1:{free_port()}"
    rc, lines, out = run_load(cluster, "--rate", "10", "--duration", "2", "--url", rides, "--orchestrator", dead)
    assert rc == 0, out
    assert len(lines) >= 2 and all(x[5] == "?" for x in lines), out
    assert sum(int(x[1]) for x in lines) >= 18 and all(x[2] == "0" for x in lines), out


def test_load_rides_counts_errors_and_fails_when_nothing_answers(cluster):
    dead = f"http://127.0.0.1:{free_port()}"
    rc, lines, out = run_load(cluster, "--rate", "5", "--duration", "1", "--url", dead, "--orchestrator", dead)
    assert rc == 1, out
    assert lines and sum(int(x[2]) for x in lines) == sum(int(x[1]) for x in lines) >= 4, out
    rc, _, out = run_load(cluster, "--rate", "-1")
    assert rc == 2 and "--rate" in out
