"""python -m stratus.chaos: a fault-injection run in the manner of Jepsen.

  python -m stratus.chaos [--seconds N] [--seed S] [--broker-nodes N] [--zk-nodes N]
                          [--services private|shared] [--faults a,b,...] [--lsn-via header|body|both]
                          [--record] [--json PATH] [--strict] [--keep]

What it does:
  1. Servers: with --services private (the default) its own RabbitMQ node(s)
     and ZooKeeper server(s) (stratus/chaos/services.py), so that killing them
     disturbs no one else; --services shared uses those scripts/services.sh
     runs (STRATUS_AMQP_URL, STRATUS_ZK_HOSTS).
  2. A TCP proxy (stratus/chaos/proxy.py) on every link: one per broker node
     for the orchestrators and the DB workers they start (workers inherit the
     orchestrator's environment), one per broker node for the gateway (the
     service -> broker link), one per ZooKeeper server for everyone. The test
     cluster (tests/harness.py LocalCluster, its own STRATUS_CLUSTER) runs
     with STRATUS_AMQP_URL and STRATUS_ZK_HOSTS naming the proxies; faults
     that concern one process (the master, the leading orchestrator) name its
     pid on the shared proxies.
  3. Two orchestrators (tests/kits/testkit.py real_orchestrator and a
     standby), which start a master and its slaves; a gateway (start_gateway).
  4. The set and register workloads (stratus/chaos/workloads.py) through the
     gateway's admin db routes, for the tenant rideshare, while the schedule
     (stratus/chaos/schedule.py) plays: every fault once, then random ones
     while --seconds (STRATUS_CHAOS_SECONDS; 0: each fault once) allow.
  5. Everything healed, the workloads stopped, the set table read whole; the
     checker (stratus/chaos/checker.py) prints a table per fault type.
     --json writes the report, the events and the settings; --record appends
     the table, dated, with the machine, to docs/reliability.md.

Exit status: 0 when the run completed; with --strict, 1 when anything was
lost, duplicated, unexpected or read stale; 2 when the run itself could not
be carried out (servers or the cluster did not start).
Settings: STRATUS_CHAOS_SECONDS, STRATUS_CHAOS_SEED, STRATUS_CHAOS_SERVICES,
STRATUS_BROKER_NODES, STRATUS_ZK_NODES (the defaults of the options)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))   # the LocalCluster harness and the test kits

from bus import zk as bzk   # noqa: E402
from bus.cluster import Role, read_leader, workers   # noqa: E402
from bus.ports import free_port   # noqa: E402
from bus.settings import env_int, env_str   # noqa: E402

from . import checker, schedule   # noqa: E402
from .proxy import ProxyHub   # noqa: E402
from .schedule import NotNow   # noqa: E402
from .services import ServiceError, make_services   # noqa: E402
from .workloads import Gateway, RegisterWorkload, SetWorkload   # noqa: E402

TENANT = "rideshare"
BASELINE = 5.0     # seconds of workload before the first fault


class Target:
    """What faults act on (stratus/chaos/schedule.py)."""

    def __init__(self, cluster, services, broker_proxies, zk_proxies, service_proxies, set_wl, clock):
        self.cluster, self.services = cluster, services
        self.broker_proxies, self.zk_proxies, self.service_proxies = broker_proxies, zk_proxies, service_proxies
        self.set_wl, self.clock = set_wl, clock
        self.paused: set[int] = set()

    def master(self) -> tuple[str, int]:
        leader, _ = read_leader(self.cluster.zk, self.cluster.paths)
        m = workers(self.cluster.zk, self.cluster.paths).get(leader.id or "")
        if m is None or m.role is not Role.MASTER or not m.pid:
            raise NotNow("no master at the moment")
        return m.id, m.pid

    def slaves(self) -> list[tuple[str, int]]:
        leader, _ = read_leader(self.cluster.zk, self.cluster.paths)
        return [(w.id, w.pid) for w in workers(self.cluster.zk, self.cluster.paths).values()
                if w.id != leader.id and w.role is Role.SLAVE and w.pid]

    def leading_orchestrator(self) -> tuple[str, int]:
        regs = bzk.children_json(self.cluster.zk, self.cluster.paths.service("orchestrator"))
        for data in regs.values():
            ident = str(data.get("id", ""))
            try:
                pid = int(ident.rsplit(":", 1)[1])
                pgid = os.getpgid(pid)
            except (IndexError, ValueError, ProcessLookupError):
                continue
            for key, p in self.cluster.procs.items():
                if key.startswith("orch") and p.pid == pgid and p.poll() is None:
                    return key, pid
        raise NotNow("no leading orchestrator registered")

    def start_orchestrator(self, key: str) -> None:
        self.cluster.spawn(key, ["-m", "orchestrator"], STRATUS_ORCHESTRATOR_PORT=str(free_port()))

    def wait_writes_after(self, t: float, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for k in reversed(self.set_wl.snapshot()[-400:]):
                if k.invoke >= t and k.acked is not None:
                    return True
            time.sleep(0.1)
        return False


def _args(argv):
    ap = argparse.ArgumentParser(prog="python -m stratus.chaos", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=float(env_str("STRATUS_CHAOS_SECONDS", "0")),
                    help="length of the schedule (0: each fault once)")
    ap.add_argument("--seed", type=int, default=env_int("STRATUS_CHAOS_SEED", 0) or None)
    ap.add_argument("--broker-nodes", type=int, default=env_int("STRATUS_BROKER_NODES", 1))
    ap.add_argument("--zk-nodes", type=int, default=env_int("STRATUS_ZK_NODES", 1))
    ap.add_argument("--services", choices=("private", "shared"), default=env_str("STRATUS_CHAOS_SERVICES", "private"))
    ap.add_argument("--faults", default="", help="comma-separated fault names (default: every applicable one)")
    ap.add_argument("--lsn-via", choices=("header", "body", "both"), default="header",
                    help="how the register workload's reads carry their write's LSN")
    ap.add_argument("--set-interval", type=float, default=0.05, help="seconds between set inserts")
    ap.add_argument("--register-clients", type=int, default=4)
    ap.add_argument("--quiet", type=float, default=3.0, help="seconds between a recovery and the next fault")
    ap.add_argument("--record", action="store_true", help="append the results to docs/reliability.md")
    ap.add_argument("--json", help="write the report, events and settings here")
    ap.add_argument("--strict", action="store_true", help="exit 1 when anything was lost, doubled, unexpected or stale")
    ap.add_argument("--keep", action="store_true", help="keep the run's directory (logs, databases)")
    ap.add_argument("--dir", help="the run's directory (default: a new one under the system's temp dir)")
    a = ap.parse_args(argv)
    if a.seed is None:
        a.seed = secrets.randbelow(1_000_000)
    known = set(schedule.FAULT_NAMES)
    a.fault_list = [f.strip() for f in a.faults.split(",") if f.strip()]
    bad = [f for f in a.fault_list if f not in known]
    if bad:
        ap.error(f"unknown fault(s) {', '.join(bad)}; known: {', '.join(schedule.FAULT_NAMES)}")
    return a


def say(msg: str) -> None:
    print(msg, flush=True)


def run(a) -> tuple[checker.Report, dict]:
    from harness import LocalCluster
    from kits.testkit import real_orchestrator, start_gateway, wait_until

    base = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="stratus-chaos-"))
    base.mkdir(parents=True, exist_ok=True)
    stack = contextlib.ExitStack()
    info: dict = {"seed": a.seed, "seconds": a.seconds, "services": a.services, "dir": str(base),
                  "broker_nodes": a.broker_nodes, "zk_nodes": a.zk_nodes, "lsn_via": a.lsn_via}
    t_setup = time.monotonic()
    try:
        say(f"chaos: seed {a.seed}; starting {a.services} services ({a.broker_nodes} broker node(s), "
            f"{a.zk_nodes} ZooKeeper server(s)) in {base}")
        services = make_services(a.services, base / "services", brokers=a.broker_nodes, zks=a.zk_nodes)
        stack.callback(services.close)
        info["broker_nodes"], info["zk_nodes"] = len(services.brokers), len(services.zks)
        hub = ProxyHub()
        stack.callback(hub.close)
        broker_proxies = [hub.add(f"broker{i + 1}", (b.host, b.port)) for i, b in enumerate(services.brokers)]
        service_proxies = [hub.add(f"gateway-broker{i + 1}", (b.host, b.port)) for i, b in enumerate(services.brokers)]
        zk_proxies = [hub.add(f"zk{i + 1}", (z.host, z.port)) for i, z in enumerate(services.zks)]
        amqp = ",".join(services.amqp_url(p.host, p.port) for p in broker_proxies)
        gw_amqp = ",".join(services.amqp_url(p.host, p.port) for p in service_proxies)
        zk_hosts = ",".join(p.address for p in zk_proxies)

        cluster = LocalCluster(base / "cluster", amqp_url=services.direct_amqp_url(),
                               zk_hosts=services.direct_zk_hosts(), max_slaves=2, reads_per_slave=1,
                               scale_window=10, broker_nodes=len(services.brokers), zk_nodes=len(services.zks))
        stack.callback(cluster.close)
        if len(services.brokers) > 1:
            _check_node_list(cluster.settings)
        password = secrets.token_urlsafe(16)
        cluster.env.update({"STRATUS_AMQP_URL": amqp, "STRATUS_ZK_HOSTS": zk_hosts,
                            "STRATUS_ADMIN_PASSWORD": password})
        if a.services == "private":   # no management API on the private nodes: never touch the shared one's
            cluster.env["STRATUS_AMQP_MANAGEMENT_URL"] = "http://127.0.0.1:9"
        stack.enter_context(real_orchestrator(cluster))
        stack.callback(_stop_orchestrators, cluster)   # runs first: the orchestrators stop their workers
        Target(cluster, services, [], [], [], None, None).start_orchestrator("orch2")   # the standby
        target_probe = Target(cluster, services, [], [], [], None, None)
        wait_until(lambda: _ready(target_probe), 90, what="a master and a ready slave")
        gw_port = start_gateway(cluster, STRATUS_AMQP_URL=gw_amqp)
        gw = Gateway(gw_port, password, TENANT)
        gw.setup()
        say(f"chaos: cluster {cluster.name} up in {time.monotonic() - t_setup:.0f}s (gateway :{gw_port}); "
            f"proxies: {', '.join(repr(p) for p in hub.proxies.values())}")

        t0 = time.monotonic()

        def clock() -> float:
            return time.monotonic() - t0
        set_wl = SetWorkload(gw, clock, interval=a.set_interval).start()
        reg_wl = RegisterWorkload(gw, clock, clients=a.register_clients, lsn_via=a.lsn_via, seed=a.seed).start()
        stack.callback(reg_wl.stop.set)   # whatever happens, no client goes on knocking
        stack.callback(set_wl.stop.set)
        target = Target(cluster, services, broker_proxies, zk_proxies, service_proxies, set_wl, clock)
        stack.callback(_resume, target)
        time.sleep(BASELINE)

        faults = [f for f in schedule.catalog(cluster.settings.zk_timeout) if f.applies(target)]
        if a.fault_list:
            faults = [f for f in faults if f.name in a.fault_list]
        order = schedule.plan(faults, a.seed, a.seconds)
        deadline = a.seconds if a.seconds > 0 else None
        say(f"chaos: {len(order)} faults planned: {', '.join(f.name for f in order)}")
        events = schedule.play(target, order, seed=a.seed, clock=clock, deadline=deadline, quiet=a.quiet,
                               log=say)

        # Heal everything, bring every server back, let writes flow, stop.
        hub.heal_all()
        for n in services.brokers + services.zks:
            if not n.alive():
                services.bring_back(n)
        _resume(target)
        end_faults = clock()
        recovered = target.wait_writes_after(end_faults, 60)
        time.sleep(2.0)
        set_wl.close()
        reg_wl.close()
        say(f"chaos: workloads stopped at {clock():.1f}s (writes {'flowing' if recovered else 'NOT acknowledged'} "
            "after the last heal); reading the set")
        keys = set_wl.snapshot()
        final = set_wl.final_read()
        reads, writes = reg_wl.snapshot()
        report = checker.check(events, keys, final, reads, writes)
        info.update({"events": [e.as_dict() for e in events], "final_rows": len(final),
                     "set_skipped": set_wl.skipped, "duration": round(clock(), 1),
                     "recovered_after_last_heal": recovered, "cluster": cluster.name})
        return report, info
    finally:
        stack.close()
        if not a.keep and not a.dir:
            shutil.rmtree(base, ignore_errors=True)


def _check_node_list(settings, timeout: float = 20.0) -> None:
    """Several broker nodes need a bus client that takes STRATUS_AMQP_URL as
    a comma-separated list of nodes: fail early, and say so, when it does not.
    (The probe declares the test cluster's own objects, which its close removes.)"""
    from bus.client import DBClient
    try:
        c = DBClient(settings, name="chaos-probe", connect_timeout=timeout)
    except Exception as exc:   # the URL itself refused
        raise ServiceError(f"the bus client does not take a list of broker nodes ({exc!r}); "
                           "several nodes need the multi-node client (STRATUS_BROKER_NODES)") from exc
    try:
        if not c.connected:
            raise ServiceError("the bus client did not connect to a comma-separated list of broker nodes "
                               f"within {timeout:g}s: several nodes need the multi-node client (STRATUS_BROKER_NODES)")
    finally:
        c.close()


def _ready(t: Target) -> bool:
    try:
        t.master()
    except NotNow:
        return False
    ws = workers(t.cluster.zk, t.cluster.paths)
    return any(w.ready and w.role is Role.SLAVE for w in ws.values())


def _resume(t: Target) -> None:
    """SIGCONT to every worker of the cluster (a paused master must not outlive the run)."""
    for pid in list(t.paused):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGCONT)
        t.paused.discard(pid)
    for m in workers(t.cluster.zk, t.cluster.paths).values() if t.cluster.zk.connected else ():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if m.pid:
                os.kill(m.pid, signal.SIGCONT)


