"""Shared by the RideShare integration tests (no tests here): the users and
rides services running for real on a LocalCluster, a client that sends back
the LSN it is given (X-Stratus-LSN -> X-Stratus-Min-LSN), and a small
OpenAPI 3 validator that checks every response against
docs/rideshare-openapi.json."""
from __future__ import annotations

import json
import re
import threading
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import requests

from harness import ROOT, LocalCluster, free_port, wait_for

OPENAPI_PATH = ROOT / "docs" / "rideshare-openapi.json"
TS_FORMAT = "%d-%m-%Y:%S-%M-%H"


def future_ts(days: int = 365) -> str:
    return (datetime.now(timezone.utc) + timedelta(days=days)).strftime(TS_FORMAT)


def past_ts(days: int = 1) -> str:
    return (datetime.now(timezone.utc) - timedelta(days=days)).strftime(TS_FORMAT)


def pw(ch: str = "a") -> str:
    return ch * 40


# --- OpenAPI -------------------------------------------------------------------------
def _template_regex(template: str) -> re.Pattern:
    """/api/v1/rides/{rideId} -> ^/api/v1/rides/(.+)$: a parameter that ends
    the path may hold slashes (the users service takes any username)."""
    parts = re.split(r"\{[^/{}]+\}", template)
    groups = ["([^/]+)"] * (len(parts) - 1)
    if groups and parts[-1] == "":
        groups[-1] = "(.+)"
    out = re.escape(parts[0])
    for g, p in zip(groups, parts[1:]):
        out += g + re.escape(p)
    return re.compile("^" + out + "$")


class SchemaError(AssertionError):
    pass


