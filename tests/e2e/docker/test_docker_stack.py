"""The whole stack from compose/: one `docker-compose up -d`, then the
RideShare grader sequence, crash/slave, the failover demo and the
autoscaling demo against it. A short scaling window (8 s) and at most 3
slaves keep the autoscaling demo quick and the container count small."""
import threading
import time

import pytest
from dockerkit import Http, Stack, grader_sequence, run, toystore_smoke, wait_for

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(900)]

WINDOW = 8


@pytest.fixture(scope="module")
def stack():
    s = Stack("all", scale_window=WINDOW, max_slaves=3)
    try:
        s.up("compose", timeout=400)
        s.wait_gateway()
        s.wait_rideshare()
        yield s
    finally:
        print(f"logs of {s.id}: {s.save_logs()}")
        left = s.teardown()
        assert not left, f"`docker-compose down -v` left these behind: {left}"


def leader(stack) -> str | None:
    return stack.cluster().get("leader")


def ready_slaves(stack) -> list[dict]:
    c = stack.cluster()
    return [w for w in c["workers"] if w["id"] != c.get("leader") and w.get("ready") and w["role"] == "slave"]


def test_grader_sequence_through_the_gateway(stack):
    grader_sequence(stack.gateway, "all")
    # Only the gateway and the orchestrator are published, on loopback.
    ports = run(["docker", "ps", "--filter", f"label=com.docker.compose.project={stack.project('compose')}",
                 "--format", "{{.Names}} {{.Ports}}"]).stdout
    published = [line for line in ports.splitlines() if "->" in line]
    assert len(published) == 2, ports
    assert all("127.0.0.1:" in line for line in published), ports
    # Workers are containers of this cluster, labelled, and they are the cluster's members.
    containers = stack.running_workers()
    members = {w["id"] for w in stack.cluster()["workers"]}
    assert containers and {c["worker_id"] for c in containers} == members


def test_toystore_through_the_gateway(stack):
    wait_for(lambda: stack.gateway.get("/products/Tux")[0] == 200, 60, what="the catalog behind the gateway")
    toystore_smoke(stack.gateway)


def test_admin_routes_need_a_token(stack):
    status, _ = stack.gateway.post("/api/v1/crash/slave")
    assert status == 401
    admin = Http(stack.gateway.base, token=stack.admin_token())

    def same_pids():  # the worker list is the containers' host pids (bounded: scaling may be moving)
        status, pids = admin.get("/api/v1/worker/list")
        assert status == 200, pids
        return pids == sorted(c["pid"] for c in stack.running_workers())
    wait_for(same_pids, 30, what="/api/v1/worker/list to match the worker containers' pids")


def test_crash_slave_replaces_the_container_with_the_highest_pid(stack):
    admin = Http(stack.gateway.base, token=stack.admin_token())
    wait_for(lambda: ready_slaves(stack), 60, what="a ready slave")
    master = leader(stack)
    before = stack.running_workers()
    slaves = [c for c in before if c["worker_id"] != master]
    victim = max(slaves, key=lambda c: c["pid"])
    status, body = admin.post("/api/v1/crash/slave")
    assert status == 200, body
    assert isinstance(body, list) and len(body) == 1, body
    # Whichever slave it killed, its container stops and a new one replaces it.
    before_ids = {c["worker_id"] for c in before}
    wait_for(lambda: len([c for c in stack.running_workers() if c["worker_id"] in before_ids]) == len(before) - 1,
             30, what="one slave container to stop")
    gone = before_ids - {c["worker_id"] for c in stack.running_workers()}
    wait_for(lambda: any(c["worker_id"] not in before_ids for c in stack.running_workers()), 60,
             what="a replacement worker container")
    assert leader(stack) == master and master not in gone
    # The pid reported is the container's main pid on the host (State.Pid), not
    # the 1 the worker sees inside its own pid namespace.
    assert body == [str(victim["pid"])], (body, slaves)
    assert gone == {victim["worker_id"]}


