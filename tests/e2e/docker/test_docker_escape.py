"""The escape suite in the Docker stage (issue 22): the hostile app
(tests/data/apps/hostile), deployed through the orchestrator's API as tenant
`mallory`, tries from inside its own instance container to reach the
platform and another tenant (the built-in toystore), and must reach nothing;
the limits hold. The attempts are the hostile app's own code, run in its
running container (`docker exec`: the same uid, capabilities, no_new_privs,
network namespace and cgroup as the instance), once per target address: every
address of every platform container, on every network it is on (the stack's
and the tenant's), so an empty report is a wall, never a name that did not
resolve. A second app of mallory's, whose main process asks for more memory
than its limit, is killed by the kernel and restarted by the platform, with
events; the platform keeps serving (toystore answers) throughout.

The broker has no `guest` (the stack's `secrets` service made the platform's
accounts), ZooKeeper requires the platform's identity, and the instance holds
neither: an AMQP login as guest, ZooKeeper reads and writes, and the platform
accounts' files are tried and must fail too."""
from __future__ import annotations

import json

import pytest
from dockerkit import ADMIN_PASSWORD, Http, run, wait_for  # noqa: F401

from orchestrator.runtimes.limits import Limits
from stratus import builtin

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1500)]

MALLORY = "mallory"
HOSTILE_DIR = __import__("pathlib").Path(__file__).resolve().parents[2] / "data" / "apps" / "hostile"
LIMITS = Limits()          # the compose stack sets none: the defaults
HOG = ("import time\nprint('HOG-START', flush=True)\nchunks = []\n"
       "for i in range(64):\n    b = bytearray(32 << 20)\n    b[::4096] = b'\\x01' * (len(b) // 4096)\n"
       "    chunks.append(b)\n    print('HOG', (i + 1) * 32, flush=True)\ntime.sleep(600)\n")
PROBE = ("import json, sys\nfrom hostile import web\n"
         "print('PROBE-RESULT ' + json.dumps(web.probe(sys.argv[1].split(','))), flush=True)\n")


def inspect(ids: list[str]) -> list[dict]:
    return json.loads(run(["docker", "inspect", *ids]).stdout) if ids else []


def addresses(c: dict) -> list[str]:
    return [n["IPAddress"] for n in (c["NetworkSettings"]["Networks"] or {}).values() if n.get("IPAddress")]


def probe(container: str, attempts: list[str], env: dict[str, str], timeout: float = 120) -> dict:
    args = ["docker", "exec"]
    for k, v in env.items():
        args += ["-e", f"{k}={v}"]
    out = run([*args, container, "python", "-c", PROBE, ",".join(attempts)], timeout=timeout, check=False)
    line = [x for x in out.stdout.splitlines() if x.startswith("PROBE-RESULT ")]
    assert line, f"the probe gave no result ({out.returncode}): {out.stdout[-2000:]} {out.stderr[-2000:]}"
    return json.loads(line[-1][len("PROBE-RESULT "):])


