"""Tenancy through a real gateway process (paas.md, Words, Accounts, Data
isolation): platform accounts log in as tenant owners and developers; the
access rules of the tenants, developers, db and admin routes for every role;
the identity headers the gateway sets (and strips from clients); a bus it
cannot reach is 503, never 401; the per-tenant rate limit (429 with
Retry-After, one tenant throttled while another is not, the built-in tenants
unlimited by default); and the same rules in front of the real orchestrator."""
import threading
import time

import jwt

from bus import metrics as bmetrics
from bus import accounts, ops
from gateway.tokens import issue
from kits.testkit import Client, real_orchestrator, start_gateway, start_upstream, wait_healthy, wait_until

SECRET = "tenancy-test-secret-of-32-bytes-or-more"
CLAIMS = {"sub", "role", "iat", "exp"}
IDENTITY = ("x-stratus-role", "x-stratus-subject", "x-stratus-tenant")


def _grant(c, username, password):
    return c.request("POST", "/api/v1/auth/token", {"username": username, "password": password})


def _auth(token):
    return {"Authorization": f"Bearer {token}"} if token else {}


def _identity(body) -> dict:
    """The identity headers a trivial upstream saw."""
    return {k.lower(): v for k, v in body["headers"].items() if k.lower() in IDENTITY}


def test_accounts_log_in_and_each_role_gets_its_routes(cluster):
    cluster.bootstrap(slaves=1)
    db = cluster.client()
    acme_pw, _ = accounts.create(db, "acme", "tenant")
    beta_pw, _ = accounts.create(db, "beta", "tenant")
    dev_pw, _ = accounts.create(db, "dev1", "developer")
    orch = start_upstream(cluster, "orch", "orchestrator")   # a registered stand-in that echoes what it gets
    start_upstream(cluster, "users", "users")
    gw = start_gateway(cluster, STRATUS_TOKEN_SECRET=SECRET, STRATUS_ADMIN_PASSWORD="pw-admin")
    wait_healthy(gw, "orchestrator", 1)
    wait_healthy(gw, "users", 1)
    c = Client(gw)

    tokens = {}
    for name, pw, role in (("acme", acme_pw, "tenant"), ("beta", beta_pw, "tenant"), ("dev1", dev_pw, "developer"),
                           ("admin", "pw-admin", "admin")):
        status, body, _ = _grant(c, name, pw)
        assert status == 200 and body["role"] == role and body["expires_in"] == 3600, (name, body)
        claims = jwt.decode(body["token"], SECRET, algorithms=["HS256"])
        expected = CLAIMS | {"tenant"} if role == "tenant" else CLAIMS
        assert set(claims) == expected and claims["sub"] == name and claims["role"] == role, claims
        assert role != "tenant" or claims["tenant"] == name
        tokens[name] = body["token"]
    for name, pw in (("acme", beta_pw), ("dev1", acme_pw), ("acme", acme_pw + "x"), ("nobody", acme_pw)):
        status, body, _ = _grant(c, name, pw)
        assert status == 401 and "error" in body, (name, status, body)
    # A RideShare user's token (issued by test_gateway_auth's real login; here made with the secret).
    tokens["user"] = issue(SECRET, "alice", "user", 600, tenant="rideshare")
    tokens[None] = None

    everyone = {None, "admin", "acme", "beta", "dev1", "user"}
    rules = [  # (method, path, who may)
        ("POST", "/api/v1/tenants", {"admin"}), ("GET", "/api/v1/tenants", {"admin"}),
        ("DELETE", "/api/v1/tenants/acme", {"admin"}), ("POST", "/api/v1/developers", {"admin"}),
        ("GET", "/api/v1/tenants/acme/apps", {"admin", "acme", "dev1"}),   # a developer reads, changes nothing
        ("PUT", "/api/v1/tenants/beta/apps/shop", {"admin", "beta"}),
        ("POST", "/api/v1/db/read", {"admin", "acme", "beta"}), ("POST", "/api/v1/db/write", {"admin", "acme", "beta"}),
        ("POST", "/api/v1/db/clear", {"admin", "acme", "beta"}),
        ("GET", "/api/v1/cluster", {"admin", "dev1"}), ("GET", "/api/v1/worker/list", {"admin", "dev1"}),
        ("GET", "/api/v1/logs", {"admin", "dev1", "acme", "beta"}), ("POST", "/api/v1/logs", {"admin", "acme", "beta"}),
        ("POST", "/api/v1/crash/slave", {"admin"}), ("POST", "/api/v1/switchover", {"admin"}),
        ("GET", "/api/v1/users/alice", everyone),
    ]
    before = Client(orch).get("/_stats")[1]["requests"]
    reached = 0
    for method, path, allowed in rules:
        for who in sorted(everyone, key=str):
            # Identity headers a client sends never get through.
            forged = {"X-Stratus-Role": "admin", "X-Stratus-Tenant": "beta", "X-Stratus-Subject": "admin"}
            status, body, _ = c.request(method, path, {"tenant": "x"}, headers={**_auth(tokens[who]), **forged})
            if who not in allowed:
                assert status == (401 if who is None else 403) and "error" in body, (method, path, who, status, body)
                continue
            assert status == 200 and body["path"] == path, (method, path, who, status, body)
            reached += path.startswith("/api/v1/") and not path.startswith("/api/v1/users")
            expected = {} if who is None else {"x-stratus-role": jwt.decode(tokens[who], SECRET, algorithms=["HS256"])["role"],
                                               "x-stratus-subject": "alice" if who == "user" else who}
            if who in ("acme", "beta"):
                expected["x-stratus-tenant"] = who
            if who == "user":
                expected["x-stratus-tenant"] = "rideshare"
            assert _identity(body) == expected, (method, path, who, body["headers"])
    # Only the allowed requests reached the orchestrator.
    assert Client(orch).get("/_stats")[1]["requests"] == before + reached


