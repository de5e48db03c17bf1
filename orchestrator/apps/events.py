"""Each tenant's events (paas.md, `GET /api/v1/tenants/{t}/events?since=N`),
kept in ZooKeeper, bounded per tenant:

    Paths.tenant_events(tenant) = /stratus/<cluster>/events/<tenant>
        {"next": n, "events": [{"seq": s, "time": unix, "type": "...", ...}, ...]}

`seq` numbers start at 1 and grow by one per event of the tenant; the node
keeps the newest `bound` of them (STRATUS_EVENTS_KEPT, 500), so a reader that
asks `since=N` gets every event after N that is still kept, oldest first,
and `next` (the last seq it can pass as `since` to continue). Appends are a
compare-and-set on the znode's version, so two orchestrators (a leader and
the API of a standby) never lose each other's events.

Only a tenant that exists gets events: each append is one ZooKeeper
transaction that also checks the tenant's directory node (Paths.tenant), so
an instance that exits after its tenant was deleted cannot leave an event
for a new tenant of the same name (orchestrator/tenants.py deletes the node,
then the events). The built-in tenants (tenants.BUILT_IN), whose apps may
run before `stratus up` makes their node, are not checked.

Types: deployed, changed, scaled, deleted, restart_requested, started,
exited (with "code"), unhealthy (with "why"), restarted (with "delay"),
replaced, quota_refused, start_failed (with "why"). Each carries the app, and
where it applies the role and the instance. Nothing secret goes in an event:
`add` drops any field whose name says password, secret, token or url."""
from __future__ import annotations

import json
import logging
import time
from typing import Any

from kazoo.exceptions import BadVersionError, KazooException, NodeExistsError, NoNodeError, RolledBackError

from bus.names import Paths
from bus.settings import env_int

from ..tenants import BUILT_IN

log = logging.getLogger("stratus.orchestrator.events")

TYPES = ("deployed", "changed", "scaled", "deleted", "restart_requested", "started", "exited",
         "unhealthy", "restarted", "replaced", "quota_refused", "start_failed")
_SECRET_WORDS = ("password", "secret", "token", "url")
CAS_TRIES = 20


class Events:
    def __init__(self, zk, cluster: str, *, bound: int | None = None):
        self.zk = zk
        self.paths = Paths(cluster)
        self.bound = max(1, bound if bound is not None else env_int("STRATUS_EVENTS_KEPT", 500))

    def add(self, tenant: str, type_: str, **fields: Any) -> int | None:
        """Append one event; returns its seq (None when ZooKeeper did not
        take it: an event is never worth failing the action it tells of)."""
        if type_ not in TYPES:
            raise ValueError(f"unknown event type {type_!r}")
        clean = {k: v for k, v in fields.items()
                 if v is not None and not any(w in k.lower() for w in _SECRET_WORDS)}
        path = self.paths.tenant_events(tenant)
        try:
            for _ in range(CAS_TRIES):
                try:
                    data, stat = self.zk.get(path)
                    rec = json.loads(data) if data else {"next": 0, "events": []}
                    version = stat.version
                except NoNodeError:
                    rec, version = {"next": 0, "events": []}, -1
                seq = int(rec.get("next", 0)) + 1
                event = {"seq": seq, "time": round(time.time(), 3), "type": type_, **clean}
                events = (rec.get("events") or [])[-(self.bound - 1):] + [event] if self.bound > 1 else [event]
                body = json.dumps({"next": seq, "events": events}, separators=(",", ":")).encode()
                try:
                    if not self._write(tenant, path, body, version):
                        log.info("event %s %s for %s not kept: no such tenant", type_, clean, tenant)
                        return None
                    log.info("event %s/%d %s %s", tenant, seq, type_,
                             " ".join(f"{k}={v}" for k, v in clean.items()))
                    return seq
                except (BadVersionError, NodeExistsError, NoNodeError):
                    continue
        except (KazooException, ValueError) as exc:
            log.warning("event %s %s for %s not kept: %r", type_, clean, tenant, exc)
        return None

    def _write(self, tenant: str, path: str, body: bytes, version: int) -> bool:
        """Create (version < 0) or set the events node, while the tenant
        exists; False when it does not. BadVersionError or NodeExistsError:
        another writer was first, read again."""
        if tenant in BUILT_IN:
            if version < 0:
                self.zk.ensure_path(self.paths.events)
                self.zk.create(path, body)
            else:
                self.zk.set(path, body, version=version)
            return True
        node = self.zk.exists(self.paths.tenant(tenant))
        if node is None:
            return False
        if version < 0:
            self.zk.ensure_path(self.paths.events)
        tx = self.zk.transaction()
        tx.check(self.paths.tenant(tenant), node.version)
        if version < 0:
            tx.create(path, body)
        else:
            tx.set_data(path, body, version=version)
        results = tx.commit()
        failed = [r for r in results if isinstance(r, Exception) and not isinstance(r, RolledBackError)]
        if not failed:
            return True
        if isinstance(results[0], (NoNodeError, BadVersionError)):
            return False   # the tenant went (or was made again) meanwhile
        raise failed[0]

    def since(self, tenant: str, after: int = 0) -> dict[str, Any]:
        """{"events": [events with seq > after, oldest first], "next": the
        last seq}. KazooException propagates (the route answers 503)."""
        try:
            data, _ = self.zk.get(self.paths.tenant_events(tenant))
            rec = json.loads(data) if data else {}
        except NoNodeError:
            rec = {}
        except ValueError:
            rec = {}
        events = [e for e in rec.get("events") or [] if e.get("seq", 0) > after]
        return {"events": events, "next": int(rec.get("next", 0))}

    def drop(self, tenant: str) -> None:
        """Forget a deleted tenant's events."""
        try:
            self.zk.delete(self.paths.tenant_events(tenant))
        except (NoNodeError, KazooException):
            pass
