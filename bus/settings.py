"""Settings from the STRATUS_* environment variables (see shared spec platform.md).
The env_* readers are also used by components with settings of their own
(the gateway): an empty variable means the default; a malformed one stops the start."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, got {raw!r}") from exc


def env_str(name: str, default: str) -> str:
    raw = os.environ.get(name)
    return default if raw is None or raw == "" else raw


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    return raw.strip().lower() in ("1", "true", "yes", "on")


# --- the broker account (bus/broker_accounts.py) ---------------------------------
# Each entry point says which component it is (set_component, before load());
# STRATUS_COMPONENT names it for code without one of its own; neither: "admin"
# (the CLI, the tools, the tests). The declared one wins over the environment,
# which a component's children inherit (the orchestrator starts the workers).
_component: str | None = None


def set_component(name: str) -> None:
    """Declare this process's component (orchestrator, gateway, worker,
    dashboard, admin): with STRATUS_AMQP_URL unset, its broker account is used."""
    global _component
    _component = name


def component() -> str:
    from .broker_accounts import DEFAULT_COMPONENT
    return _component or env_str("STRATUS_COMPONENT", DEFAULT_COMPONENT)


def secrets_dir() -> Path:
    """Where the platform's secrets are: STRATUS_SECRETS_DIR, else
    $STRATUS_STATE_DIR/secrets (scripts/services.sh writes the broker accounts there)."""
    raw = env_str("STRATUS_SECRETS_DIR", "")
    return Path(raw) if raw else Path(env_str("STRATUS_STATE_DIR", "./var")) / "secrets"


def default_amqp_url() -> str:
    """STRATUS_AMQP_URL when set (as it always was); else this component's
    account, read from its file in secrets_dir(). When that cannot be read the
    answer is "" and the reason is what any use of it reports (bus/brokers.py
    amqp_urls): a component that never uses the broker (the dashboard, the
    CLI's HTTP commands) starts all the same."""
    from . import brokers
    from .broker_accounts import NO_ACCOUNT, url_file
    raw = os.environ.get("STRATUS_AMQP_URL")
    if raw:
        return raw
    comp = component()
    if comp in NO_ACCOUNT:
        brokers.missing_account(f"the {comp} has no broker account; set STRATUS_AMQP_URL to give it one")
        return ""
    path = url_file(secrets_dir(), comp)
    try:
        url = path.read_text().strip()
    except OSError as exc:
        brokers.missing_account(f"STRATUS_AMQP_URL is not set and the {comp}'s broker account could not be read "
                                f"from {path.resolve()} ({exc.strerror or exc}): run `scripts/services.sh start` "
                                "(make services), which makes the platform's accounts, or set STRATUS_AMQP_URL")
        return ""
    if not url:
        brokers.missing_account(f"{path.resolve()} is empty: run `scripts/services.sh start` (make services)")
    return url


@dataclass(frozen=True)
class Settings:
    # Set: as given. Unset: the component's own account from the secrets
    # directory (default_amqp_url above; docs/architecture.md, "The platform's broker accounts").
    amqp_url: str = field(default_factory=default_amqp_url)
    # RabbitMQ's management HTTP API: tenants' broker accounts are made through it.
    # One base URL per broker node, comma-separated, tried in turn
    # (bus/broker_admin.py); unset, derived from amqp_url (bus/brokers.py
    # default_management_url: http://127.0.0.1:15672 for one node).
    amqp_management_url: str = field(default_factory=lambda: env_str("STRATUS_AMQP_MANAGEMENT_URL", ""))
    zk_hosts: str = field(default_factory=lambda: env_str("STRATUS_ZK_HOSTS", "127.0.0.1:2181"))
    # How many RabbitMQ nodes and ZooKeeper servers run (scripts/services.sh,
    # docs/cluster.md). With more than one broker node, STRATUS_AMQP_URL lists
    # every node's URL (comma-separated), the replication stream is replicated
    # on broker_nodes of them and the request queues are quorum queues.
    broker_nodes: int = field(default_factory=lambda: env_int("STRATUS_BROKER_NODES", 1))
    zk_nodes: int = field(default_factory=lambda: env_int("STRATUS_ZK_NODES", 1))
    cluster: str = field(default_factory=lambda: env_str("STRATUS_CLUSTER", "default"))
    # The tenant an app instance acts for (its credentials are in STRATUS_AMQP_URL);
    # empty for the platform's own components.
    tenant: str = field(default_factory=lambda: env_str("STRATUS_TENANT", ""))
    runtime: str = field(default_factory=lambda: env_str("STRATUS_RUNTIME", "process"))
    scale_window: float = field(default_factory=lambda: env_float("STRATUS_SCALE_WINDOW", 120.0))
    reads_per_slave: int = field(default_factory=lambda: env_int("STRATUS_READS_PER_SLAVE", 20))
    max_slaves: int = field(default_factory=lambda: env_int("STRATUS_MAX_SLAVES", 8))
    state_dir: str = field(default_factory=lambda: env_str("STRATUS_STATE_DIR", "./var"))
    # ZooKeeper session timeout in seconds: how fast a dead worker is noticed.
    zk_timeout: float = field(default_factory=lambda: env_float("STRATUS_ZK_TIMEOUT", 1.0))
    # How long a DB request waits for its reply before the client gives up (504).
    request_timeout: float = field(default_factory=lambda: env_float("STRATUS_REQUEST_TIMEOUT", 10.0))
    # How long a slave holds a read whose min_lsn it has not applied yet before
    # handing it to the master.
    min_lsn_wait: float = field(default_factory=lambda: env_float("STRATUS_MIN_LSN_WAIT", 0.5))
    # Ports (0 = any free port, for the tenant services).
    gateway_port: int = field(default_factory=lambda: env_int("STRATUS_GATEWAY_PORT", 8080))
    orchestrator_port: int = field(default_factory=lambda: env_int("STRATUS_ORCHESTRATOR_PORT", 8081))
    users_port: int = field(default_factory=lambda: env_int("STRATUS_USERS_PORT", 8082))
    rides_port: int = field(default_factory=lambda: env_int("STRATUS_RIDES_PORT", 8083))
    catalog_port: int = field(default_factory=lambda: env_int("STRATUS_CATALOG_PORT", 8084))
    order_port: int = field(default_factory=lambda: env_int("STRATUS_ORDER_PORT", 8085))
    dashboard_port: int = field(default_factory=lambda: env_int("STRATUS_DASHBOARD_PORT", 8086))
    # Prometheus (the metrics history behind the dashboard's charts), and the
    # directory its file service discovery reads (the orchestrator writes there).
    prometheus_url: str = field(default_factory=lambda: env_str("STRATUS_PROMETHEUS_URL", "http://127.0.0.1:9090"))
    prometheus_sd_dir: str = field(default_factory=lambda: env_str("STRATUS_PROMETHEUS_SD_DIR", ""))
    # The address services bind to and advertise in the registry.
    bind_host: str = field(default_factory=lambda: env_str("STRATUS_BIND_HOST", "127.0.0.1"))
    advertise_host: str = field(default_factory=lambda: env_str("STRATUS_ADVERTISE_HOST", ""))
    # Where the orchestrator's API is, for the CLI and load scripts.
    orchestrator_url: str = field(default_factory=lambda: env_str("STRATUS_ORCHESTRATOR_URL", ""))
    gateway_url: str = field(default_factory=lambda: env_str("STRATUS_GATEWAY_URL", ""))
    # The store of a worker: a SQLAlchemy URL template; {path} is the worker's SQLite file.
    db_url: str = field(default_factory=lambda: env_str("STRATUS_DB_URL", "sqlite:///{path}"))
    # --- data plane hardening (docs/architecture.md) ---
    # How long a write's request id is remembered with its effect: a retry
    # inside this window is answered from the first attempt, never re-applied.
    dedup_retention: float = field(default_factory=lambda: env_float("STRATUS_DEDUP_RETENTION", 86400.0))
    # A worker named leader that is not master within this many seconds is
    # treated as failed and another is elected.
    promotion_timeout: float = field(default_factory=lambda: env_float("STRATUS_PROMOTION_TIMEOUT", 10.0))
    # Retention of the replication stream: by size (bytes) and by age
    # (RabbitMQ's x-max-age syntax: 7D, 12h, 30m, 90s). Whole segments are
    # removed, so a segment size bounds how much is kept past the limit.
    log_max_bytes: int = field(default_factory=lambda: env_int("STRATUS_LOG_MAX_BYTES", 2 * 1024 ** 3))
    log_max_age: str = field(default_factory=lambda: env_str("STRATUS_LOG_MAX_AGE", "7D"))
    log_segment_bytes: int = field(default_factory=lambda: env_int("STRATUS_LOG_SEGMENT_BYTES", 64 * 1024 ** 2))
    # Workers snapshot their store every this many seconds (0: only on demand).
    # A tenant's database quota in bytes (paas.md: 256 MiB); past it, writes are refused.
    # A tenant's instances across its apps (paas.md: 16); past it, a deploy or scale answers 409.
    tenant_instances: int = field(default_factory=lambda: env_int("STRATUS_TENANT_INSTANCES", 16))
    tenant_storage: int = field(default_factory=lambda: env_int("STRATUS_TENANT_STORAGE", 256 * 1024 ** 2))
    # A new worker (empty store) first fetches the latest snapshot from a
    # ready member; off: it replays the whole retained log (benchmarks compare).
    snapshot_fetch: bool = field(default_factory=lambda: env_bool("STRATUS_SNAPSHOT_FETCH", True))
    snapshot_every: float = field(default_factory=lambda: env_float("STRATUS_SNAPSHOT_EVERY", 300.0))
    restock_interval: float = field(default_factory=lambda: env_float("STRATUS_RESTOCK_INTERVAL", 10.0))
    log_level: str = field(default_factory=lambda: env_str("STRATUS_LOG_LEVEL", "INFO"))
    debug: bool = field(default_factory=lambda: env_bool("STRATUS_DEBUG", False))

    def __post_init__(self):
        if not self.amqp_management_url:
            from .brokers import default_management_url
            object.__setattr__(self, "amqp_management_url", default_management_url(self.amqp_url))

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).resolve()

    def cluster_state_path(self) -> Path:
        """Per-cluster state: worker databases, logs, secrets."""
        return self.state_path / "clusters" / self.cluster

    def orchestrator_base_url(self) -> str:
        return self.orchestrator_url or f"http://127.0.0.1:{self.orchestrator_port}"

    def gateway_base_url(self) -> str:
        return self.gateway_url or f"http://127.0.0.1:{self.gateway_port}"

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def load() -> Settings:
    """Read the environment now (tests change it between clusters)."""
    return Settings()
