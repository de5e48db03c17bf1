"""The example tenant app (tests/data/apps/shop, written against paas.md
only) and a client of a running platform's apps API, shared by the apps
tests, the dashboard's kit and the Docker stage."""
from __future__ import annotations

import json
from pathlib import Path

from kits.testkit import Client, wait_until
from stratus import builtin

SHOP = Path(__file__).resolve().parent.parent / "data" / "apps" / "shop"


def shop_package() -> tuple[dict, bytes]:
    """(manifest, package bytes) of the example app."""
    manifest = json.loads((SHOP / "manifest.json").read_text())
    return manifest, builtin.tarball(builtin.members(SHOP, ["shop"]))


class AppsClient:
    """The orchestrator's own port (`orch`, acting as the admin) and the
    gateway (`gw`) of a platform whose tenant `tenant` runs the example app."""

    wait_timeout = 30.0      # seconds wait_running waits by default

    orch: int
    gw: int
    tenant: str
    passwords: dict[str, str]

    def api(self, method, path, body=None, headers=None, timeout=60):
        c = Client(self.orch, timeout=timeout)
        try:
            return c.request(method, path, body, headers)
        finally:
            c.close()

    def gateway(self, method, path, body=None, headers=None):
        c = Client(self.gw, timeout=30)
        try:
            return c.request(method, path, body, headers)
        finally:
            c.close()

    def app(self, name="shop", tenant=None) -> dict:
        status, body, _ = self.api("GET", f"/api/v1/tenants/{tenant or self.tenant}/apps/{name}")
        assert status == 200, body
        return body

    def running(self, role, name="shop", tenant=None) -> list[dict]:
        """The role's instances in state running (one read of the app)."""
        return [i for i in self.app(name, tenant)["roles"][role]["instances"] if i["state"] == "running"]

    def wait_running(self, role, n, name="shop", timeout=None):
        def settled():
            r = self.app(name)["roles"][role]      # one read per look: two could straddle a change
            return (r["running"] == n and len(r["instances"]) == n
                    and sum(i["state"] == "running" for i in r["instances"]) == n) or None
        return wait_until(settled, timeout or self.wait_timeout, 0.1, what=f"{n} running {role} instances of {name}")

    def events(self, since=0, tenant=None) -> list[dict]:
        status, body, _ = self.api("GET", f"/api/v1/tenants/{tenant or self.tenant}/events?since={since}")
        assert status == 200, body
        return body["events"]

    def token(self, username) -> str:
        status, body, _ = self.gateway("POST", "/api/v1/auth/token",
                                       {"username": username, "password": self.passwords[username]})
        assert status == 200, body
        return body["token"]