def test_failover_when_the_master_container_is_killed(stack):
    wait_for(lambda: ready_slaves(stack), 90, what="a ready slave")
    old = leader(stack)
    before = stack.running_workers()
    victim = next(c for c in before if c["worker_id"] == old)
    acked: list[str] = []
    after_failover = threading.Event()
    acked_after: list[str] = []
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            name = f"fo{i}"
            i += 1
            try:
                status, _ = stack.gateway.put("/api/v1/users", {"username": name, "password": "a" * 40})
            except Exception:
                status = None
            if status == 201:
                acked.append(name)
                if after_failover.is_set():
                    acked_after.append(name)
            time.sleep(0.02)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        wait_for(lambda: len(acked) >= 20, 60, what="20 acknowledged writes before the kill")
        killed_at = time.monotonic()
        run(["docker", "kill", victim["name"]])
        new = wait_for(lambda: (lambda l: l if l and l != old else None)(leader(stack)), 60, interval=0.1,
                       what="a new master")
        print(f"failover: {old} killed, {new} master after {time.monotonic() - killed_at:.1f} s")
        after_failover.set()
        wait_for(lambda: len(acked_after) >= 20, 60, what="20 writes acknowledged by the new master")
    finally:
        stop.set()
        t.join(30)
    assert new != old
    want = set(acked)

    def all_there():
        status, users = stack.gateway.get("/api/v1/users")
        return status == 200 and want <= set(users)
    wait_for(all_there, 30, what=f"all {len(want)} acknowledged users to be readable")
    # docker ps shows a replacement worker, and the dead master's container is gone.
    before_ids = {c["worker_id"] for c in before}
    wait_for(lambda: any(c["worker_id"] not in before_ids for c in stack.running_workers()), 60,
             what="a replacement worker container")
    wait_for(lambda: victim["id"] not in {c["id"] for c in stack.worker_containers(all_=True)}, 30,
             what="the dead master's container to be removed")


def test_a_restarted_orchestrator_adopts_the_running_worker_containers(stack):
    wait_for(lambda: ready_slaves(stack), 90, what="a ready slave")
    master = leader(stack)
    before = {c["worker_id"]: c["id"] for c in stack.running_workers()}
    orch = run(["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={stack.project('compose')}",
                "--filter", "label=com.docker.compose.service=orchestrator"]).stdout.split()
    assert len(orch) == 1, orch
    run(["docker", "kill", orch[0]])  # a crash: no chance to clean up
    assert {c["worker_id"] for c in stack.running_workers()} == set(before)  # the workers outlive it
    stack.compose("compose", "up", "-d", "orchestrator")
    wait_for(lambda: stack.cluster()["orchestrator"]["leading"], 90, what="the orchestrator to lead again")
    # It took over the same containers: the master kept its container and its role.
    assert leader(stack) == master
    running = {c["worker_id"]: c["id"] for c in stack.running_workers()}
    assert running.get(master) == before[master]
    kept = [w for w in before if running.get(w) == before[w]]
    assert len(kept) >= min(len(before), 2), (before, running)
    logs = run(["docker", "logs", orch[0]], check=False)
    assert "adopted" in logs.stdout + logs.stderr
    grader_sequence(stack.gateway, "adopt")


def test_autoscaling_grows_then_shrinks(stack):
    wait_for(lambda: len(ready_slaves(stack)) >= 1, 90, what="a ready slave")
    start = len(stack.running_workers())
    stop = threading.Event()
    peak = [start]

    def reader():
        while not stop.is_set():
            try:
                stack.gateway.get("/api/v1/rides?source=3&destination=4")
            except Exception:
                pass
            time.sleep(0.05)

    threads = [threading.Thread(target=reader, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        def grown():
            n = len(stack.running_workers())
            peak[0] = max(peak[0], n)
            return n >= 3  # master + at least 2 slaves
        wait_for(grown, 6 * WINDOW + 60, interval=1, what="the worker containers to grow under load")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert peak[0] >= 3
    # No reads now: after the next windows the cluster returns to one slave.
    wait_for(lambda: len(stack.running_workers()) == 2, 6 * WINDOW + 60, interval=1,
             what="the worker containers to shrink back to master + 1 slave")
    assert stack.cluster()["slave_target"] == 1
