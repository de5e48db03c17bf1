"""The platform's OpenAPI document (orchestrator/openapi.py, issue 15):

- it is valid OpenAPI 3.0 (schemathesis's validator, which checks the
  document against the OpenAPI meta-schema) and every $ref resolves;
- the routes it describes are the routes that exist: every route the
  orchestrator's Flask app (orchestrator.api.create_app) registers is
  described, every described route but the gateway's own is served by the
  orchestrator, and the gateway routes every described path somewhere;
- every route lists the statuses paas.md, platform.md and rideshare.md give
  it, and every failure answer is a JSON object with "error";
- the manifest schema agrees with orchestrator.apps.manifest: a manifest the
  document's schema refuses is refused by the code (400), and what the code
  accepts (as it stores it) the schema accepts;
- register(app) serves the document at GET /api/v1/openapi.json.

Pure: no broker, no ZooKeeper (create_app is built, never served)."""
from __future__ import annotations

import json
import re

import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings, strategies as st

from gateway import router
from orchestrator import openapi
from orchestrator.api import create_app
from orchestrator.apps import manifest as mf

METHODS = {"get", "put", "post", "delete", "patch"}
PARAM = re.compile(r"<[^>]+>|\{[^}]+\}")

# Statuses each route must list, from the contracts' tables (success first).
CONTRACT = {
    ("post", "/api/v1/tenants"): (201, 400, 409),
    ("get", "/api/v1/tenants"): (200,),
    ("delete", "/api/v1/tenants/{t}"): (200, 404),
    ("post", "/api/v1/developers"): (201, 400, 409),
    ("put", "/api/v1/tenants/{t}/apps/{a}/package"): (201, 400, 413),
    ("put", "/api/v1/tenants/{t}/apps/{a}"): (201, 200, 400, 409),
    ("get", "/api/v1/tenants/{t}/apps"): (200,),
    ("get", "/api/v1/tenants/{t}/apps/{a}"): (200, 404),
    ("patch", "/api/v1/tenants/{t}/apps/{a}/roles/{r}"): (200, 400, 404, 409),
    ("post", "/api/v1/tenants/{t}/apps/{a}/restart"): (202, 404),
    ("delete", "/api/v1/tenants/{t}/apps/{a}"): (200, 404),
    ("get", "/api/v1/tenants/{t}/events"): (200,),
    ("get", "/api/v1/logs"): (200, 403),
    ("post", "/api/v1/db/read"): (200, 400),
    ("post", "/api/v1/db/write"): (200, 400, 507),
    ("post", "/api/v1/db/clear"): (200,),
    ("post", "/api/v1/crash/master"): (200, 409, 503),
    ("post", "/api/v1/crash/slave"): (200, 409),
    ("get", "/api/v1/worker/list"): (200,),
    ("get", "/api/v1/cluster"): (200,),
    ("post", "/api/v1/switchover"): (200,),
    ("get", "/api/v1/openapi.json"): (200,),
    ("get", "/health"): (200,),
    ("get", "/metrics"): (200,),
    ("post", "/api/v1/auth/token"): (200, 401),
}
# Routes that need a token through the gateway: 401 without one, 403 with the wrong role.
PUBLIC = {("get", "/api/v1/openapi.json"), ("get", "/health"), ("get", "/metrics"), ("post", "/api/v1/auth/token")}


def operations(doc: dict):
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                yield method, path, op


def norm(path: str) -> str:
    return PARAM.sub("{}", path)


def resolve(doc: dict, ref: str):
    assert ref.startswith("#/"), ref
    node = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def deref(doc: dict, node: dict) -> dict:
    while "$ref" in node:
        node = resolve(doc, node["$ref"])
    return node


# --- a JSON Schema validator for the document's schemas (OpenAPI 3.0 -> JSON Schema) -------
def _to_json_schema(node):
    if isinstance(node, list):
        return [_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _to_json_schema(v) for k, v in node.items() if k not in ("nullable", "example")}
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


def validator(name: str):
    doc = openapi.describe()
    root = {"$ref": f"#/components/schemas/{name}", "components": _to_json_schema(doc["components"])}
    return jsonschema_rs.Draft4Validator(root)


# --- the document --------------------------------------------------------------------------
def test_the_document_is_valid_openapi():
    doc = openapi.describe()
    assert doc["openapi"].startswith("3.0")
    schema = schemathesis.openapi.from_dict(doc)
    schema.validate()   # raises on any violation of the OpenAPI 3.0 meta-schema
    labels = {r.ok().label for r in schema.get_all_operations()}
    assert len(labels) == sum(1 for _ in operations(doc)) == len(CONTRACT)


