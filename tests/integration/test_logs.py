"""Logs of a real run (orchestrator/logs.py; paas.md, the logs row; issue 15,
Logs): a real orchestrator (which starts the DB workers, their output in
<cluster state>/logs/<id>.log), the users service and a gateway (their
output in <state>/logs/<name>.log, as `stratus up` keeps it) on a test
cluster. One request sent with an X-Request-Id is found by q=<request id>
in the gateway's access line, the service's line and the master worker's
write line, in that order of time, newest last. The route is served by the
blueprint on a Flask app built here with the orchestrator's own identity
function (the orchestrator wires the same blueprint in)."""
from __future__ import annotations

import hashlib
import urllib.parse
import uuid

from bus.service import base_app
from orchestrator import logs
from orchestrator.api import identity
from kits.testkit import Client, free_port, real_orchestrator, start_gateway, wait_healthy, wait_until

TENANT = {"X-Stratus-Role": "tenant", "X-Stratus-Subject": "rideshare", "X-Stratus-Tenant": "rideshare"}
DEVELOPER = {"X-Stratus-Role": "developer", "X-Stratus-Subject": "dev1"}


def test_one_request_id_from_the_gateway_to_the_worker(cluster):
    cluster.log_dir = cluster.settings.state_path / "logs"     # where `stratus up` puts its components' output
    cluster.log_dir.mkdir(parents=True, exist_ok=True)
    with real_orchestrator(cluster) as orch_port:
        def ready_master():
            status, view, _ = Client(orch_port, timeout=2).get("/api/v1/cluster")
            return status == 200 and next((w["id"] for w in view["workers"]
                                           if w["role"] == "master" and w["ready"]), None)
        master = wait_until(ready_master, 60, what="a ready master started by the orchestrator")
        cluster.spawn("users", ["-m", "users"], STRATUS_USERS_PORT=str(free_port()))
        gw = start_gateway(cluster)
        wait_healthy(gw, "users", 1, timeout=60)
        c = Client(gw)
        wait_until(lambda: c.get("/api/v1/users")[0] in (200, 204), 60, what="the users tables")

        rid = f"logs-{uuid.uuid4().hex}"
        name = f"u{uuid.uuid4().hex[:10]}"
        status, body, resp = c.request("PUT", "/api/v1/users",
                                       {"username": name, "password": hashlib.sha1(name.encode()).hexdigest()},
                                       headers={"X-Request-Id": rid})
        assert status == 201, (status, body)
        assert resp.getheader("X-Request-Id") == rid

        app = base_app("orchestrator")
        logs.register(app, cluster.settings, identity)
        api = app.test_client()

        def followed():
            r = api.get(f"/api/v1/logs?q={urllib.parse.quote(rid)}")
            assert r.status_code == 200, r.json
            comps = [x["component"] for x in r.json["lines"]]
            return r.json["lines"] if {"gateway", "users", master} <= set(comps) else None
        lines = wait_until(followed, 20, what=f"{rid} in the gateway's, the service's and the worker's logs")
        assert all(rid in x["line"] for x in lines)
        by = {x["component"]: x for x in lines}
        assert f"rid={rid}" in by["gateway"]["line"] and "PUT /api/v1/users 201" in by["gateway"]["line"]
        assert f"[{rid}]" in by["users"]["line"] and "PUT /api/v1/users 201" in by["users"]["line"]
        assert f"write {rid}/" in by[master]["line"] and "tenant rideshare lsn" in by[master]["line"]
        times = [x["time"] for x in lines]
        assert times == sorted(times)   # newest last
        assert by[master]["time"] <= by["users"]["time"] <= by["gateway"]["time"], lines

        # The developer reads the same; a component alone; since drops what is older.
        r = api.get(f"/api/v1/logs?q={urllib.parse.quote(rid)}", headers=DEVELOPER)
        assert r.status_code == 200 and r.json["lines"] == lines
        r = api.get(f"/api/v1/logs?component={master}&limit=5")
        assert r.status_code == 200 and 0 < len(r.json["lines"]) <= 5
        assert {x["component"] for x in r.json["lines"]} == {master}
        r = api.get(f"/api/v1/logs?component=gateway&since={by['gateway']['time'] + 3600}")
        assert r.status_code == 200 and r.json["lines"] == []

        # A tenant owner reads its own instances only (rideshare's services are
        # platform components here, so it has none); no credential is served.
        r = api.get(f"/api/v1/logs?q={urllib.parse.quote(rid)}", headers=TENANT)
        assert r.status_code == 200 and r.json["lines"] == []
        for comp in ("gateway", master, "users"):
            r = api.get(f"/api/v1/logs?component={comp}", headers=TENANT)
            assert r.status_code == 403 and "error" in r.json, (comp, r.status_code)
        password = urllib.parse.urlsplit(cluster.settings.amqp_url).password
        r = api.get("/api/v1/logs?limit=10000")
        assert r.status_code == 200 and len(r.json["lines"]) > 10
        assert not [x for x in r.json["lines"] if password and f":{password}@" in x["line"]]
