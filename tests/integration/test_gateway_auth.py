"""Tokens and admin protection through a real gateway process: the token
granting service (admin, RideShare users read through the bus, wrong
credentials, malformed bodies) and the admin routes (401 without, expired or
tampered token, 403 for another role, 200 for the admin)."""
import hashlib
import stat
import time

from kits.testkit import Client, free_port, start_gateway, start_upstream, wait_healthy, wait_until
from gateway.tokens import Signer

SECRET = "test-secret-for-signing"
ADMIN_ROUTES = [("GET", "/api/v1/worker/list"), ("GET", "/api/v1/cluster"), ("POST", "/api/v1/db/clear"),
                ("POST", "/api/v1/crash/slave"), ("POST", "/api/v1/switchover"), ("POST", "/api/v1/db/read")]


def _grant(c, username, password):
    return c.request("POST", "/api/v1/auth/token", {"username": username, "password": password})


def test_admin_routes_need_an_admin_token(cluster):
    orch = start_upstream(cluster, "orch", "orchestrator")  # a registered stand-in for the orchestrator
    gw = start_gateway(cluster, STRATUS_TOKEN_SECRET=SECRET)
    wait_healthy(gw, "orchestrator", 1)
    c = Client(gw)

    # The admin password was generated on first start, readable by its owner alone.
    pw_file = cluster.state_dir / "admin-password"
    assert stat.S_IMODE(pw_file.stat().st_mode) == 0o600
    admin_pw = pw_file.read_text().strip()
    assert len(admin_pw) >= 16

    status, body, _ = _grant(c, "admin", admin_pw)
    assert status == 200 and body["role"] == "admin" and body["expires_in"] == 3600, body
    admin = body["token"]
    assert _grant(c, "admin", admin_pw + "x")[0] == 401
    assert _grant(c, "admin", "")[0] == 400
    assert c.request("POST", "/api/v1/auth/token", b"{not json")[0] == 400
    assert c.request("POST", "/api/v1/auth/token", {"username": "admin"})[0] == 400
    assert c.request("POST", "/api/v1/auth/token", [1, 2])[0] == 400
    assert c.get("/api/v1/auth/token")[0] == 405

    signer = Signer(SECRET)
    user = signer.issue("alice", "user", 60)
    expired = signer.issue("admin", "admin", 60, now=time.time() - 120)
    head, sig = admin.split(".")
    forged_body = Signer("another-secret").issue("admin", "admin", 60).split(".")[0]
    tampered = [f"{forged_body}.{sig}", f"{head}.{sig[:-2]}{'A' if sig[-2] != 'A' else 'B'}{sig[-1]}", admin + "x",
                Signer("another-secret").issue("admin", "admin", 60), "garbage"]

    before = Client(orch).get("/_stats")[1]["requests"]
    for method, path in ADMIN_ROUTES:
        status, body, resp = c.request(method, path)
        assert status == 401 and "error" in body, (path, status, body)
        assert resp.getheader("WWW-Authenticate", "").startswith("Bearer")
        assert c.request(method, path, headers={"Authorization": f"Basic {admin}"})[0] == 401
        assert c.request(method, path, headers={"Authorization": f"Bearer {expired}"})[0] == 401, path
        for t in tampered:
            assert c.request(method, path, headers={"Authorization": f"Bearer {t}"})[0] == 401, (path, t)
        status, body, _ = c.request(method, path, headers={"Authorization": f"Bearer {user}"})
        assert status == 403 and "error" in body, (path, status, body)
    # None of the refused requests reached the orchestrator.
    assert Client(orch).get("/_stats")[1]["requests"] == before

    for method, path in ADMIN_ROUTES:
        status, body, _ = c.request(method, path, headers={"Authorization": f"Bearer {admin}"})
        assert status == 200 and body["path"] == path and body["method"] == method, body
    assert Client(orch).get("/_stats")[1]["requests"] == before + len(ADMIN_ROUTES)

    # The same admin password and signing secret survive a restart (kept in the state dir).
    cluster.kill("gateway")
    gw2 = start_gateway(cluster, "gateway2", STRATUS_TOKEN_SECRET=SECRET)
    assert pw_file.read_text().strip() == admin_pw
    assert _grant(Client(gw2), "admin", admin_pw)[0] == 200
    wait_healthy(gw2, "orchestrator", 1)
    assert Client(gw2).get("/api/v1/cluster", headers={"Authorization": f"Bearer {admin}"})[0] == 200


