"""The whole stack's files, read without an engine (so these run in the process
suites too): compose/docker-compose.yml's dashboard and Prometheus wiring,
and compose/prometheus/prometheus.yml being etc/prometheus.yml (the config
scripts/services.sh renders for local processes) with the stack's values.
The Docker stage (test_docker_stack.py) runs the same files for real."""
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
COMPOSE = ROOT / "compose"
TARGETS = "/srv/stratus/prometheus-targets"


def compose() -> dict:
    return yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())


def mounts(service: dict) -> dict[str, str]:
    """{target path: source} of a service's short-syntax volumes."""
    out = {}
    for v in service.get("volumes", []):
        src, dst = v.split(":")[:2]
        out[dst] = src
    return out


def test_the_prometheus_config_is_the_local_one_with_the_stacks_addresses():
    template = (ROOT / "etc" / "prometheus.yml").read_text()
    rendered = template.replace("@TARGETS_DIR@", TARGETS).replace("@RABBITMQ_METRICS@", "rabbitmq:15692")
    assert "@" not in yaml.safe_dump(yaml.safe_load(rendered))
    ours = yaml.safe_load((COMPOSE / "prometheus" / "prometheus.yml").read_text())
    assert ours == yaml.safe_load(rendered)
    assert ours["global"]["scrape_interval"] == "5s"
    sd = ours["scrape_configs"][0]["file_sd_configs"][0]["files"]
    assert sd == [f"{TARGETS}/*.json"]


def rabbitmq_targets(config: dict) -> list:
    """The rabbitmq job's targets (a list the caller may change in place)."""
    return [j for j in config["scrape_configs"] if j["job_name"] == "rabbitmq"][0]["static_configs"][0]["targets"]


def test_the_cluster_stacks_prometheus_scrapes_every_broker_node():
    single = yaml.safe_load((COMPOSE / "prometheus" / "prometheus.yml").read_text())
    cluster = yaml.safe_load((COMPOSE / "cluster" / "prometheus.yml").read_text())
    targets = rabbitmq_targets(cluster)
    assert targets == ["rabbitmq1:15692", "rabbitmq2:15692", "rabbitmq3:15692"]
    targets[:] = ["rabbitmq:15692"]   # the same config but for those targets
    assert cluster == single
    stack = yaml.safe_load((COMPOSE / "docker-compose.cluster.yml").read_text())
    assert {"rabbitmq1", "rabbitmq2", "rabbitmq3"} <= set(stack["services"])
    assert mounts(stack["services"]["prometheus"])["/etc/prometheus/prometheus.yml"] == "./cluster/prometheus.yml"


def test_services_sh_has_prometheus_scrape_every_local_broker_node(tmp_path):
    def services(command: str, nodes: int) -> str:
        env = {"PATH": "/usr/bin:/bin", "STRATUS_STATE_DIR": str(tmp_path), "STRATUS_BROKER_NODES": str(nodes),
               "STRATUS_BROKER_PORT": "5682"}
        return subprocess.run([str(ROOT / "scripts" / "services.sh"), command], env=env, check=True,
                              capture_output=True, text=True, timeout=30).stdout
    config = yaml.safe_load(services("prometheus-config", 3))
    assert rabbitmq_targets(config) == ["127.0.0.1:15702", "127.0.0.1:15703", "127.0.0.1:15704"]
    assert "STRATUS_RABBITMQ_METRICS=127.0.0.1:15702,127.0.0.1:15703,127.0.0.1:15704" in services("env", 3)
    assert rabbitmq_targets(yaml.safe_load(services("prometheus-config", 1))) == ["127.0.0.1:15692"]


def test_prometheus_reads_the_volume_the_orchestrator_writes_and_is_not_published():
    c = compose()
    svc = c["services"]
    orch, prom = svc["orchestrator"], svc["prometheus"]
    assert orch["environment"]["STRATUS_PROMETHEUS_SD_DIR"] == TARGETS
    assert mounts(orch)[TARGETS] == "prometheus-targets"
    assert mounts(prom)[TARGETS] == "prometheus-targets"
    assert any(v == f"prometheus-targets:{TARGETS}:ro" for v in prom["volumes"]), prom["volumes"]
    # The orchestrator runs as the image's user (uid 10001): the shared tmpfs is its own.
    opts = c["volumes"]["prometheus-targets"]["driver_opts"]
    assert opts["type"] == "tmpfs" and "uid=10001" in opts["o"] and "gid=10001" in opts["o"], opts
    assert mounts(prom)["/etc/prometheus/prometheus.yml"] == "./prometheus/prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    assert "ports" not in prom
    # The official image, pinned; the local one through STRATUS_PROMETHEUS_IMAGE.
    image = prom["image"]
    assert image.startswith("${STRATUS_PROMETHEUS_IMAGE:-prom/prometheus:v2."), image
    assert "latest" not in image
    # Published: the gateway and the orchestrator, on loopback; nothing else.
    published = {name: s["ports"] for name, s in svc.items() if s.get("ports")}
    assert set(published) == {"gateway", "orchestrator"}, published
    assert all(p.startswith("127.0.0.1:") for ports in published.values() for p in ports), published