def test_the_validator_refuses_a_broken_document():
    """The validity check above can fail: a document without a title, or with
    a response code that is not one, is refused."""
    doc = openapi.describe()
    del doc["info"]["title"]
    with pytest.raises(jsonschema_rs.ValidationError):
        schemathesis.openapi.from_dict(doc).validate()
    doc = openapi.describe()
    doc["paths"]["/health"]["get"]["responses"]["2xx-ish"] = {"description": "no"}
    with pytest.raises(jsonschema_rs.ValidationError):
        schemathesis.openapi.from_dict(doc).validate()


def test_every_ref_resolves():
    doc = openapi.describe()
    refs = []

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                refs.append(node["$ref"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(doc)
    assert refs
    for ref in refs:
        resolve(doc, ref)   # KeyError if it dangles


def test_describe_returns_a_copy():
    a = openapi.describe()
    a["paths"].clear()
    assert openapi.describe()["paths"] and openapi.SPEC["paths"]


# --- the routes that exist ----------------------------------------------------------------------
def flask_routes() -> set[tuple[str, str]]:
    app = create_app()
    found = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":   # Flask's own static files (there are none), not an API route
            continue
        for m in rule.methods - {"HEAD", "OPTIONS"}:
            found.add((m.lower(), norm(rule.rule)))
    return found


def described_routes() -> set[tuple[str, str]]:
    return {(m, norm(p)) for m, p, _ in operations(openapi.describe())}


def test_every_orchestrator_route_is_described():
    missing = flask_routes() - described_routes()
    assert not missing, f"routes the orchestrator serves that the document does not describe: {sorted(missing)}"


def test_every_described_route_is_served_by_the_orchestrator():
    """Every route but the gateway's own must exist in create_app(). The apps,
    events and logs routes and GET /api/v1/openapi.json (openapi.register)
    are wired into orchestrator/api.py by the lead: until then this fails,
    naming them."""
    gateway_only = {norm(p) for p in openapi.GATEWAY_ONLY}
    missing = {(m, p) for m, p in described_routes() - flask_routes() if p not in gateway_only}
    assert not missing, f"described but not served by orchestrator.api.create_app(): {sorted(missing)}"


def _sample(path: str) -> str:
    return path.replace("{t}", "acme").replace("{a}", "shop").replace("{r}", "web")


def test_the_gateway_routes_every_described_path():
    """Through the gateway the same paths: none of them is a path no one owns."""
    unrouted = [p for _, p, _ in operations(openapi.describe()) if router.route(_sample(p)) is router.NOT_FOUND]
    assert not unrouted, f"paths the gateway answers 404 for: {unrouted}"
    assert router.route("/api/v1/auth/token") is router.TOKEN
    assert router.route("/health") is router.HEALTH and router.route("/metrics") is router.METRICS


# --- statuses and error bodies --------------------------------------------------------------------
def test_every_route_lists_its_contract_statuses():
    doc = openapi.describe()
    seen = set()
    for method, path, op in operations(doc):
        key = (method, path)
        assert key in CONTRACT, f"{key} is not in the contracts"
        seen.add(key)
        codes = {int(c) for c in op["responses"]}
        need = set(CONTRACT[key])
        need.add(431)   # the gateway reads every request's head first
        if key not in PUBLIC:
            need |= {401, 403, 429, 502, 504}
        if "requestBody" in op:
            need |= {400, 413}
        assert need <= codes, f"{method.upper()} {path} lacks {sorted(need - codes)}"
        assert any(200 <= c < 300 for c in codes)
        assert op.get("operationId") and op.get("summary")
    assert seen == set(CONTRACT)


def test_every_failure_is_a_json_object_with_error():
    doc = openapi.describe()
    err = validator("Error")
    for method, path, op in operations(doc):
        for code, resp in op["responses"].items():
            if int(code) < 400:
                continue
            resp = deref(doc, resp)
            schema = deref(doc, resp["content"]["application/json"]["schema"])
            assert "error" in schema["required"], (method, path, code)
            if code == "429":
                assert resp["headers"]["Retry-After"]["required"] is True
    assert err.is_valid({"error": "no such tenant: 'x'"})
    assert err.is_valid({"error": "constraint", "code": "constraint", "op": 1, "tag": "stock"})
    assert not err.is_valid({"message": "no error key"})
    assert not err.is_valid(["error"])


def test_database_answers_carry_their_lsn():
    doc = openapi.describe()
    for path in ("/api/v1/db/read", "/api/v1/db/write", "/api/v1/db/clear"):
        headers = doc["paths"][path]["post"]["responses"]["200"]["headers"]
        assert headers["X-Stratus-LSN"]["required"] is True


# --- schemas against the contract's shapes ---------------------------------------------------------
APP = {"tenant": "acme", "name": "shop", "generation": 3, "digest": "sha256:" + "ab" * 32,
       "roles": {"web": {"kind": "web", "desired": 2, "running": 1, "routes": ["/shop"], "instances": [
           {"id": "i-1a2b3c4d", "host": "127.0.0.1", "port": 40123, "pid": 4242, "state": "running",
            "restarts": 0, "started": 1764080000.5},
           {"id": "i-5e6f7a8b", "host": "127.0.0.1", "port": None, "pid": None, "state": "starting",
            "restarts": 2, "started": None}]},
           "jobs": {"kind": "worker", "desired": 1, "running": 1, "routes": [], "instances": []}}}


def test_the_app_schema_takes_paas_md_shape_and_refuses_others():
    v = validator("App")
    assert v.is_valid(APP)
    bad_state = json.loads(json.dumps(APP))
    bad_state["roles"]["web"]["instances"][0]["state"] = "dead"
    assert not v.is_valid(bad_state)
    no_running = json.loads(json.dumps(APP))
    del no_running["roles"]["web"]["running"]
    assert not v.is_valid(no_running)
    assert not v.is_valid({**APP, "digest": "md5:abc"})


def test_events_and_logs_schemas():
    ev, logs = validator("Events"), validator("Logs")
    assert ev.is_valid({"events": [{"seq": 1, "time": 1.5, "type": "deployed", "app": "shop"}], "next": 1})
    assert not ev.is_valid({"events": [{"seq": "1", "time": 1.5, "type": "deployed"}], "next": 1})
    assert not ev.is_valid({"events": []})
    assert logs.is_valid({"lines": [{"component": "gateway", "time": 1.0, "line": "GET / 200"}]})
    assert not logs.is_valid({"lines": [{"component": "gateway", "line": "no time"}]})


def test_the_paas_md_manifest_example_is_valid():
    example = {"roles": {
        "web": {"kind": "web", "command": ["python", "-m", "shop.web"], "instances": 2,
                "routes": ["/shop"], "health": "/health", "env": {"GREETING": "hi"}},
        "jobs": {"kind": "worker", "command": ["python", "-m", "shop.jobs"], "instances": 1}}}
    assert validator("Manifest").is_valid(example)
    mf.parse(example)


_TEXT = st.text(alphabet="abcXY/_-. 0", max_size=6)
_role = st.fixed_dictionaries({}, optional={
    "kind": st.sampled_from(["web", "worker", "db", 3]),
    "command": st.one_of(st.lists(st.sampled_from(["python", "-m", "", "x"]), max_size=3), _TEXT),
    "image": st.one_of(st.sampled_from(["img:1", "", "  ", "x" * 257]), st.none()),
    "instances": st.one_of(st.integers(-2, 20), st.booleans(), _TEXT),
    "routes": st.one_of(st.lists(st.sampled_from(["/shop", "shop", "/a/b", "/x"]), max_size=2), _TEXT),
    "health": st.sampled_from(["/health", "health", "/ok"]),
    "env": st.dictionaries(st.sampled_from(["GREETING", "A_B"]), st.one_of(_TEXT, st.integers()), max_size=2),
    "extra": st.integers(),
})
_manifest = st.one_of(
    st.fixed_dictionaries({"roles": st.dictionaries(st.sampled_from(["web", "jobs", "api"]), _role, max_size=3)}),
    st.fixed_dictionaries({"roles": st.dictionaries(st.sampled_from(["web"]), _role, max_size=1),
                           "version": st.integers()}),
    st.lists(st.integers(), max_size=1),
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(_manifest)
def test_the_manifest_schema_agrees_with_the_code(data):
    """Schema-invalid -> the code refuses it (400); code-accepted -> its stored
    form is schema-valid. (The code checks more than a schema can say: role
    names, env key names, route overlaps; so not the other way round.)"""
    v = validator("Manifest")
    try:
        parsed = mf.parse(data)
    except mf.ManifestError as exc:
        assert exc.status == 400
        return
    assert v.is_valid(data), f"the code accepts {data!r}, which the document's schema refuses"
    assert v.is_valid(parsed.to_dict())


# --- serving it ------------------------------------------------------------------------------------
def test_register_serves_the_document():
    from flask import Flask
    app = Flask("t")
    openapi.register(app)
    resp = app.test_client().get(openapi.OPENAPI_PATH)
    assert resp.status_code == 200 and resp.is_json
    assert resp.get_json() == openapi.describe()