def _stop_orchestrators(cluster) -> None:
    """SIGTERM to every orchestrator (they stop the workers they run), bounded."""
    procs = [p for k, p in cluster.procs.items() if k.startswith("orch") and p.poll() is None]
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)


def machine() -> str:
    import platform
    cpu = "unknown cpu"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def summary(report: checker.Report, info: dict) -> str:
    lines = [checker.table(report), ""]
    lines.append(f"Set keys attempted: {report.attempted}; acknowledged: {report.set_acked} "
                 f"(of which {report.total.lost} lost); fate unknown to the client (timeouts, 5xx): "
                 f"{report.indeterminate}; rows read at the end: {info.get('final_rows')}.")
    for what, keys in (("lost", report.lost_keys), ("unexpected", report.unexpected_keys),
                       ("duplicated", report.duplicated_keys)):
        if keys:
            lines.append(f"{what.capitalize()} keys (first 10): {', '.join(keys[:10])}")
    if report.stale_reads:
        lines.append("Stale reads (first 5): " + "; ".join(
            f"{s['client']} at {s['at']}s expected >= {s['expected']} got {s['got']} ({s['fault']})"
            for s in report.stale_reads[:5]))
    return "\n".join(lines)


def record(report: checker.Report, info: dict, argv: list[str]) -> Path:
    path = ROOT / "docs" / "reliability.md"
    if not path.exists():
        path.write_text("# Reliability\n\n## Results\n")
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    setup = f"{info['broker_nodes']} broker node(s), {info['zk_nodes']} ZooKeeper server(s), {info['services']} servers"
    events = ", ".join(f"{e['name']} at {e['start']:.0f}s" for e in info.get("events", []))
    body = (f"\n### {setup} — {stamp}\n\nMachine: {machine()}\n\n"
            f"Command: `python -m stratus.chaos {' '.join(argv)}` (seed {info['seed']}, "
            f"{info.get('duration')} s of workload, register reads carry their LSN in the {info['lsn_via']})\n\n"
            f"Faults in the order played: {events}.\n\n{summary(report, info)}\n")
    text = path.read_text()
    with path.open("a") as f:
        f.write(body if text.endswith("\n") else "\n" + body)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = _args(argv)
    # The harness's own ZooKeeper and broker clients see every fault too: their
    # reconnect chatter is not the run's output (the servers' logs are in --dir).
    import logging
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        report, info = run(a)
    except (ServiceError, AssertionError, RuntimeError) as exc:
        say(f"chaos: the run could not be carried out: {exc}")
        return 2
    say("")
    say(summary(report, info))
    if a.json:
        Path(a.json).write_text(json.dumps({"report": report.as_dict(), **info}, indent=2))
    if a.record:
        say(f"chaos: recorded in {record(report, info, argv)}")
    return 1 if a.strict and not report.ok else 0


if __name__ == "__main__":
    sys.exit(main())