def test_the_dashboard_service_and_registry_addresses():
    svc = compose()["services"]
    d = svc["dashboard"]
    assert d["image"] == "${STRATUS_IMAGE_PREFIX:-stratus}/dashboard:latest"
    env = d["environment"]
    assert env["STRATUS_GATEWAY_URL"] == "http://gateway:8080"
    assert env["STRATUS_PROMETHEUS_URL"] == "http://prometheus:9090"
    assert env["STRATUS_ZK_HOSTS"] == "zookeeper:2181" and env["STRATUS_BIND_HOST"] == "0.0.0.0"
    assert mounts(d)["/var/lib/stratus"] == "dashboard-state"
    assert d["depends_on"]["orchestrator"]["condition"] == "service_healthy"
    # No fixed hostname (scaled replicas register distinct addresses); the
    # gateway's and Prometheus's names are fixed, so the targets read well.
    assert "hostname" not in d
    assert svc["gateway"]["hostname"] == "gateway"
    assert svc["orchestrator"]["hostname"] == "orchestrator"
    assert svc["prometheus"]["hostname"] == "prometheus"


def test_rabbitmq_serves_its_prometheus_endpoint_whichever_the_image():
    rmq = compose()["services"]["rabbitmq"]
    assert mounts(rmq)["/etc/rabbitmq/enabled_plugins"] == "./rabbitmq/enabled_plugins"
    plugins = (COMPOSE / "rabbitmq" / "enabled_plugins").read_text().strip()
    assert plugins.startswith("[") and plugins.endswith("].")
    assert {p.strip() for p in plugins[1:-2].split(",")} == {"rabbitmq_management", "rabbitmq_prometheus"}
    local = (ROOT / "docker" / "local" / "rabbitmq.Dockerfile").read_text()
    assert "rabbitmq_prometheus" in local


def test_the_image_script_builds_the_dashboard_and_the_local_prometheus():
    script = (ROOT / "scripts" / "docker-images.sh").read_text()
    components = next(line for line in script.splitlines() if line.startswith("COMPONENTS=("))
    assert "dashboard" in components.split("(")[1].rstrip(")").split()
    assert "prometheus:2.42" in script and "STRATUS_PROMETHEUS_IMAGE=$PREFIX/prometheus:2.42" in script
    assert (ROOT / "docker" / "local" / "prometheus.Dockerfile").is_file()
    assert (ROOT / "dashboard" / "Dockerfile").is_file()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus package) is not installed")
def test_promtool_accepts_the_stacks_config():
    p = subprocess.run(["promtool", "check", "config", str(COMPOSE / "prometheus" / "prometheus.yml")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SUCCESS" in p.stdout + p.stderr


def test_the_swarm_stack_file_runs_the_same_services_as_compose():
    """compose/docker-stack.yml (docker stack deploy) against docker-compose.yml:
    the same services, images and shared settings, so the two cannot drift;
    the runtime is swarm, the network an attachable overlay, and Swarm-only
    keys (deploy, configs) stand for compose's restart and bind-mounted files."""
    stack = yaml.safe_load((COMPOSE / "docker-stack.yml").read_text())
    ours = compose()
    # The walls the Swarm stack does not have yet (docs/operations.md, "Docker
    # walls"): compose's generated secrets and AMQP relay, the tenant networks'
    # peers and the addresses the orchestrator listens on.
    compose_only = {"secrets", "amqp-relay"}
    walls_env = {"STRATUS_DOCKER_TENANT_PEERS", "STRATUS_BIND_HOST", "STRATUS_ADVERTISE_HOST"}
    assert set(stack["services"]) == set(ours["services"]) - compose_only
    for name, svc in stack["services"].items():
        assert svc["image"] == ours["services"][name]["image"], name
        assert "restart" not in svc and "depends_on" not in svc, name   # compose-only keys, ignored by Swarm
        env = svc.get("environment") or {}
        for k, v in (ours["services"][name].get("environment") or {}).items():
            if k == "STRATUS_RUNTIME" or k in walls_env:
                continue
            assert env.get(k) == v, (name, k)
    assert stack["services"]["orchestrator"]["environment"]["STRATUS_RUNTIME"] == "swarm"
    assert ours["services"]["orchestrator"]["environment"]["STRATUS_RUNTIME"] == "docker"
    net = stack["networks"]["default"]
    assert net["driver"] == "overlay" and net["attachable"] is True and net["name"] == ours["networks"]["default"]["name"]
    # The files compose bind-mounts are Swarm configs of the same files.
    for cfg in stack["configs"].values():
        assert (COMPOSE / cfg["file"]).is_file(), cfg
    published = {name: [p["target"] for p in svc.get("ports", [])] for name, svc in stack["services"].items()}
    assert {k: v for k, v in published.items() if v} == {"orchestrator": [8081], "gateway": [8080]}
