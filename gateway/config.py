"""Gateway settings: the shared Stratus settings plus the gateway's own
STRATUS_GATEWAY_* knobs, all read from the environment at start."""
from __future__ import annotations

from dataclasses import dataclass, field

from bus.settings import Settings, env_bool, env_float, env_int, env_str, load


@dataclass(frozen=True)
class GatewayConfig:
    base: Settings = field(default_factory=load)
    port: int | None = None            # None: base.gateway_port
    # Server: a selector holds idle and partly received connections; a bounded
    # pool of threads serves complete requests, which wait in a bounded queue.
    threads: int = field(default_factory=lambda: env_int("STRATUS_GATEWAY_THREADS", 128))
    queue: int = field(default_factory=lambda: env_int("STRATUS_GATEWAY_QUEUE", 128))
    # Open client connections: from one address, and in all (also kept under the file limit).
    max_conn_per_ip: int = field(default_factory=lambda: env_int("STRATUS_GATEWAY_MAX_CONN_PER_IP", 128))
    max_connections: int = field(default_factory=lambda: env_int("STRATUS_GATEWAY_MAX_CONNECTIONS", 10_000))
    idle_timeout: float = field(default_factory=lambda: env_float("STRATUS_GATEWAY_IDLE_TIMEOUT", 30.0))
    # A request's head (request line + headers) and body must arrive within this.
    read_timeout: float = field(default_factory=lambda: env_float("STRATUS_GATEWAY_READ_TIMEOUT", 10.0))
    max_header_bytes: int = field(default_factory=lambda: env_int("STRATUS_GATEWAY_MAX_HEADER_BYTES", 16 * 1024))
    max_body_bytes: int = field(default_factory=lambda: env_int("STRATUS_GATEWAY_MAX_BODY_BYTES", 1024 * 1024))
    # An app package upload (PUT /api/v1/tenants/{t}/apps/{a}/package) may be up to 50 MiB (paas.md).
    max_package_bytes: int = field(default_factory=lambda: env_int("STRATUS_GATEWAY_MAX_PACKAGE_BYTES",
                                                                   50 * 1024 * 1024))
    # Upstreams.
    upstream_timeout: float = field(default_factory=lambda: env_float("STRATUS_GATEWAY_UPSTREAM_TIMEOUT", 30.0))
    connect_timeout: float = field(default_factory=lambda: env_float("STRATUS_GATEWAY_CONNECT_TIMEOUT", 3.0))
    health_interval: float = field(default_factory=lambda: env_float("STRATUS_GATEWAY_HEALTH_INTERVAL", 1.0))
    health_timeout: float = field(default_factory=lambda: env_float("STRATUS_GATEWAY_HEALTH_TIMEOUT", 0.8))
    pool_idle: float = field(default_factory=lambda: env_float("STRATUS_GATEWAY_POOL_IDLE", 20.0))
    # Affinity (paas.md, Behaviour): a client stays on one instance of a web role while it is healthy.
    affinity: bool = field(default_factory=lambda: env_bool("STRATUS_GATEWAY_AFFINITY", True))
    # Read-your-writes: how many clients' LSNs are remembered, and for how long.
    lsn_clients: int = field(default_factory=lambda: env_int("STRATUS_GATEWAY_LSN_CLIENTS", 100_000))
    lsn_ttl: float = field(default_factory=lambda: env_float("STRATUS_GATEWAY_LSN_TTL", 3600.0))
    # Product cache.
    cache_enabled: bool = field(default_factory=lambda: env_bool("STRATUS_GATEWAY_CACHE", True))
    cache_size: int = field(default_factory=lambda: env_int("STRATUS_GATEWAY_CACHE_SIZE", 8))
    # Tokens.
    token_ttl: int = field(default_factory=lambda: env_int("STRATUS_TOKEN_TTL", 3600))
    token_secret: str = field(default_factory=lambda: env_str("STRATUS_TOKEN_SECRET", ""))
    admin_password: str = field(default_factory=lambda: env_str("STRATUS_ADMIN_PASSWORD", ""))
    # Request rate per tenant (paas.md, Quotas): a token bucket of `tenant_rate`
    # requests/s holding up to `tenant_burst`. The built-in tenants (ratelimit.BUILTIN)
    # have none unless `builtin_rate` > 0 (their burst is twice that); 0 means no limit.
    tenant_rate: float = field(default_factory=lambda: env_float("STRATUS_TENANT_RATE", 200.0))
    tenant_burst: float = field(default_factory=lambda: env_float("STRATUS_TENANT_BURST", 400.0))
    builtin_rate: float = field(default_factory=lambda: env_float("STRATUS_BUILTIN_RATE", 0.0))
    access_log: bool = field(default_factory=lambda: env_bool("STRATUS_GATEWAY_ACCESS_LOG", True))

    @property
    def listen_port(self) -> int:
        return self.base.gateway_port if self.port is None else self.port


def load_config(**overrides) -> GatewayConfig:
    return GatewayConfig(**overrides)