def test_a_bus_the_gateway_cannot_reach_is_503_not_401(cluster):
    gw = start_gateway(cluster, STRATUS_ADMIN_PASSWORD="pw-admin", STRATUS_AMQP_URL="amqp://nobody:none@127.0.0.1:1/%2F")
    c = Client(gw)
    for name in ("acme", "Alice Smith"):   # a possible platform account; a possible RideShare user only
        status, body, _ = _grant(c, name, "whatever")
        assert status == 503 and "error" in body, (name, status, body)
    assert _grant(c, "admin", "pw-admin")[0] == 200   # the admin's login needs no bus
    assert _grant(c, "admin", "wrong")[0] == 401


def _hammer(port, path, token, stop: threading.Event, out: list) -> None:
    c = Client(port)
    while not stop.is_set():
        status, body, resp = c.get(path, headers=_auth(token))
        out.append((time.monotonic(), status, body, resp.getheader("Retry-After")))


def test_a_tenant_over_its_rate_gets_429_and_no_other_tenant_does(cluster):
    for svc in ("orchestrator", "users", "catalog"):
        start_upstream(cluster, svc, svc)
    gw = start_gateway(cluster, STRATUS_TOKEN_SECRET=SECRET, STRATUS_TENANT_RATE=5, STRATUS_TENANT_BURST=10)
    for svc in ("orchestrator", "users", "catalog"):
        wait_healthy(gw, svc, 1)
    acme = issue(SECRET, "acme", "tenant", 600, tenant="acme")
    acme_user = issue(SECRET, "carol", "user", 600, tenant="acme")
    beta = issue(SECRET, "beta", "tenant", 600, tenant="beta")
    rideshare_user = issue(SECRET, "alice", "user", 600, tenant="rideshare")

    stop, acme_answers = threading.Event(), []
    t0 = time.monotonic()
    t = threading.Thread(target=_hammer, args=(gw, "/api/v1/tenants/acme/apps", acme, stop, acme_answers), daemon=True)
    t.start()
    try:
        wait_until(lambda: any(a[1] == 429 for a in acme_answers), 30, what="acme to be throttled")
        # While acme is throttled: beta (within its burst), the built-in tenants (no limit by default,
        # with and without a token), and unauthenticated requests are all served.
        c = Client(gw)
        beta_statuses = [c.get("/api/v1/tenants/beta/apps", headers=_auth(beta))[0] for _ in range(8)]
        builtin = [c.get(p, headers=_auth(tok))[0] for _ in range(150)
                   for p, tok in (("/api/v1/users/x", rideshare_user), ("/products/Tux", None))]
        # A user token of acme counts against acme, whatever route it goes to (a few tries: acme's
        # bucket gets a token every 0.2 s, which the hammering thread nearly always takes first).
        for _ in range(5):
            user_status, user_body, user_resp = c.get("/products/Tux", headers=_auth(acme_user))
            if user_status == 429:
                break
        during = len(acme_answers)
        wait_until(lambda: len(acme_answers) > during + 5, 30, what="acme to keep going")
    finally:
        stop.set()
        t.join(30)
    elapsed = time.monotonic() - t0

    assert beta_statuses == [200] * 8, beta_statuses
    assert set(builtin) == {200}, sorted(set(builtin))
    assert user_status == 429 and "acme" in user_body["error"], (user_status, user_body)
    assert int(user_resp.getheader("Retry-After")) >= 1
    ok = [a for a in acme_answers if a[1] == 200]
    throttled = [a for a in acme_answers if a[1] == 429]
    assert {a[1] for a in acme_answers} <= {200, 429}, {a[1] for a in acme_answers}
    # At most the burst plus what the rate refilled meanwhile (beta's and the built-ins' requests took none).
    assert len(ok) <= 10 + 5 * elapsed + 1, (len(ok), elapsed)
    assert len(ok) >= 10, len(ok)   # the burst itself was served
    for _, _, body, retry_after in throttled:
        assert "error" in body and retry_after is not None and retry_after.isdigit() and int(retry_after) >= 1
    # acme was still throttled after beta's requests, so they ran while it was.
    assert any(a[1] == 429 for a in acme_answers[during:])
    got = bmetrics.parse(Client(gw).get("/metrics")[1])
    throttled = {dict(ls)["tenant"]: v for (name, ls), v in got.items() if name == "stratus_gateway_throttled_total"}
    assert throttled.get("acme", 0) >= 1 and set(throttled) == {"acme"}, throttled


