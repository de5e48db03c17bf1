"""The escape suite (issue 22, Acceptance), on the process runtime: a hostile
tenant app (tests/data/apps/hostile), deployed through the API like any
tenant's app, tries from inside its own instance everything a tenant must
never reach, and reports what it reached:

- the platform's secrets: every file of the state directory and of the
  secrets directory (the broker accounts), token-secret, admin-password,
  dashboard-secret, /etc/shadow, the repository's var/;
- other processes: their environments and command lines, signals (0 and
  SIGCONT only) to the orchestrator and to another tenant's instance;
- another tenant's packages, logs and environment;
- the broker: `guest` and every platform account it can read, the management
  API, the replication log, the other tenant's tasks, a read marked with the
  other tenant's user_id (a private row of that tenant is there to be read);
- ZooKeeper reads and writes;
- the orchestrator's API, the DB workers' metrics, Prometheus, RabbitMQ's
  metrics, the dashboard, and the other tenant's instance port directly;
- a fork bomb, a memory hog, a disk filler and CPU burners, within bounds.

Everything must come back empty, while the other tenant (`victim`, the example
app tests/data/apps/shop) keeps answering 200 through the gateway, and the
platform (orchestrator, gateway, dashboard, DB workers) still runs afterwards;
the hostile instance may have been restarted. The latency check here is loose
(2 shared cores); benchmarks/walls.py measures the "p99 within 2x" figure.

Every target the hostile app is given is checked from outside first (the file
exists, the port listens, the pid runs), so an empty report means a wall held,
never a target that was not there."""
from __future__ import annotations

import json

import pytest

from bus import ops
from kits import escapekit
from kits.escapekit import ATTEMPTS, VICTIM, VICTIM_SECRET, VICTIM_TABLE, escape_platform
from kits.testkit import Client

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    with escape_platform(tmp_path_factory.mktemp("escape")) as p:
        yield p


@pytest.fixture(scope="module")
def attack(platform):
    workers = set(platform.cluster.workers())
    out = escapekit.attack(platform)
    before, during = out["before"], out["during"]
    out["text"] = text = json.dumps(out["report"], indent=1, sort_keys=True)
    print(f"probe: {out['status']} in {out['took']:.1f}s\n{text}")
    print(f"victim p99 before {before.p99() * 1000:.1f} ms ({len(before.samples)} requests), "
          f"during {during.p99() * 1000:.1f} ms ({len(during.samples)} requests, {during.statuses()})")
    out["workers"] = workers
    return out


# --- the tests ----------------------------------------------------------------------------
def test_the_hostile_app_reaches_nothing(attack):
    report, text = attack["report"], attack["text"]
    assert set(report) == ATTEMPTS, f"attempts missing: {sorted(ATTEMPTS - set(report))}; " \
                                    f"unknown: {sorted(set(report) - ATTEMPTS)}\n{text}"
    unproven = {n: r["detail"] for n, r in report.items() if r.get("error")}
    assert not unproven, f"attempts that could not be carried out (no verdict): {unproven}\n{text}"
    reached = {n: r["detail"] for n, r in report.items() if r["reached"] is not False}
    assert not reached, "the hostile app reached:\n" + "\n".join(f"- {n}: {d}" for n, d in sorted(reached.items())) \
        + f"\n\nwhole report:\n{text}"
    assert attack["status"] == 200 or "memory_hog" in report, attack["status"]
    assert attack["took"] < 30, f"the probe took {attack['took']:.1f}s"


def test_the_other_tenant_keeps_serving(attack):
    before, during = attack["before"], attack["during"]
    assert len(before.samples) == 200 and before.statuses() == {200: 200}, before.statuses()
    assert len(during.samples) >= 20, f"only {len(during.samples)} requests during the attack"
    assert during.statuses() == {200: len(during.samples)}, (during.statuses(), during.errors[:5])
    # Loose on 2 shared cores: benchmarks/walls.py holds the "p99 within 2x" figure.
    ratio = during.p99() / before.p99()
    assert during.p99() < max(10 * before.p99(), 0.5), \
        f"victim p99 {before.p99() * 1000:.1f} ms before, {during.p99() * 1000:.1f} ms during ({ratio:.1f}x)"


def test_the_platform_is_fine_afterwards(platform, attack):
    p = platform
    for key in ("orch", "gw", "dashboard"):
        assert p.cluster.procs[key].poll() is None, f"{key} exited with {p.cluster.procs[key].returncode}"
    workers = p.cluster.workers()
    assert attack["workers"] <= set(workers), (attack["workers"], set(workers))
    assert any(w.get("role") == "master" for w in workers.values()), workers
    status, body, _ = p.api("GET", "/api/v1/tenants")
    assert status == 200, body
    assert Client(p.dash, timeout=5).get("/health")[0] == 200
    assert p.gateway("GET", "/shop")[0] == 200
    p.wait_app(VICTIM, "shop", {"web": 2, "jobs": 1})
    # The hostile instance may have been killed and restarted, by the platform alone.
    p.wait_hostile()
    # The victim's private row is still its own, untouched.
    row = p.cluster.client(tenant=VICTIM).read(ops.select(VICTIM_TABLE, [["id", "=", 1]])).result
    assert [r["secret"] for r in row] == [VICTIM_SECRET], row
