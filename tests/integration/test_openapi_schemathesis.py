"""Schemathesis against a running platform (issue 15, OpenAPI): every
operation of orchestrator/openapi.py is called with generated requests, valid
and invalid, twice: on the orchestrator's own port (which acts as the
admin) and through a real gateway with an admin token. Every answer must

    not be a server error        (not_a_server_error: no 5xx at all; the 503s
                                  and 504s the document lists are for a
                                  platform whose ZooKeeper, broker or DB is
                                  away, which this one's are not)
    have a listed status         (status_code_conformance)
    have the listed media type   (content_type_conformance)
    carry its required headers   (response_headers_conformance: X-Stratus-LSN)
    match its schema             (response_schema_conformance).

The platform is the test's own: a LocalCluster namespace on the real
RabbitMQ and ZooKeeper, a real `python -m orchestrator`
(tests/kits/testkit.py real_orchestrator) that starts the DB master, and a
real gateway (testkit start_gateway). The tenant instance quota is 2
(STRATUS_TENANT_INSTANCES), so generated deploys and scales start few
processes on a 2-core machine.

Excluded, and only these: POST /api/v1/crash/master, /api/v1/crash/slave
and /api/v1/switchover, which kill or depose the master of the cluster
under test; and on the orchestrator's port POST /api/v1/auth/token, which
only the gateway answers.

Hand-made requests first (Platform.known): each operation's success and its
main refusals, with the statuses they must get, since generated requests
seldom reach them. Then generated ones, steered: generated tenant names are
almost never tenants, so a seeded tenant with a deployed app (a real
package, one web instance) exists before the run, and about half the
generated tenant-scoped requests (chosen by a hash of the generated values,
so a run is reproducible) name it and its apps instead. DELETE
/api/v1/tenants/{t} is never steered.

Clean-up: tenants the run creates are deleted at the end (the list, then
DELETE of every name that was not there before), and the module fails if
any is left; broker accounts of created tenants are removed in any case.

Examples per operation and target: STRATUS_OPENAPI_EXAMPLES (default 25:
the whole module in well under ~3 minutes on 2 cores)."""
from __future__ import annotations

import hashlib
import io
import os
import re
import sys
import tarfile
import uuid
from collections import Counter

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,
                                               response_schema_conformance, status_code_conformance)

from bus import tenancy
from bus.broker_admin import BrokerAdmin
from harness import LocalCluster, wait_for
from kits.testkit import real_orchestrator, start_gateway
from orchestrator import openapi

EXAMPLES = int(os.environ.get("STRATUS_OPENAPI_EXAMPLES", "25"))
EXCLUDED = r"^/api/v1/(crash/|switchover$)"       # both targets
GATEWAY_ONLY = r"^/api/v1/auth/token$"            # not on the orchestrator's port
TARGETS = ("orchestrator", "gateway")
ADMIN_PASSWORD = f"pw-{uuid.uuid4().hex}"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
# Packages go up as application/gzip too: sent as they are, like application/octet-stream.
schemathesis.serializer.alias("application/gzip", "application/octet-stream")
APP, SPARE, DOOMED, ROLE = "shop", "spare", "doomed", "web"

