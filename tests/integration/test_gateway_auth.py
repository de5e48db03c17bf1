"""Tokens and admin protection through a real gateway process: the token
granting service (admin, RideShare users read through the bus, wrong
credentials, malformed bodies) and the admin routes (401 without, with an
expired, tampered, alg-none, HS512 or RS256-headed token; 403 for another
role, 200 for the admin). Platform accounts, the other routes' access rules
and rate limits: test_gateway_tenancy.py."""
import base64
import hashlib
import hmac
import json
import stat
import time
import warnings

import jwt

from kits.testkit import (Client, free_port, real_orchestrator, start_gateway, start_upstream, wait_healthy,
                          wait_until)
from gateway.tokens import issue

SECRET = "test-secret-for-signing-tokens-32b"
CLAIMS = {"sub", "role", "iat", "exp"}
ADMIN_ROUTES = [("GET", "/api/v1/worker/list"), ("GET", "/api/v1/cluster"), ("POST", "/api/v1/db/clear"),
                ("POST", "/api/v1/crash/slave"), ("POST", "/api/v1/switchover"), ("POST", "/api/v1/db/read")]


def _grant(c, username, password):
    return c.request("POST", "/api/v1/auth/token", {"username": username, "password": password})


def _b64(obj) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def bad_tokens(secret: str, issued: str) -> list[str]:
    """Tokens a gateway with `secret` must refuse (401), made from a token it issued."""
    head, body, sig = issued.split(".")
    now = int(time.time())
    admin = {"sub": "admin", "role": "admin", "iat": now, "exp": now + 60}
    confusion = f"{_b64({'alg': 'RS256', 'typ': 'JWT'})}.{_b64(admin)}"   # RS256 header, HMAC'd with the secret
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    with warnings.catch_warnings():   # a valid HS512 signature with the gateway's own key, short for HS512
        warnings.simplefilter("ignore")
        hs512 = jwt.encode(admin, secret, algorithm="HS512")
    return [
        issue(secret, "admin", "admin", 60, now=now - 120),                        # expired
        f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(admin)}.",                    # alg none
        hs512,                                                                      # another algorithm
        f"{confusion}.{_b64(hmac.new(secret.encode(), confusion.encode(), hashlib.sha256).digest())}",
        f"{head}.{_b64({**jwt.decode(issued, secret, algorithms=['HS256']), 'sub': 'x'})}.{sig}",  # tampered
        f"{head}.{body}.{flipped}", issued + "x",
        issue("another-secret-another-secret-32b", "admin", "admin", 60),          # another key
        "garbage", "a.b.c",
    ]


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
    claims = jwt.decode(admin, SECRET, algorithms=["HS256"])
    assert set(claims) == CLAIMS and claims["sub"] == "admin" and claims["role"] == "admin"
    assert claims["exp"] - claims["iat"] == 3600
    assert _grant(c, "admin", admin_pw + "x")[0] == 401
    assert _grant(c, "admin", "")[0] == 400
    assert c.request("POST", "/api/v1/auth/token", b"{not json")[0] == 400
    assert c.request("POST", "/api/v1/auth/token", {"username": "admin"})[0] == 400
    assert c.request("POST", "/api/v1/auth/token", [1, 2])[0] == 400
    assert c.get("/api/v1/auth/token")[0] == 405

    user = issue(SECRET, "alice", "user", 60, tenant="rideshare")
    tampered = bad_tokens(SECRET, admin)

    before = Client(orch).get("/_stats")[1]["requests"]
    for method, path in ADMIN_ROUTES:
        status, body, resp = c.request(method, path)
        assert status == 401 and "error" in body, (path, status, body)
        assert resp.getheader("WWW-Authenticate", "").startswith("Bearer")
        assert c.request(method, path, headers={"Authorization": f"Basic {admin}"})[0] == 401
        for t in tampered:
            status, body, _ = c.request(method, path, headers={"Authorization": f"Bearer {t}"})
            assert status == 401 and "error" in body, (path, t, status, body)
        status, body, _ = c.request(method, path, headers={"Authorization": f"Bearer {user}"})
        assert status == 403 and "error" in body, (path, status, body)
    # None of the refused requests reached the orchestrator.
    assert Client(orch).get("/_stats")[1]["requests"] == before

    for method, path in ADMIN_ROUTES:
        # Identity headers a client sends are replaced by the token's.
        status, body, _ = c.request(method, path, headers={"Authorization": f"Bearer {admin}", "X-Stratus-Role": "x",
                                                           "X-Stratus-Tenant": "beta", "x-stratus-subject": "y"})
        assert status == 200 and body["path"] == path and body["method"] == method, body
        ident = {k.lower(): v for k, v in body["headers"].items() if k.lower().startswith("x-stratus-")
                 and k.lower() != "x-stratus-min-lsn"}
        assert ident == {"x-stratus-role": "admin", "x-stratus-subject": "admin"}, body["headers"]
    assert Client(orch).get("/_stats")[1]["requests"] == before + len(ADMIN_ROUTES)

    # The same admin password and signing secret survive a restart (kept in the state dir).
    cluster.kill("gateway")
    gw2 = start_gateway(cluster, "gateway2", STRATUS_TOKEN_SECRET=SECRET)
    assert pw_file.read_text().strip() == admin_pw
    assert _grant(Client(gw2), "admin", admin_pw)[0] == 200
    wait_healthy(gw2, "orchestrator", 1)
    assert Client(gw2).get("/api/v1/cluster", headers={"Authorization": f"Bearer {admin}"})[0] == 200


