"""The desired state of every app, in ZooKeeper (issue 15):

    Paths.app(tenant, app) = /stratus/<cluster>/apps/<tenant>/<app>
        {"manifest": <Manifest.to_dict()>, "digest": "sha256:...",
         "generation": n, "updated": <unix time>, "restart": r}

`restart` counts restart requests: each one makes the controller replace
every instance of the app, one slot at a time.

`generation` starts at 1 and grows by one with every change, so a
controller can tell which state it has reconciled. Every change is a
compare-and-set on the znode's version (create when absent, set with the
version read): when another orchestrator changed the node in between, the
change is recomputed from the fresh record and tried again, so no update is
ever lost. A caller that passes `expect=<generation>` gets 409 instead of a
retry when the app moved on.

Route ownership and the instance quota span apps (several znodes), which a
single znode's version cannot guard: `put` and `set_instances` check them
while holding the lock Paths.lock("apps"), so two deploys that claim the
same prefix, or that together pass a tenant's quota, are ordered and the
second one sees the first. The route index (prefix -> (tenant, app)) is
derived from the records; nothing else stores it."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from typing import Any, Callable

from kazoo.exceptions import BadVersionError, KazooException, NodeExistsError, NoNodeError

from bus import zk as bzk
from bus.names import Paths

from . import AppError
from .manifest import DEFAULT_QUOTA, Manifest, check_quota, check_routes, parse

LOCK_WAIT = 10.0     # seconds to wait for another deploy to end
CAS_TRIES = 20


class NotFound(AppError):
    def __init__(self, message: str):
        super().__init__(404, message)


class Conflict(AppError):
    def __init__(self, message: str):
        super().__init__(409, message)


class Failed(AppError):
    """ZooKeeper did not answer, or the lock stayed held: 503, try again."""

    def __init__(self, message: str):
        super().__init__(503, message)


@dataclasses.dataclass(frozen=True)
class App:
    tenant: str
    name: str
    manifest: Manifest
    digest: str | None
    generation: int
    updated: float
    restart: int = 0      # bumped by a restart request: every instance is replaced, rolling

    def record(self) -> dict[str, Any]:
        return {"manifest": self.manifest.to_dict(), "digest": self.digest,
                "generation": self.generation, "updated": self.updated, "restart": self.restart}


class Desired:
    def __init__(self, zk, cluster: str, *, quota: int = DEFAULT_QUOTA):
        self.zk = zk
        self.paths = Paths(cluster)
        self.quota = quota

    # --- reading ------------------------------------------------------------------
    def _read(self, tenant: str, app: str) -> tuple[App | None, int]:
        """The app and its znode version (-1 when absent)."""
        try:
            data, stat = self.zk.get(self.paths.app(tenant, app))
        except NoNodeError:
            return None, -1
        try:
            rec = json.loads(data)
            # Stored manifests were valid when written; a lower quota since
            # then must not make them unreadable.
            m = parse(rec["manifest"], quota=max(self.quota, 1 << 30))
            app_ = App(tenant, app, m, rec.get("digest"), int(rec["generation"]), float(rec["updated"]),
                       int(rec.get("restart", 0)))
        except (ValueError, KeyError, TypeError, AppError) as exc:
            raise Failed(f"the stored state of {tenant}/{app} is unreadable ({type(exc).__name__}); "
                         "delete the app and deploy it again") from None
        return app_, stat.version

    def get(self, tenant: str, app: str) -> App | None:
        with self._zk_errors():
            return self._read(tenant, app)[0]

    def list(self, tenant: str) -> list[App]:
        """The tenant's apps, by name."""
        with self._zk_errors():
            try:
                names = sorted(self.zk.get_children(f"{self.paths.apps}/{tenant}"))
            except NoNodeError:
                return []
            return [a for a in (self._read(tenant, n)[0] for n in names) if a is not None]

    def all(self) -> list[App]:
        with self._zk_errors():
            try:
                tenants = sorted(self.zk.get_children(self.paths.apps))
            except NoNodeError:
                return []
        return [a for t in tenants for a in self.list(t)]

    def routes(self) -> dict[str, tuple[str, str]]:
        """The route ownership index: prefix -> (tenant, app)."""
        return {p: (a.tenant, a.name) for a in self.all() for p in a.manifest.routes}

    def instances(self, tenant: str, *, besides: str | None = None) -> int:
        """Desired instances of the tenant's apps, not counting app `besides`."""
        return sum(a.manifest.instances for a in self.list(tenant) if a.name != besides)

    # --- changing -----------------------------------------------------------------
    def update(self, tenant: str, app: str, change: Callable[[App | None], App]) -> App:
        """Compare-and-set: `change(current)` gives the new App (generation and
        time are set here); retried from a fresh read when the node moved."""
        path = self.paths.app(tenant, app)
        with self._zk_errors():
            for _ in range(CAS_TRIES):
                old, version = self._read(tenant, app)
                new = change(old)
                new = dataclasses.replace(new, generation=(old.generation if old else 0) + 1,
                                          updated=time.time())
                data = json.dumps(new.record(), separators=(",", ":")).encode()
                try:
                    if old is None:
                        self.zk.create(path, data, makepath=True)
                    else:
                        self.zk.set(path, data, version=version)
                    return new
                except (BadVersionError, NodeExistsError, NoNodeError):
                    continue   # another writer got there first: recompute from its state
            raise Failed(f"{tenant}/{app} kept changing under {CAS_TRIES} tries; try again")

    def put(self, tenant: str, app: str, manifest: Manifest, digest: str | None, *,
            expect: int | None = None) -> tuple[App, bool]:
        """Deploy: the app's new manifest and package. Returns (app, created).
        409 when a route is reserved or another app's, over the quota, or
        (with `expect`) when the app is not at that generation."""
        created = []

        def change(old: App | None) -> App:
            _expect(old, expect, tenant, app)
            created.append(old is None)
            return App(tenant, app, manifest, digest, 0, 0.0, old.restart if old else 0)

        with self._locked():
            check_routes(manifest, self.routes(), tenant, app)
            check_quota(manifest.instances, self.instances(tenant, besides=app), self.quota)
            new = self.update(tenant, app, change)
        return new, created[-1]

    def set_instances(self, tenant: str, app: str, role: str, n: int, *,
                      expect: int | None = None) -> App:
        """Scale one role: 404 no such app or role, 400 a bad count, 409 quota."""

        def change(old: App | None) -> App:
            if old is None:
                raise NotFound(f"no app {tenant}/{app}")
            _expect(old, expect, tenant, app)
            if role not in old.manifest.roles:
                raise NotFound(f"app {tenant}/{app} has no role {role!r}")
            m = old.manifest.scaled(role, n, quota=self.quota)
            check_quota(m.instances, others, self.quota)
            return dataclasses.replace(old, manifest=m)

        with self._locked():
            others = self.instances(tenant, besides=app)
            return self.update(tenant, app, change)

    def restart(self, tenant: str, app: str) -> App:
        """Ask for a rolling restart of every instance (404 no such app)."""

        def change(old: App | None) -> App:
            if old is None:
                raise NotFound(f"no app {tenant}/{app}")
            return dataclasses.replace(old, restart=old.restart + 1)

        return self.update(tenant, app, change)

    def delete(self, tenant: str, app: str) -> None:
        """Remove the app's desired state (404 when there is none)."""
        with self._zk_errors():
            try:
                self.zk.delete(self.paths.app(tenant, app))
            except NoNodeError:
                raise NotFound(f"no app {tenant}/{app}") from None
            try:   # the tenant's node goes with its last app
                self.zk.delete(f"{self.paths.apps}/{tenant}")
            except (NoNodeError, KazooException):
                pass

    # --- plumbing -----------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        with contextlib.ExitStack() as held:
            with self._zk_errors():
                try:
                    held.enter_context(bzk.held_lock(self.zk, self.paths.lock("apps"), LOCK_WAIT))
                except bzk.LockBusy:
                    raise Failed(f"another app change is still running after {LOCK_WAIT:g}s; try again") from None
            yield

    @contextlib.contextmanager
    def _zk_errors(self):
        try:
            yield
        except AppError:
            raise
        except KazooException as exc:
            raise Failed(f"ZooKeeper did not answer ({type(exc).__name__}); try again") from None


def _expect(old: App | None, expect: int | None, tenant: str, app: str) -> None:
    if expect is not None and (old.generation if old else 0) != expect:
        raise Conflict(f"{tenant}/{app} is at generation {old.generation if old else 0}, not {expect}")