WEB = """\
import http.server, json, os

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"ok": True, "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""


def package() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = WEB.encode()
        info = tarfile.TarInfo("web.py")
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Platform:
    """The running orchestrator, the seeded tenant and what the run created."""

    def __init__(self, cluster: LocalCluster, port: int):
        self.cluster = cluster
        self.base = f"http://127.0.0.1:{port}"
        self.http = requests.Session()
        self.seed = f"oa{uuid.uuid4().hex[:8]}"
        self.before: set[str] = set()
        self.created: set[str] = set()
        self.seed_view: dict = {}
        self.targets: dict[str, tuple[str, dict]] = {"orchestrator": (self.base, {})}

    def add_gateway(self, port: int) -> None:
        """The gateway as a second target, with an admin token."""
        base = f"http://127.0.0.1:{port}"
        r = self.http.post(base + "/api/v1/auth/token", json={"username": "admin", "password": ADMIN_PASSWORD},
                           timeout=30)
        assert r.status_code == 200, (r.status_code, r.text)
        self.targets["gateway"] = (base, {"Authorization": f"Bearer {r.json()['token']}"})

    def call(self, method: str, path: str, **kw) -> requests.Response:
        return self.http.request(method, self.base + path, timeout=60, **kw)

    def tenants(self) -> set[str]:
        r = self.call("GET", "/api/v1/tenants")
        assert r.status_code == 200, (r.status_code, r.text)
        return {t["name"] for t in r.json()}

    def ready(self) -> bool:
        """The master serves: a tenant list needs a read of the accounts table."""
        try:
            return self.call("GET", "/api/v1/tenants").status_code == 200
        except requests.RequestException:
            return False

    def create_tenant(self, name: str) -> None:
        r = self.call("POST", "/api/v1/tenants", json={"name": name})
        assert r.status_code == 201, (r.status_code, r.text)
        self.created.add(name)

    def deploy(self, app: str, instances: int) -> dict:
        """Upload the package and deploy `app` of the seeded tenant: one web role."""
        base = f"/api/v1/tenants/{self.seed}/apps/{app}"
        r = self.call("PUT", base + "/package", data=package(), headers={"Content-Type": "application/gzip"})
        assert r.status_code == 201, (r.status_code, r.text)
        r = self.call("PUT", base, json=manifest(f"/{self.seed}-{app}", instances))
        assert r.status_code in (200, 201), (r.status_code, r.text)
        return r.json()

    def seed_apps(self) -> None:
        self.create_tenant(self.seed)
        self.seed_view = self.deploy(APP, 1)
        self.upload(SPARE)

    def upload(self, app: str) -> None:
        r = self.call("PUT", f"/api/v1/tenants/{self.seed}/apps/{app}/package", data=package(),
                      headers={"Content-Type": "application/gzip"})
        assert r.status_code == 201, (r.status_code, r.text)

    def steer(self, case) -> None:
        """Make about half the generated tenant-scoped requests name the
        seeded tenant and its apps (see the module docstring)."""
        params = case.path_parameters or {}
        body = case.body if isinstance(case.body, dict) else None
        coin = int(hashlib.sha1(repr((params, case.query, body)).encode()).hexdigest(), 16) % 2 == 0
        if not coin:
            return
        path, method = case.operation.path, case.method.upper()
        if "t" in params and path != "/api/v1/tenants/{t}":
            params["t"] = self.seed
            if "a" in params:
                # Changing or deleting "shop" would leave later operations only 404s.
                params["a"] = {("PUT", "/api/v1/tenants/{t}/apps/{a}"): SPARE,
                               ("PUT", "/api/v1/tenants/{t}/apps/{a}/package"): SPARE,
                               ("DELETE", "/api/v1/tenants/{t}/apps/{a}"): SPARE}.get((method, path), APP)
            if "r" in params:
                params["r"] = ROLE
        if path.startswith("/api/v1/db/") and body is not None and "tenant" in body:
            body["tenant"] = self.seed

    def record(self, case, response) -> None:
        if case.operation.path == "/api/v1/tenants" and case.method.upper() == "POST" \
                and response.status_code == 201:
            self.created.add(response.json()["name"])

    def known(self, label: str, target: str) -> list[tuple[dict, set[int]]]:
        """Hand-made requests for `label` that reach its success and its
        refusals (generated ones seldom do): (Case arguments, statuses)."""
        t, s, g = self.seed, {"t": self.seed}, target[0]   # g: names made per target
        shop, spare, role = {**s, "a": APP}, {**s, "a": SPARE}, {**s, "a": APP, "r": ROLE}
        paas_example = {"roles": {
            "web": {"kind": "web", "command": ["python", "-m", "shop.web"], "instances": 2, "routes": ["/shop"],
                    "health": "/health", "env": {"GREETING": "hi"}},
            "jobs": {"kind": "worker", "command": ["python", "-m", "shop.jobs"], "instances": 1}}}
        doomed = f"{DOOMED}-{g}"
        if label == "DELETE /api/v1/tenants/{t}":
            self.create_tenant(f"{t}-d{g}")
        if label == "DELETE /api/v1/tenants/{t}/apps/{a}":
            self.deploy(doomed, 0)
        if label == "POST /api/v1/tenants":
            self.created.add(f"{t}-n{g}")
        cases = {   # label: [(Case arguments, the statuses it may answer)]
            "POST /api/v1/tenants": [({"body": {"name": f"{t}-n{g}"}}, {201}), ({"body": {"name": f"{t}-n{g}"}}, {409}),
                                     ({"body": {"name": "admin"}}, {400}), ({"body": {"name": "Bad Name"}}, {400}),
                                     ({"body": {"name": "x" * 70_000}}, {413})],   # over 64 KiB
            "GET /api/v1/tenants": [({}, {200})],
            "DELETE /api/v1/tenants/{t}": [({"path_parameters": {"t": f"{t}-d{g}"}}, {200}),
                                           ({"path_parameters": {"t": f"{t}-d{g}"}}, {404})],
            "POST /api/v1/developers": [({"body": {"username": f"{t}-dev{g}"}}, {201}),
                                        ({"body": {"username": f"{t}-dev{g}"}}, {409})],
            "GET /api/v1/tenants/{t}/apps": [({"path_parameters": s}, {200})],
            "PUT /api/v1/tenants/{t}/apps/{a}": [
                ({"path_parameters": spare, "body": manifest(f"/{t}-spare", 0)}, {200, 201}),
                ({"path_parameters": spare, "body": manifest(f"/{t}-spare", 0, V=g)}, {200}),
                ({"path_parameters": spare, "body": manifest("/api/v1/db", 0)}, {409}),
                ({"path_parameters": spare, "body": paas_example}, {409})],   # 1 + 1 + 3 instances > 2
            "GET /api/v1/tenants/{t}/apps/{a}": [({"path_parameters": shop}, {200})],
            "DELETE /api/v1/tenants/{t}/apps/{a}": [({"path_parameters": {**s, "a": doomed}}, {200}),
                                                    ({"path_parameters": {**s, "a": doomed}}, {404})],
            "PUT /api/v1/tenants/{t}/apps/{a}/package": [
                ({"path_parameters": spare, "body": package(), "media_type": "application/gzip"}, {201}),
                ({"path_parameters": spare, "body": b"not a tar.gz", "media_type": "application/octet-stream"},
                 {400})],
            "PATCH /api/v1/tenants/{t}/apps/{a}/roles/{r}": [
                ({"path_parameters": role, "body": {"instances": 1}}, {200}),
                ({"path_parameters": role, "body": {"instances": 16}}, {400, 409}),
                ({"path_parameters": {**role, "r": "nope"}, "body": {"instances": 1}}, {404})],
            "POST /api/v1/tenants/{t}/apps/{a}/restart": [({"path_parameters": shop}, {202})],
            "GET /api/v1/tenants/{t}/events": [({"path_parameters": s, "query": {"since": 0}}, {200}),
                                               # a 5 KB request line: a JSON 400 like any bad since
                                               ({"path_parameters": s, "query": {"since": "x" * 5000}}, {400})],
            "GET /api/v1/logs": [({}, {200}), ({"query": {"component": "nosuch", "limit": 5}}, {404})],
            "POST /api/v1/db/read": [({"body": {"op": "tables", "tenant": t}}, {200}),
                                     ({"body": {"op": "select", "table": "nosuch", "tenant": t}}, {400})],
            "POST /api/v1/db/write": [
                ({"body": {"tenant": t, "ops": [
                    {"op": "create_table", "table": "notes", "primary_key": ["id"],
                     "columns": [{"name": "id", "type": "integer"}, {"name": "text", "type": "text"}]},
                    {"op": "upsert", "table": "notes", "values": {"id": 1, "text": "hi"}}]}}, {200}),
                ({"body": {"tenant": t, "ops": [{"op": "insert", "table": "notes", "values": {"id": 1}}]}}, {400})],
            "POST /api/v1/db/clear": [({"body": {"tenant": t}}, {200})],
            "GET /api/v1/worker/list": [({}, {200})],
            "GET /api/v1/cluster": [({}, {200})],
            "GET /api/v1/openapi.json": [({}, {200})],
            "GET /health": [({}, {200})],
            "POST /api/v1/auth/token": [
                ({"body": {"username": "admin", "password": ADMIN_PASSWORD}}, {200}),
                ({"body": {"username": "admin", "password": "wrong"}}, {401}),
                ({"body": {"username": "", "password": "x"}}, {400})],
            "GET /metrics": [({}, {200})],
        }
        found = cases.get(label, [])
        if target == "gateway" and label == "GET /api/v1/tenants":
            found = found + [({"headers": {"Authorization": "Bearer not-a-token"}}, {401})]
        return found

    def clean_up(self) -> list[str]:
        """Delete every tenant that was not there before; the names left."""
        for name in sorted(self.tenants() - self.before):
            r = self.call("DELETE", f"/api/v1/tenants/{name}")
            assert r.status_code in (200, 404), (name, r.status_code, r.text)
        return sorted(self.tenants() - self.before)


def manifest(route: str, instances: int, **env: str) -> dict:
    return {"roles": {ROLE: {"kind": "web", "command": [sys.executable, "web.py"], "instances": instances,
                             "routes": [route], "env": env}}}


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    cluster = LocalCluster(tmp_path_factory.mktemp("openapi"), max_slaves=0, tenant_instances=2)
    admin = BrokerAdmin(cluster.settings)
    p = None
    try:
        with real_orchestrator(cluster) as port:
            p = Platform(cluster, port)
            wait_for(p.ready, 60, 0.25, what="the orchestrator to list tenants (a master serving)")
            p.before = p.tenants()
            p.seed_apps()
            p.add_gateway(start_gateway(cluster, STRATUS_ADMIN_PASSWORD=ADMIN_PASSWORD,
                                        STRATUS_ORCHESTRATOR_PORT=port))
            try:
                yield p
            finally:
                left = p.clean_up()
                assert not left, f"tenants the run created are still listed: {left}"
    finally:
        for name in (p.created if p else ()):
            admin.delete_user(tenancy.broker_user(cluster.name, name))
        cluster.close()


@pytest.fixture(scope="module")
def api_schemas(platform):
    """One loaded document per target, with the target's base URL."""
    out = {}
    for target, (base, _) in platform.targets.items():
        schema = schemathesis.openapi.from_dict(openapi.describe()).exclude(path_regex=EXCLUDED)
        if target != "gateway":
            schema = schema.exclude(path_regex=GATEWAY_ONLY)
        schema.config.update(base_url=base)
        out[target] = schema
    return out