class OpenAPI:
    """Enough of OpenAPI 3 for our document: path templates, operations,
    response codes, and JSON schemas with $ref, type, properties, required,
    additionalProperties: false, items, min/maxItems, min/maxLength,
    minimum/maximum, pattern, oneOf, maxProperties."""

    def __init__(self, path: Path = OPENAPI_PATH):
        self.doc = json.loads(path.read_text())
        assert self.doc["openapi"].startswith("3.")
        self.routes = []
        for template, item in self.doc["paths"].items():
            regex = _template_regex(template)
            static = "{" not in template
            self.routes.append((re.compile(regex), static, template, item))
        self.routes.sort(key=lambda r: not r[1])  # static paths first, like the server's router

    def resolve(self, node: dict) -> dict:
        while "$ref" in node:
            parts = node["$ref"].lstrip("#/").split("/")
            node = self.doc
            for p in parts:
                node = node[p]
        return node

    def operation(self, method: str, path: str):
        """(template, operation) for a request; operation None when the path
        exists without that method; (None, None) for an unknown path."""
        for regex, _static, template, item in self.routes:
            if regex.match(path) and self._params_ok(item, method, path, template):
                op = item.get(method.lower())
                if op is not None:
                    return template, op
        for regex, _static, template, item in self.routes:
            if regex.match(path) and self._params_ok(item, None, path, template):
                return template, None
        return None, None

    def _params_ok(self, item, method, path, template) -> bool:
        # a path parameter must match its schema (e.g. rideId is an integer)
        names = re.findall(r"\{([^/]+)\}", template)
        if not names:
            return True
        values = _template_regex(template).match(path).groups()
        params = {p["name"]: p for p in item.get("parameters", []) if p.get("in") == "path"}
        for n, v in zip(names, values):
            schema = self.resolve(params[n]["schema"]) if n in params else {}
            if schema.get("type") == "integer" and not re.fullmatch(r"[0-9]+", v):
                return False
        return True

    def check(self, resp: requests.Response) -> None:
        method = resp.request.method
        path = requests.utils.urlparse(resp.request.url).path
        path = requests.utils.unquote(path)
        template, op = self.operation(method, path)
        where = f"{method} {path} -> {resp.status_code}"
        if template is None:
            if resp.status_code != 404:
                raise SchemaError(f"{where}: undocumented path must answer 404")
            return self.validate(resp.json(), self.doc["components"]["responses"]["NotFound"], where)
        if op is None:
            if resp.status_code != 405:
                raise SchemaError(f"{where}: undocumented method must answer 405")
            return self.validate(resp.json(), self.doc["components"]["responses"]["MethodNotAllowed"], where)
        spec = op["responses"].get(str(resp.status_code))
        if spec is None:
            raise SchemaError(f"{where}: status not documented (documented: {sorted(op['responses'])})")
        self.validate_response(resp, self.resolve(spec), where)

    def validate_response(self, resp, spec: dict, where: str) -> None:
        content = spec.get("content")
        if content is None:
            if resp.content:
                raise SchemaError(f"{where}: documented without a body, got {resp.content[:80]!r}")
            return
        if "application/json" not in resp.headers.get("Content-Type", ""):
            raise SchemaError(f"{where}: not JSON ({resp.headers.get('Content-Type')})")
        self.validate_schema(resp.json(), content["application/json"]["schema"], where)
        for h, hspec in (spec.get("headers") or {}).items():
            if h in resp.headers:
                hschema = self.resolve(hspec)["schema"]
                raw = resp.headers[h]
                value = int(raw) if self.resolve(hschema).get("type") == "integer" and raw.lstrip("-").isdigit() else raw
                self.validate_schema(value, hschema, f"{where} header {h}")

    def validate(self, body, response_spec: dict, where: str) -> None:
        self.validate_schema(body, self.resolve(response_spec)["content"]["application/json"]["schema"], where)

    def validate_schema(self, value, schema: dict, where: str) -> None:
        schema = self.resolve(schema)
        if "oneOf" in schema:
            ok = 0
            for sub in schema["oneOf"]:
                try:
                    self.validate_schema(value, sub, where)
                    ok += 1
                except SchemaError:
                    pass
            if ok != 1:
                raise SchemaError(f"{where}: {value!r:.80} matches {ok} of oneOf")
            return
        t = schema.get("type")
        types = {"object": dict, "array": list, "string": str, "boolean": bool, "number": (int, float)}
        if t == "integer":
            if not isinstance(value, int) or isinstance(value, bool):
                raise SchemaError(f"{where}: {value!r:.80} is not an integer")
        elif t in types:
            if not isinstance(value, types[t]) or (t == "number" and isinstance(value, bool)):
                raise SchemaError(f"{where}: {value!r:.80} is not a {t}")
        if isinstance(value, dict):
            for r in schema.get("required", []):
                if r not in value:
                    raise SchemaError(f"{where}: missing {r!r} in {value!r:.120}")
            props = schema.get("properties", {})
            if schema.get("additionalProperties") is False:
                extra = set(value) - set(props)
                if extra:
                    raise SchemaError(f"{where}: unexpected {sorted(extra)} in {value!r:.120}")
            if "maxProperties" in schema and len(value) > schema["maxProperties"]:
                raise SchemaError(f"{where}: more than {schema['maxProperties']} properties")
            for k, sub in props.items():
                if k in value:
                    self.validate_schema(value[k], sub, f"{where}.{k}")
        if isinstance(value, list):
            if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", 1 << 30):
                raise SchemaError(f"{where}: {len(value)} items outside the documented bounds")
            if "items" in schema:
                for i, v in enumerate(value):
                    self.validate_schema(v, schema["items"], f"{where}[{i}]")
        if isinstance(value, str):
            if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", 1 << 30):
                raise SchemaError(f"{where}: length of {value!r:.40} outside the documented bounds")
            if "pattern" in schema and not re.search(schema["pattern"], value):
                raise SchemaError(f"{where}: {value!r:.40} does not match {schema['pattern']}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if "minimum" in schema and value < schema["minimum"]:
                raise SchemaError(f"{where}: {value} < {schema['minimum']}")
            if "maximum" in schema and value > schema["maximum"]:
                raise SchemaError(f"{where}: {value} > {schema['maximum']}")


# --- the services ------------------------------------------------------------------
class Client:
    """One HTTP client of both services. It sends back the highest LSN it
    was given, so it always reads its own writes; every response is checked
    against the OpenAPI document."""

    def __init__(self, rs: "RideShare", *, follow_lsn: bool = True, instance: int = 0, base_url: str | None = None):
        """base_url: send both services' requests there (the gateway)."""
        self.rs = rs
        self.users_url = base_url or rs.all_urls["users"][instance % len(rs.all_urls["users"])]
        self.rides_url = base_url or rs.all_urls["rides"][instance % len(rs.all_urls["rides"])]
        self.session = requests.Session()
        self.follow_lsn = follow_lsn
        self.lsn = 0

    def call(self, service: str, method: str, path: str, **kw) -> requests.Response:
        base = self.users_url if service == "users" else self.rides_url
        headers = dict(kw.pop("headers", None) or {})
        if self.follow_lsn and self.lsn and "X-Stratus-Min-LSN" not in headers:
            headers["X-Stratus-Min-LSN"] = str(self.lsn)
        resp = self.session.request(method, base + path, headers=headers, timeout=20, **kw)
        if "X-Stratus-LSN" in resp.headers:
            self.lsn = max(self.lsn, int(resp.headers["X-Stratus-LSN"]))
        self.rs.openapi.check(resp)
        return resp

    def users(self, method: str, path: str = "/api/v1/users", **kw) -> requests.Response:
        return self.call("users", method, path, **kw)

    def rides(self, method: str, path: str = "/api/v1/rides", **kw) -> requests.Response:
        return self.call("rides", method, path, **kw)

    # conveniences
    def add_user(self, name: str, password: str | None = None) -> None:
        r = self.users("PUT", json={"username": name, "password": password or pw()})
        assert r.status_code == 201, r.text

    def add_ride(self, creator: str, source=1, destination=2, ts: str | None = None) -> int:
        r = self.rides("POST", json={"created_by": creator, "timestamp": ts or future_ts(),
                                     "source": source, "destination": destination})
        assert r.status_code == 201, r.text
        return self.ride_ids(source, destination)[-1]

    def ride_ids(self, source=1, destination=2) -> list[int]:
        r = self.rides("GET", params={"source": source, "destination": destination})
        assert r.status_code in (200, 204), r.text
        return sorted(x["rideId"] for x in r.json()) if r.status_code == 200 else []

    def close(self) -> None:
        self.session.close()


class RideShare:
    def __init__(self, cluster: LocalCluster, urls: dict[str, list[str]]):
        self.cluster = cluster
        self.all_urls = urls
        self.users_url = urls["users"][0]
        self.rides_url = urls["rides"][0]
        self.openapi = OpenAPI()
        self._clients: list[Client] = []
        self._lock = threading.Lock()

    def client(self, **kw) -> Client:
        c = Client(self, **kw)
        with self._lock:
            self._clients.append(c)
        return c

    def reset(self) -> None:
        c = self.client()
        assert c.users("POST", "/api/v1/db/clear").status_code == 200
        # The tests' fresh clients read without X-Stratus-Min-LSN at first: let every
        # worker that serves reads apply the clear, or a slave may still show the last test's rows.
        lsn = c.lsn
        assert lsn > 0
        wait_for(lambda: all(w.get("applied_lsn", 0) >= lsn for w in self.cluster.workers().values()
                             if w.get("serves_reads")), 30, what="the workers serving reads to apply the clear")
        for i in range(max(len(u) for u in self.all_urls.values())):
            c = self.client(instance=i)
            for svc in ("users", "rides"):
                assert c.call(svc, "DELETE", "/api/v1/_count").status_code == 200

    def close(self) -> None:
        for c in self._clients:
            c.close()

    @classmethod
    @contextmanager
    def start(cls, tmp_path: Path, *, slaves: int = 1, instances: int = 1):
        """A cluster with a master and `slaves` slaves, and the users and
        rides services (each as `instances` processes on free ports; the
        URLs point at the first)."""
        cluster = LocalCluster(tmp_path)
        rs = None
        try:
            cluster.bootstrap(slaves=slaves)
            urls = {}
            for svc in ("users", "rides"):
                for i in range(instances):
                    port = free_port()
                    cluster.spawn(f"{svc}{i}", ["-m", svc], **{f"STRATUS_{svc.upper()}_PORT": port})
                    urls.setdefault(svc, []).append(f"http://127.0.0.1:{port}")
            for svc, us in urls.items():
                for u in us:
                    wait_for(lambda u=u: _answers(u + "/api/v1/_count"), 30, what=f"{svc} at {u}")
            rs = cls(cluster, urls)
            # the tables exist once a read of them answers
            for i in range(instances):
                c = rs.client(instance=i)
                wait_for(lambda: c.users("GET").status_code in (200, 204), 20, what="users tables")
                wait_for(lambda: c.rides("GET", "/api/v1/rides/count").status_code == 200, 20, what="rides tables")
            rs.reset()
            yield rs
        finally:
            if rs is not None:
                rs.close()
            cluster.close()


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False