def test_a_rate_for_the_built_in_tenants_is_a_setting(cluster):
    start_upstream(cluster, "users", "users")
    start_upstream(cluster, "catalog", "catalog")
    gw = start_gateway(cluster, STRATUS_BUILTIN_RATE=2)   # a burst of 4
    wait_healthy(gw, "users", 1)
    wait_healthy(gw, "catalog", 1)
    c = Client(gw)
    t0 = time.monotonic()
    statuses = [c.get("/api/v1/users")[0] for _ in range(40)]
    elapsed = time.monotonic() - t0
    assert statuses[:4] == [200] * 4 and 429 in statuses and set(statuses) == {200, 429}, statuses
    assert statuses.count(200) <= 4 + 2 * elapsed + 1, (statuses, elapsed)
    assert [c.get("/products/Tux")[0] for _ in range(4)] == [200] * 4   # toystore has a bucket of its own


def test_in_front_of_the_real_orchestrator(cluster):
    """The admin creates tenants and a developer through the gateway; each logs
    in; a tenant's token reaches its own tenant's db routes only (403 for
    another's, from the orchestrator, which reads the gateway's headers); the
    admin's reaches any; a deleted tenant cannot log in any more."""
    with real_orchestrator(cluster):
        gw = start_gateway(cluster, STRATUS_TOKEN_SECRET=SECRET, STRATUS_ADMIN_PASSWORD="pw-admin")
        wait_healthy(gw, "orchestrator", 1, timeout=60)
        c = Client(gw)
        admin = _auth(_grant(c, "admin", "pw-admin")[1]["token"])
        wait_until(lambda: c.get("/api/v1/worker/list", headers=admin)[1], 60, what="the orchestrator's workers")
        created = []
        try:
            pw = {}
            for name in ("acme", "beta"):
                status, body, _ = c.request("POST", "/api/v1/tenants", {"name": name}, headers=admin)
                assert status == 201 and body["name"] == name, (status, body)
                created.append(name)
                pw[name] = body["password"]
            status, body, _ = c.request("POST", "/api/v1/developers", {"username": "dev1"}, headers=admin)
            assert status == 201, (status, body)
            status, body, _ = _grant(c, "dev1", body["password"])
            assert status == 200 and body["role"] == "developer", body
            dev = _auth(body["token"])
            tok = {}
            for name in ("acme", "beta"):
                status, body, _ = _grant(c, name, pw[name])
                assert status == 200 and body["role"] == "tenant", body
                assert jwt.decode(body["token"], SECRET, algorithms=["HS256"])["tenant"] == name
                tok[name] = _auth(body["token"])

            table = ops.create_table("notes", [ops.column("k", "text", nullable=False)], ["k"])
            status, body, _ = c.request("POST", "/api/v1/db/write", {"ops": [table]}, headers=tok["acme"])
            assert status == 200, (status, body)
            status, body, _ = c.request("POST", "/api/v1/db/write",
                                        {"ops": [ops.insert("notes", {"k": "a"})]},
                                        headers=tok["acme"])
            assert status == 200, (status, body)
            read = {"op": "select", "table": "notes"}
            status, body, _ = c.request("POST", "/api/v1/db/read", read, headers=tok["acme"])
            assert status == 200 and body == [{"k": "a"}], (status, body)
            # Naming another tenant: 403, whatever the route.
            for route, payload in (("read", read), ("write", {"ops": [table]}), ("clear", {})):
                status, body, _ = c.request("POST", f"/api/v1/db/{route}", {**payload, "tenant": "beta"},
                                            headers=tok["acme"])
                assert status == 403 and "error" in body, (route, status, body)
            # beta's own namespace has no such table: acme's is out of its reach.
            status, body, _ = c.request("POST", "/api/v1/db/read", read, headers=tok["beta"])
            assert status == 400 and body.get("code") == "unknown_table", (status, body)
            # The admin reaches any tenant; the developer none.
            status, body, _ = c.request("POST", "/api/v1/db/read", {**read, "tenant": "acme"}, headers=admin)
            assert status == 200 and body == [{"k": "a"}], (status, body)
            assert c.request("POST", "/api/v1/db/read", read, headers=dev)[0] == 403
            # Tenant owners cannot manage tenants.
            assert c.request("DELETE", "/api/v1/tenants/beta", headers=tok["acme"])[0] == 403
            assert c.request("POST", "/api/v1/tenants", {"name": "gamma"}, headers=tok["acme"])[0] == 403
            assert c.request("GET", "/api/v1/tenants", headers=dev)[0] == 403

            status, body, _ = c.request("DELETE", "/api/v1/tenants/beta", headers=admin)
            assert status == 200, (status, body)
            created.remove("beta")
            assert _grant(c, "beta", pw["beta"])[0] == 401
            # Its token lives until it expires, but its database is gone.
            status, body, _ = c.request("POST", "/api/v1/db/read", read, headers=tok["beta"])
            assert status == 404 and "error" in body, (status, body)
        finally:
            for name in created:   # their broker accounts too
                c.request("DELETE", f"/api/v1/tenants/{name}", headers=admin)