def labels() -> list[tuple[str, str]]:
    """(target, operation) for every operation of the document but the excluded ones."""
    doc = openapi.describe()
    ops = [(m.upper(), p) for p, item in doc["paths"].items() for m in item
           if m in ("get", "put", "post", "delete", "patch") and not re.match(EXCLUDED, p)]
    return [(t, f"{m} {p}") for t in TARGETS for m, p in ops if t == "gateway" or not re.match(GATEWAY_ONLY, p)]


def strategy(op):
    """Valid and invalid requests (invalid only where the operation takes input)."""
    modes = [GenerationMode.POSITIVE]
    if op.path_parameters or op.query or op.body:
        modes.append(GenerationMode.NEGATIVE)
    return st.one_of(*(op.as_strategy(generation_mode=m) for m in modes))


def test_the_seeded_app_view_conforms(platform, api_schemas):
    """The app view of a real deployed app (with its instance once the
    controller reports it) matches the document's App schema."""
    path = f"/api/v1/tenants/{platform.seed}/apps/{APP}"
    op = api_schemas["orchestrator"]["/api/v1/tenants/{t}/apps/{a}"]["GET"]

    def listed():
        r = platform.call("GET", path)
        assert r.status_code == 200, (r.status_code, r.text)
        return r if r.json()["roles"][ROLE]["instances"] else None
    r = wait_for(listed, 30, 0.25, what="the seeded app's instance to be listed")
    op.validate_response(r)
    assert platform.seed_view["roles"][ROLE]["desired"] == 1