def test_admin_password_and_tenant_from_settings(cluster):
    start_upstream(cluster, "orch", "orchestrator")
    gw = start_gateway(cluster, STRATUS_ADMIN_PASSWORD="s3cret-admin", STRATUS_TENANT_USERNAME="shop",
                       STRATUS_TENANT_PASSWORD="shop-pass", STRATUS_TOKEN_TTL=1)
    c = Client(gw)
    assert not (cluster.state_dir / "admin-password").exists()
    assert (cluster.state_dir / "token-secret").exists()
    assert stat.S_IMODE((cluster.state_dir / "token-secret").stat().st_mode) == 0o600
    status, body, _ = _grant(c, "shop", "shop-pass")
    assert status == 200 and body["role"] == "tenant"
    tenant = body["token"]
    assert _grant(c, "shop", "nope")[0] == 401
    assert c.get("/api/v1/worker/list", headers={"Authorization": f"Bearer {tenant}"})[0] == 403
    status, body, _ = _grant(c, "admin", "s3cret-admin")
    assert status == 200 and body["expires_in"] == 1
    admin = body["token"]
    wait_healthy(gw, "orchestrator", 1)
    assert c.get("/api/v1/worker/list", headers={"Authorization": f"Bearer {admin}"})[0] == 200
    time.sleep(2.1)  # the 1 s token has expired
    assert c.get("/api/v1/worker/list", headers={"Authorization": f"Bearer {admin}"})[0] == 401


def test_rideshare_user_gets_a_user_token(cluster):
    cluster.bootstrap(slaves=1)
    gw = start_gateway(cluster)
    c = Client(gw)
    # No users table yet: no such user (not an error).
    assert _grant(c, "alice", "a" * 40)[0] == 401

    port = str(free_port())
    cluster.spawn("users", ["-m", "users"], STRATUS_USERS_PORT=port)
    wait_healthy(gw, "users", 1, timeout=30)
    wait_until(lambda: c.get("/api/v1/users")[0] in (200, 204), 20, what="users tables")

    sha = hashlib.sha1(b"alice's password").hexdigest()
    status, body, _ = c.request("PUT", "/api/v1/users", {"username": "alice", "password": sha.upper()})
    assert status == 201, body
    # Straight after the write, on the same connection: read-your-writes makes the check see it.
    status, body, _ = _grant(c, "alice", sha)
    assert status == 200 and body["role"] == "user" and body["expires_in"] == 3600, body
    user_token = body["token"]
    assert _grant(c, "alice", sha.upper())[0] == 200          # compared lowercased
    assert _grant(c, "alice", "0" * 40)[0] == 401             # wrong password
    assert _grant(c, "bob", sha)[0] == 401                    # no such user
    assert _grant(c, "alice", "alice's password")[0] == 401   # the digest, not the plain text
    status, body, _ = c.get("/api/v1/worker/list", headers={"Authorization": f"Bearer {user_token}"})
    assert status == 403, body
    # A user token is fine on the public routes.
    assert c.get("/api/v1/users", headers={"Authorization": f"Bearer {user_token}"})[0] == 200


def test_admin_routes_reach_the_real_orchestrator(cluster):
    """The orchestrator's leader registers as service "orchestrator"; the gateway finds it there."""
    import os
    import signal
    from pathlib import Path

    orch_port = free_port()
    proc = cluster.spawn("orch", ["-m", "orchestrator"], STRATUS_ORCHESTRATOR_PORT=str(orch_port))
    try:
        gw = start_gateway(cluster, STRATUS_ADMIN_PASSWORD="pw-admin",
                           STRATUS_ORCHESTRATOR_URL="http://127.0.0.1:1")  # the fallback must not be used
        wait_healthy(gw, "orchestrator", 1, timeout=60)
        c = Client(gw)
        admin = _grant(c, "admin", "pw-admin")[1]["token"]
        auth = {"Authorization": f"Bearer {admin}"}
        assert c.get("/api/v1/worker/list")[0] == 401
        pids = wait_until(lambda: (r := c.get("/api/v1/worker/list", headers=auth))[0] == 200 and len(r[1]) >= 2
                          and r[1], 60, what="the orchestrator's workers")
        assert pids == sorted(pids) and all(isinstance(p, int) for p in pids)
        status, body, _ = c.get("/api/v1/cluster", headers=auth)
        assert status == 200 and isinstance(body, dict), body
        status, body, _ = c.request("POST", "/api/v1/db/read", {"op": "select", "table": "nope"}, headers=auth)
        assert status == 400, (status, body)  # the orchestrator's own answer, passed through
    finally:
        # A clean stop: the orchestrator stops the workers it started.
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        marker = f"STRATUS_CLUSTER={cluster.name}".encode()
        for d in Path("/proc").iterdir():  # any worker of this cluster still alive is killed
            try:
                if d.name.isdigit() and b"worker" in (d / "cmdline").read_bytes() and \
                        marker in (d / "environ").read_bytes().split(b"\0"):
                    os.kill(int(d.name), signal.SIGKILL)
            except OSError:
                continue