def test_a_hostile_instance_reaches_nothing_and_stays_within_its_limits(make_stack):
    stack = make_stack("esc")
    stack.up("compose", timeout=600)
    stack.wait_gateway(180)
    stack.wait_toystore(300)
    orch = f"http://127.0.0.1:{stack.orchestrator_port}"

    def created():
        status, body = stack.orchestrator.post("/api/v1/tenants", {"name": MALLORY})
        assert status in (201, 503, 504), (status, body)
        return status == 201 or None
    wait_for(created, 90, what="tenant mallory created")
    manifest = json.loads((HOSTILE_DIR / "manifest.json").read_text())
    package = builtin.tarball(builtin.members(HOSTILE_DIR, ["hostile"]))
    builtin.deploy(orch, MALLORY, "hostile", manifest, package)
    wait_for(lambda: stack.instance_containers(tenant=MALLORY, app="hostile")[0]["status"] == "running"
             and run(["docker", "exec", stack.instance_containers(tenant=MALLORY, app="hostile")[0]["id"],
                      "python", "-c", "import hostile.web"], check=False).returncode == 0,
             180, interval=1, what="the hostile instance")
    hostile = inspect([stack.instance_containers(tenant=MALLORY, app="hostile")[0]["id"]])[0]
    cid = hostile["Id"]

    # --- the container itself: the walls as the engine holds them
    hc = hostile["HostConfig"]
    assert hostile["Config"]["User"] not in ("", "0", "root") and int(hostile["Config"]["User"].split(":")[0]) >= 200000
    assert hc["CapDrop"] == ["ALL"] and not hc.get("CapAdd") and not hc["Privileged"]
    assert "no-new-privileges:true" in hc["SecurityOpt"] and hc["ReadonlyRootfs"] is True
    assert hc["Memory"] == hc["MemorySwap"] == LIMITS.memory_mb << 20 and hc["PidsLimit"] == LIMITS.pids
    assert hc["NanoCpus"] == int(LIMITS.cpus * 1e9) and "/tmp" in hc["Tmpfs"]
    nets = hostile["NetworkSettings"]["Networks"]
    assert list(nets) == [f"stratus-{stack.id}-tenant-{MALLORY}"], list(nets)
    tnet = json.loads(run(["docker", "network", "inspect", list(nets)[0]]).stdout)[0]
    assert tnet["Internal"] is True
    members = inspect(list(tnet["Containers"]))
    services = sorted({(m["Config"]["Labels"] or {}).get("com.docker.compose.service")
                       or (m["Config"]["Labels"] or {}).get("stratus.kind") for m in members})
    assert services == ["amqp-relay", "gateway", "instance", "orchestrator", "prometheus"], services
    ids = run(["docker", "exec", cid, "id", "-u"]).stdout.strip()
    assert ids == hostile["Config"]["User"].split(":")[0], ids

    # --- the targets: every platform container's every address
    platform = inspect(run(["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={stack.project('compose')}"]).stdout.split())
    by_service = {m["Config"]["Labels"]["com.docker.compose.service"]: m for m in platform}
    workers = inspect([w["id"] for w in stack.running_workers()])
    victims = inspect([c["id"] for c in stack.instance_containers(tenant="toystore")])
    assert workers and victims and {"rabbitmq", "zookeeper", "orchestrator", "prometheus", "dashboard"} <= set(by_service)
    targets = stack.prometheus_targets()
    worker_ports = sorted({int(t["instance"].rsplit(":", 1)[1]) for t in targets if t["job"] == "worker"}) or [9100]
    victim_ports = sorted({int(t["instance"].rsplit(":", 1)[1]) for t in targets
                           if t["job"] == "app" and t["labels"].get("tenant") == "toystore"}) or [8000]
    zk_hosts = ",".join(f"{ip}:2181" for ip in addresses(by_service["zookeeper"]))
    plans = []   # (what, HOSTILE_HOST, attempts, env)
    for name, attempts in (("orchestrator", ["orchestrator_api"]), ("prometheus", ["prometheus"]),
                           ("rabbitmq", ["management_api", "rabbitmq_prometheus"]),
                           ("amqp-relay", ["management_api", "rabbitmq_prometheus"]),
                           ("dashboard", ["dashboard"]), ("gateway", ["orchestrator_api", "prometheus"])):
        for ip in addresses(by_service[name]):
            plans.append((name, ip, attempts))
    for w in workers:
        for ip in addresses(w):
            plans.append(("worker", ip, ["worker_metrics"]))
    for v in victims:
        for ip in addresses(v):
            plans.append(("toystore", ip, ["other_tenant_instance"]))
    env = {"HOSTILE_ZK_HOSTS": zk_hosts, "HOSTILE_ORCH_PORT": "8081", "HOSTILE_PROMETHEUS_PORT": "9090",
           "HOSTILE_MANAGEMENT_PORTS": "15672", "HOSTILE_RABBIT_PROMETHEUS_PORT": "15692",
           "HOSTILE_DASHBOARD_PORT": "8086", "HOSTILE_METRICS_PORTS": ",".join(map(str, worker_ports)),
           "HOSTILE_VICTIM_PORTS": ",".join(map(str, victim_ports)), "HOSTILE_VICTIM_TENANT": "toystore",
           "HOSTILE_VICTIM_APP": "toystore", "HOSTILE_PIDS_LIMIT": str(LIMITS.pids),
           "HOSTILE_MEMORY_LIMIT_MIB": str(LIMITS.memory_mb), "HOSTILE_DISK_LIMIT_MIB": str(LIMITS.disk_mb),
           "HOSTILE_CPU_LIMIT": str(LIMITS.cpus), "HOSTILE_STATE_DIR": "/var/lib/stratus",
           "HOSTILE_SECRETS_DIR": "/var/lib/stratus/secrets",
           "HOSTILE_ORCH_PID": str(by_service["orchestrator"]["State"]["Pid"]),
           "HOSTILE_PLATFORM_PIDS": ",".join(str(m["State"]["Pid"]) for m in platform + workers),
           "HOSTILE_VICTIM_PIDS": ",".join(str(v["State"]["Pid"]) for v in victims)}
    reached = {}
    for what, ip, attempts in plans:
        res = probe(cid, attempts, {**env, "HOSTILE_HOST": ip})
        for a, r in res.items():
            assert not r.get("error") or "no port given" in r["detail"], (what, ip, a, r)
            if r["reached"]:
                reached[f"{what}@{ip}:{a}"] = r["detail"]
    # The rest, once: ZooKeeper on every address, the broker, files, processes, resources.
    rest = ["zookeeper", "replication_log", "other_tenant_tasks", "impersonated_read", "amqp_guest_login",
            "amqp_platform_accounts", "secrets_dir_files",
            "state_dir_files", "token_secret", "admin_password", "dashboard_secret", "etc_shadow",
            "proc_environ_of_others", "other_processes_visible", "signal_orchestrator", "signal_other_tenant",
            "write_cwd", "write_state_dir", "fork_bomb",
            "disk_scratch", "cpu_burners", "memory_hog"]
    res = probe(cid, rest, {**env, "HOSTILE_HOST": addresses(by_service["orchestrator"])[0]}, timeout=180)
    print("the hostile instance's report:", json.dumps(res, indent=1)[:6000])
    for a, r in res.items():
        assert not r.get("error"), (a, r)
        if r["reached"]:
            reached[a] = r["detail"]
    assert res["fork_bomb"]["processes"] < LIMITS.pids
    assert res["disk_scratch"]["mib"] <= LIMITS.disk_mb and res["memory_hog"]["mib"] <= LIMITS.memory_mb
    assert "Read-only file system" in res["write_cwd"]["detail"], res["write_cwd"]
    assert not reached, f"the hostile instance reached: {json.dumps(reached, indent=1)}"
    # The broker was there to be tried: reached through the relay, guest refused.
    assert "guest refused" in res["amqp_guest_login"]["detail"], res["amqp_guest_login"]
    # ZooKeeper really requires the platform's identity: the platform's containers share it.
    zk = run(["docker", "exec", by_service["orchestrator"]["Id"], "python", "-c",
              "from bus import zk; from bus.settings import load; i = zk.platform_identity(load()); "
              "print('on' if i else 'off')"]).stdout.strip()
    assert zk == "on", zk
    assert "STRATUS_ZK_AUTH" not in json.dumps(hostile["Config"]["Env"])
    assert not any(e.startswith("STRATUS_AMQP_URL=") and "stratus-" in e for e in hostile["Config"]["Env"])

    # --- a main process past its memory limit: killed, restarted, with events; the platform stays
    hog = {"roles": {"hog": {"kind": "worker", "command": ["python", "-c", HOG], "instances": 1}}}
    builtin.deploy(orch, MALLORY, "hog", hog, builtin.tarball(builtin.members(HOSTILE_DIR, ["hostile"])))

    def oom_events():
        status, body = stack.orchestrator.get(f"/api/v1/tenants/{MALLORY}/events?since=0")
        assert status == 200, (status, body)
        ev = [e for e in body["events"] if e.get("app") == "hog"]
        exited = [e for e in ev if e["type"] == "exited" and e.get("code") == 137]
        restarted = [e for e in ev if e["type"] == "restarted"]
        return (exited, restarted) if exited and restarted else None
    exited, restarted = wait_for(oom_events, 120, interval=1, what="the hog killed (137) and restarted, with events")
    print("hog events:", exited[:2], restarted[:2])
    status, body = stack.orchestrator.get("/api/v1/cluster")
    assert status == 200, (status, body)
    assert stack.gateway.get("/products/Tux")[0] == 200
    for svc in ("orchestrator", "gateway", "rabbitmq", "zookeeper", "prometheus", "amqp-relay"):
        c = inspect([by_service[svc]["Id"]])[0]
        assert c["State"]["Status"] == "running" and c["RestartCount"] == 0, (svc, c["State"])
