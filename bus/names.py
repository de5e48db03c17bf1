"""Every queue, exchange, stream and znode name, namespaced by STRATUS_CLUSTER.

Two clusters with different names share one broker and one ZooKeeper ensemble
and never see each other's objects: everything below is derived from the
cluster name, and nothing else in the code builds a name by hand."""
from __future__ import annotations

import re

_CLUSTER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def check_cluster(cluster: str) -> str:
    if not _CLUSTER_RE.match(cluster):
        raise ValueError(f"STRATUS_CLUSTER {cluster!r}: use letters, digits, '.', '_' or '-' (at most 63)")
    return cluster


class Names:
    """AMQP object names for one cluster. The spec's names (readQ, writeQ,
    syncQ, responseQ) are kept as the last part of each name."""

    def __init__(self, cluster: str):
        self.cluster = check_cluster(cluster)
        p = f"stratus.{cluster}."
        self.read_queue = p + "readQ"            # slaves consume it round robin
        self.write_queue = p + "writeQ"          # only the master consumes it
        self.master_read_queue = p + "readQ.master"  # reads that fell back to the master
        self.sync_exchange = p + "syncQ"         # fanout exchange: the replication log's entry
        self.log_stream = p + "syncQ.log"        # durable stream bound to syncQ
        self.dead_exchange = p + "dlx"           # unparsable messages go here...
        self.dead_queue = p + "deadQ"            # ...and are kept for inspection
        self.invalidate_exchange = p + "invalidate"  # fanout: product names whose cache entry is stale
        self.response_prefix = p + "responseQ."  # one reply queue per client: responseQ.<tenant>.<client>
        self.request_exchange = p + "requests"   # direct: "read" -> readQ, "write" -> writeQ (tenants write here only)
        self.snapshot_queue = p + "snapshotQ"    # a new worker asks a ready member for a snapshot here
        self.task_prefix = p + "tasks."          # tasks.<tenant> (exchange), tasks.<tenant>.<app>.<role>[.dead]

    def invalidate_exchange_of(self, tenant: str) -> str:
        """A tenant's own fanout of cache invalidations (the gateway's product
        cache listens to the toy store's)."""
        return self.invalidate_exchange + "." + _part(tenant, "tenant")

    def response_queue(self, client_id: str) -> str:
        return self.response_prefix + client_id

    def lease_queue(self, tenant: str, name: str) -> str:
        """The exclusive queue that is a tenant's lease `name` (bus/lease.py):
        under the tenant's own reply-queue prefix, which its account may
        configure and read, and no other tenant's may."""
        return f"{self.response_prefix}{_part(tenant, 'tenant')}.lease.{_part(name, 'lease')}"

    def task_exchange(self, tenant: str) -> str:
        """The tenant's own direct exchange for tasks (bus/tasks.py)."""
        return self.task_prefix + _part(tenant, "tenant")

    def task_queue(self, tenant: str, app: str, role: str) -> str:
        """The durable task queue of one worker role of one app."""
        return f"{self.task_exchange(tenant)}.{_part(app, 'app')}.{_part(role, 'role')}"

    def task_dead_queue(self, tenant: str, app: str, role: str) -> str:
        """Where that role's tasks go once they have failed too often."""
        return self.task_queue(tenant, app, role) + ".dead"


_PART_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


def _part(value: str, what: str) -> str:
    """One dot-free part of a task object's name: a tenant, app or role
    name, so that `tasks.<tenant>.` is a prefix no other tenant shares and
    `.dead` never ends a role's name."""
    if not isinstance(value, str) or not _PART_RE.fullmatch(value):
        raise ValueError(f"{what} {value!r}: 1-63 characters of a-z, 0-9 and '-', starting with a letter")
    return value


def app_service(tenant: str, app: str, role: str) -> str:
    """The registry service name of one web role of one app: its instances
    are registered under Paths.service(app_service(...))."""
    return f"app.{_part(tenant, 'tenant')}.{_part(app, 'app')}.{_part(role, 'role')}"


class Paths:
    """ZooKeeper paths for one cluster (layout documented in docs/architecture.md)."""

    def __init__(self, cluster: str):
        self.cluster = check_cluster(cluster)
        self.root = f"/stratus/{cluster}"
        self.workers = self.root + "/workers"          # ephemeral, one per live worker
        self.leader = self.root + "/leader"            # {"id", "term"}: who is master
        self.identity = self.root + "/identity"        # {"id", "created"}: the cluster's identity (bus/cluster.py)
        self.elections = self.root + "/elections"      # history: one sequential node per election
        self.orchestrators = self.root + "/orchestrator/election"  # kazoo Election
        self.orchestrator_state = self.root + "/orchestrator/state"  # scaling state, shown in /cluster
        self.orchestrator_members = self.root + "/orchestrator/members"  # ephemeral: each one's broker status
        self.services = self.root + "/services"        # tenant service registry
        self.locks = self.root + "/locks"
        self.tenants = self.root + "/tenants"          # tenant directory: one node per tenant, no secrets
        self.apps = self.root + "/apps"                # desired state of apps: apps/<tenant>/<app>
        self.routes = self.root + "/routes"            # app routes for the gateway: routes/<tenant>.<app>
        self.instances = self.root + "/instances"      # observed instances: instances/<tenant>/<app>
        self.events = self.root + "/events"            # bounded event log: events/<tenant>

    def worker(self, worker_id: str) -> str:
        return f"{self.workers}/{worker_id}"

    def orchestrator_member(self, ident: str) -> str:
        return f"{self.orchestrator_members}/{ident}"

    def service(self, name: str) -> str:
        return f"{self.services}/{name}"

    def tenant(self, name: str) -> str:
        return f"{self.tenants}/{name}"

    def app(self, tenant: str, app: str) -> str:
        return f"{self.apps}/{tenant}/{app}"

    def app_route(self, tenant: str, app: str) -> str:
        """{"tenant", "app", "routes": {prefix: service}} (bus/routing.py)."""
        return f"{self.routes}/{tenant}.{app}"

    def app_instances(self, tenant: str, app: str) -> str:
        return f"{self.instances}/{tenant}/{app}"

    def tenant_events(self, tenant: str) -> str:
        return f"{self.events}/{tenant}"

    def lock(self, name: str) -> str:
        return f"{self.locks}/{name}"