def test_admin_password_from_settings_and_a_generated_secret(cluster):
    start_upstream(cluster, "orch", "orchestrator")
    gw = start_gateway(cluster, STRATUS_ADMIN_PASSWORD="s3cret-admin", STRATUS_TOKEN_TTL=1)
    c = Client(gw)
    assert not (cluster.state_dir / "admin-password").exists()
    secret_file = cluster.state_dir / "token-secret"
    assert secret_file.exists() and stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    status, body, _ = _grant(c, "admin", "s3cret-admin")
    assert status == 200 and body["expires_in"] == 1
    admin = body["token"]
    # Signed with the generated secret as it is: any JWT library reads it.
    claims = jwt.decode(admin, secret_file.read_text().strip(), algorithms=["HS256"])
    assert set(claims) == CLAIMS and claims["exp"] - claims["iat"] == 1
    wait_healthy(gw, "orchestrator", 1)
    assert c.get("/api/v1/worker/list", headers={"Authorization": f"Bearer {admin}"})[0] == 200
    time.sleep(2.1)  # the 1 s token has expired
    assert c.get("/api/v1/worker/list", headers={"Authorization": f"Bearer {admin}"})[0] == 401


def test_rideshare_user_gets_a_user_token(cluster):
    cluster.bootstrap(slaves=1)
    gw = start_gateway(cluster, STRATUS_TOKEN_SECRET=SECRET)
    c = Client(gw)
    # No users table yet: no such user (not an error).
    assert _grant(c, "alice", "a" * 40)[0] == 401

    port = str(free_port())
    cluster.spawn("users", ["-m", "users"], STRATUS_USERS_PORT=port, STRATUS_TENANT="rideshare")
    wait_healthy(gw, "users", 1, timeout=30)
    wait_until(lambda: c.get("/api/v1/users")[0] in (200, 204), 20, what="users tables")

    sha = hashlib.sha1(b"alice's password").hexdigest()
    status, body, _ = c.request("PUT", "/api/v1/users", {"username": "alice", "password": sha.upper()})
    assert status == 201, body
    # Straight after the write, on the same connection: read-your-writes makes the check see it.
    status, body, _ = _grant(c, "alice", sha)
    assert status == 200 and body["role"] == "user" and body["expires_in"] == 3600, body
    user_token = body["token"]
    claims = jwt.decode(user_token, SECRET, algorithms=["HS256"])
    assert set(claims) == CLAIMS | {"tenant"} and (claims["sub"], claims["role"], claims["tenant"]) == \
        ("alice", "user", "rideshare"), claims
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
    with real_orchestrator(cluster):
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