@pytest.mark.parametrize("target", TARGETS)
def test_the_served_document_is_this_one(platform, target):
    base, auth = platform.targets[target]
    r = platform.http.get(base + openapi.OPENAPI_PATH, timeout=30)   # no token: the document is public
    assert r.status_code == 200, (r.status_code, r.text[:300])
    assert r.json() == openapi.describe()


@pytest.mark.parametrize("target,label", labels())
def test_every_answer_conforms(platform, api_schemas, target, label):
    op = api_schemas[target].find_operation_by_label(label)
    assert op is not None, label
    auth = platform.targets[target][1]
    calls = []
    for kw, expected in platform.known(label, target):
        case = op.Case(**kw)
        response = case.call(headers={} if "headers" in kw else auth, timeout=60)
        calls.append(response.status_code)
        case.validate_response(response, checks=CHECKS)
        assert response.status_code in expected, \
            f"{label} {kw}: {response.status_code} {response.text[:300]}, expected {sorted(expected)}"

    # No shrinking: a failure is reported as generated, and a run stays short.
    @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(case=strategy(op))
    def run(case):
        platform.steer(case)
        response = case.call(headers=auth, timeout=60)
        calls.append(response.status_code)
        platform.record(case, response)
        case.validate_response(response, checks=CHECKS)

    try:
        run()
    finally:
        print(f"{target} {label}: {len(calls)} requests, statuses {dict(sorted(Counter(calls).items()))}")
    assert calls, f"{label}: no request was made"
