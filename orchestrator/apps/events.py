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

from kazoo.exceptions import BadVersionError, KazooException, NodeExistsError, NoNodeError

from bus.names import Paths
from bus.settings import env_int

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
                    if version < 0:
                        self.zk.create(path, body, makepath=True)
                    else:
                        self.zk.set(path, body, version=version)
                    log.info("event %s/%d %s %s", tenant, seq, type_,
                             " ".join(f"{k}={v}" for k, v in clean.items()))
                    return seq
                except (BadVersionError, NodeExistsError, NoNodeError):
                    continue
        except (KazooException, ValueError) as exc:
            log.warning("event %s %s for %s not kept: %r", type_, clean, tenant, exc)
        return None

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
