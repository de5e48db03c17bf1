"""One OpenAPI 3.0 description of the whole platform API (issue 15, OpenAPI):
every route of the shared specs paas.md and platform.md, and rideshare.md's
"database, seen from outside", as the orchestrator serves it on its own port
and the gateway serves it on the same paths.

    describe() -> dict          the document (a fresh copy each call)
    register(app)               adds GET /api/v1/openapi.json serving it

Contract kept by the document (and checked by tests/unit/test_openapi_spec.py
and, against a running platform, tests/integration/test_openapi_schemathesis.py):
  - every route of the orchestrator's Flask app is described, and every
    described route but the gateway's own (/api/v1/auth/token) is served by
    the orchestrator;
  - every answer of a route has its status listed, success and failure; a
    failure is always a JSON object with "error" (components/schemas/Error);
  - what comes only from the gateway is listed too: 401 (no valid token),
    403 (a token of the wrong role or tenant), 429 with Retry-After (a
    tenant's request rate), 431 (a request head over its limit), 502 and
    504 (the orchestrator did not answer).

Two servers, one API. Through the gateway (the public entry point) the
platform routes need `Authorization: Bearer <JWT>` (security scheme
"bearer"); the orchestrator's own port listens on loopback or the stack's
private network only and acts as the admin without a token (the empty
security requirement). Who may call what, by token role, is said in each
operation's description (paas.md, platform.md)."""
from __future__ import annotations

import copy
from typing import Any

from flask import Flask, jsonify

from .apps.events import TYPES as EVENT_TYPES

OPENAPI_PATH = "/api/v1/openapi.json"
GATEWAY_ONLY = ("/api/v1/auth/token",)   # answered by the gateway itself, never by the orchestrator

# Names (bus.tenancy.check_tenant_name, orchestrator/apps/manifest.py).
NAME_PATTERN = r"^[a-z][a-z0-9-]{1,31}$"
ROLE_PATTERN = r"^[a-z][a-z0-9-]{0,31}$"
RESERVED_NAMES = ["admin", "platform", "stratus"]
INSTANCE_QUOTA = 16

_REASONS = {
    400: "Bad request: a body that is not JSON or not of the required shape, a bad name or parameter, "
         "or (through the gateway) a path with dot segments or encoded slashes.",
    401: "Through the gateway: no valid bearer token.",
    403: "Through the gateway: the token's role (or tenant) may not use this route; "
         "on the db routes also a tenant that is not the caller's, or the platform's own tables.",
    404: "No such tenant, app or role.",
    409: "A conflict: the name exists, a route owned by another app or reserved, the instance quota, "
         "or no master/slave to act on.",
    413: "The body is too large.",
    429: "Through the gateway: the tenant's request rate is used up; retry after Retry-After seconds.",
    431: "Through the gateway: the request's head (request line and headers) is larger than the gateway "
         "takes (16 KiB by default).",
    502: "Through the gateway: the orchestrator did not answer.",
    503: "Not now: the orchestrator is starting or not leading, ZooKeeper, the broker or the database "
         "cannot be reached; nothing was changed, try again.",
    504: "No answer in time (from the database, or through the gateway from the orchestrator); "
         "a write may still be applied.",
    507: "The tenant's storage quota is used up: nothing was written.",
}

# What every route proxied by the gateway to the orchestrator may answer, besides its own statuses.
_GATEWAY = (429, 431, 502, 503, 504)
_PROTECTED = (401, 403) + _GATEWAY


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _ok(description: str, schema: dict | None = None, *, headers: dict | None = None,
        content: dict | None = None) -> dict:
    r: dict[str, Any] = {"description": description}
    if content is not None:
        r["content"] = content
    elif schema is not None:
        r["content"] = _json(schema)
    if headers:
        r["headers"] = headers
    return r


def _responses(success: dict[int, dict], *errors: int) -> dict:
    out: dict[str, Any] = {str(code): body for code, body in success.items()}
    for code in sorted(set(errors)):
        ref = "TooManyRequests" if code == 429 else "Error"
        out[str(code)] = {"$ref": f"#/components/responses/{ref}"} if code == 429 else \
            {"description": _REASONS[code], "content": _json(_ref(ref))}
    return out


def _body(schema: dict, *, required: bool = True, description: str | None = None) -> dict:
    b: dict[str, Any] = {"required": required, "content": _json(schema)}
    if description:
        b["description"] = description
    return b


_LSN_HEADER = {"X-Stratus-LSN": {
    "description": "The log sequence number the answer reflects (a write's own LSN; a read's applied LSN).",
    "required": True, "schema": {"type": "string", "pattern": r"^[0-9]+$"}}}

_TENANT_PARAM = {"name": "t", "in": "path", "required": True, "description": "The tenant's name.",
                 "schema": {"type": "string", "pattern": NAME_PATTERN}}
_APP_PARAM = {"name": "a", "in": "path", "required": True, "description": "The app's name.",
              "schema": {"type": "string", "pattern": NAME_PATTERN}}
_ROLE_PARAM = {"name": "r", "in": "path", "required": True, "description": "The role's name.",
               "schema": {"type": "string", "pattern": ROLE_PATTERN}}

_OWNER = ("For the admin and the tenant's owner; another tenant's token gets 403. A developer may GET it "
          "(paas.md: a developer reads the status, events and logs of every component).")
_ADMIN = "Admin only (through the gateway: an admin token; 401 without a token, 403 with another role)."


def _schemas() -> dict:
    name = {"type": "string", "pattern": NAME_PATTERN, "not": {"enum": RESERVED_NAMES},
            "description": "2-32 characters of a-z, 0-9 and '-', starting with a letter; "
                           "not admin, platform or stratus."}
    where = {"type": "array", "maxItems": 64, "description": "[column, operator, value] conditions, all of which "
             "must hold (docs/protocol.md Reads)", "items": {"type": "array", "minItems": 3, "maxItems": 3}}
    return {
        "Error": {"type": "object", "required": ["error"], "additionalProperties": True,
                  "properties": {"error": {"type": "string", "description": "What went wrong."},
                                 "code": {"type": "string", "description": "The database's error code "
                                          "(db routes; docs/protocol.md Replies)."},
                                 "op": {"type": "integer", "description": "The failing operation of a write."},
                                 "tag": {"type": "string", "description": "The caller's label of that operation."}}},
        "Empty": {"type": "object", "maxProperties": 0},
        "TenantName": name,
        "NewTenant": {"type": "object", "required": ["name"], "properties": {"name": _ref("TenantName")}},
        "TenantCreated": {"type": "object", "required": ["name", "password"], "properties": {
            "name": {"type": "string"},
            "password": {"type": "string", "description": "The owner's password, generated, shown only here."}}},
        "Tenant": {"type": "object", "required": ["name", "apps", "instances", "storage_bytes"], "properties": {
            "name": {"type": "string"},
            "apps": {"type": "integer", "minimum": 0},
            "instances": {"type": "integer", "minimum": 0},
            "storage_bytes": {"type": "integer", "minimum": 0}}},
        "NewDeveloper": {"type": "object", "required": ["username"], "properties": {"username": _ref("TenantName")}},
        "DeveloperCreated": {"type": "object", "required": ["username", "password"], "properties": {
            "username": {"type": "string"}, "password": {"type": "string"}}},
        # --- apps -----------------------------------------------------------------------
        "RoleSpec": {"type": "object", "additionalProperties": False, "required": ["kind"], "properties": {
            "kind": {"type": "string", "enum": ["web", "worker"]},
            "command": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
            "image": {"type": "string", "minLength": 1, "maxLength": 256},
            "instances": {"type": "integer", "minimum": 0, "maximum": INSTANCE_QUOTA, "default": 1},
            "routes": {"type": "array", "items": {"type": "string", "pattern": "^/"},
                       "description": "Path prefixes (web roles only), each owned by one app at a time."},
            "health": {"type": "string", "pattern": "^/", "default": "/health"},
            "env": {"type": "object", "additionalProperties": {"type": "string"}}},
            "description": "A role: a command (run in the unpacked package) or an image."},
        "Manifest": {"type": "object", "additionalProperties": False, "required": ["roles"], "properties": {
            "roles": {"type": "object", "minProperties": 1, "maxProperties": 32,
                      "additionalProperties": _ref("RoleSpec")}}},
        "Instance": {"type": "object", "required": ["id", "host", "port", "pid", "state", "restarts", "started"],
                     "properties": {
                         "id": {"type": "string"},
                         "host": {"type": "string", "nullable": True},
                         "port": {"type": "integer", "nullable": True, "description": "null for a worker role"},
                         "pid": {"type": "integer", "nullable": True},
                         "state": {"type": "string", "enum": ["starting", "running", "unhealthy", "exited"]},
                         "restarts": {"type": "integer", "minimum": 0},
                         "started": {"type": "number", "nullable": True, "description": "unix time"}}},
        "RoleStatus": {"type": "object", "required": ["kind", "desired", "running", "routes", "instances"],
                       "properties": {
                           "kind": {"type": "string", "enum": ["web", "worker"]},
                           "desired": {"type": "integer", "minimum": 0},
                           "running": {"type": "integer", "minimum": 0},
                           "routes": {"type": "array", "items": {"type": "string"}},
                           "instances": {"type": "array", "items": _ref("Instance")}}},
        "App": {"type": "object", "required": ["tenant", "name", "generation", "digest", "roles"], "properties": {
            "tenant": {"type": "string"},
            "name": {"type": "string"},
            "generation": {"type": "integer", "minimum": 1},
            "digest": {"type": "string", "nullable": True, "pattern": r"^sha256:[0-9a-f]{64}$",
                       "description": "the package deployed (null when every role names an image)"},
            "restart": {"type": "integer", "minimum": 0, "description": "rolling restarts asked so far"},
            "roles": {"type": "object", "additionalProperties": _ref("RoleStatus")},
            "limits": _ref("Limits")}},
        "Limits": {"type": "object", "required": ["memory_mb", "cpus", "pids", "disk_mb", "log_mb"],
                   "description": "what each instance may use (settings STRATUS_INSTANCE_*; docs/security.md)",
                   "properties": {
                       "memory_mb": {"type": "integer", "minimum": 1, "description": "past it, killed and restarted"},
                       "cpus": {"type": "number", "minimum": 0, "exclusiveMinimum": True},
                       "pids": {"type": "integer", "minimum": 1, "description": "processes and threads"},
                       "disk_mb": {"type": "integer", "minimum": 1, "description": "its scratch /tmp"},
                       "log_mb": {"type": "integer", "minimum": 1, "description": "its log file"}}},
        "Restarting": {"type": "object", "required": ["tenant", "name", "restart"], "properties": {
            "tenant": {"type": "string"}, "name": {"type": "string"},
            "restart": {"type": "integer", "minimum": 1, "description": "this restart's number"}}},
        "Scale": {"type": "object", "required": ["instances"], "properties": {
            "instances": {"type": "integer", "minimum": 0, "maximum": INSTANCE_QUOTA}}},
        "Digest": {"type": "object", "required": ["digest"], "properties": {
            "digest": {"type": "string", "pattern": r"^sha256:[0-9a-f]{64}$"}}},
        "Event": {"type": "object", "required": ["seq", "time", "type"], "additionalProperties": True,
                  "properties": {
                      "seq": {"type": "integer", "minimum": 1},
                      "time": {"type": "number", "description": "unix time"},
                      "type": {"type": "string", "enum": list(EVENT_TYPES),
                               "description": "exited carries the exit code, unhealthy and start_failed "
                                              "why, restarted the delay; each carries the app and, where "
                                              "it applies, the role and the instance"}}},
        "Events": {"type": "object", "required": ["events", "next"], "properties": {
            "events": {"type": "array", "items": _ref("Event")},
            "next": {"type": "integer", "minimum": 0, "description": "the `since` that reads the next events"}}},
        "LogLine": {"type": "object", "required": ["component", "time", "line"], "properties": {
            "component": {"type": "string"}, "time": {"type": "number"}, "line": {"type": "string"}}},
        "Logs": {"type": "object", "required": ["lines"], "properties": {
            "lines": {"type": "array", "items": _ref("LogLine")}}},
        # --- the database ---------------------------------------------------------------
        "ReadRequest": {"type": "object", "required": ["op"], "properties": {
            "op": {"type": "string", "enum": ["select", "count", "tables"]},
            "table": {"type": "string"},
            "columns": {"type": "array", "items": {"type": "string"}},
            "where": where,
            "order_by": {"type": "array", "maxItems": 16, "items": {"type": "array", "minItems": 2, "maxItems": 2}},
            "limit": {"type": "integer", "minimum": 0, "maximum": 10000},
            "min_lsn": {"type": "integer", "minimum": 0, "description": "read-your-writes"},
            "tenant": {"type": "string", "description": "the tenant to act for (default rideshare; paas.md)"}},
            "description": "A read request of docs/protocol.md (Reads)."},
        "ReadResult": {"description": "select: the rows; count: an integer; tables: the table names.",
                       "anyOf": [{"type": "array"}, {"type": "integer"}]},
        "WriteRequest": {"type": "object", "required": ["ops"], "properties": {
            "ops": {"type": "array", "minItems": 1, "maxItems": 1000,
                    "items": {"type": "object", "required": ["op"], "properties": {"op": {"type": "string"}}}},
            "tenant": {"type": "string", "description": "the tenant to act for (default rideshare; paas.md)"}},
            "description": "A write of docs/protocol.md (Writes): its operations, applied atomically."},
        "WriteResult": {"type": "object", "required": ["results", "lsn"], "properties": {
            "results": {"type": "array", "description": "one entry per operation, in order",
                        "items": {"type": "object", "properties": {
                            "rowcount": {"type": "integer", "minimum": 0, "description": "rows touched"},
                            "values": {"type": "object", "description": "an insert's or upsert's row, "
                                                                        "sequence numbers filled in"},
                            "created": {"type": "boolean", "description": "create_table: false when the "
                                                                         "same table existed"}}}},
            "lsn": {"type": "integer", "minimum": 0}}},
        "ClearRequest": {"type": "object", "properties": {"tenant": {"type": "string"}}},
        # --- the cluster ----------------------------------------------------------------
        "Pids": {"type": "array", "items": {"type": "string", "pattern": r"^[0-9]+$"}, "minItems": 1, "maxItems": 1,
                 "description": "The pid of the worker that was killed."},
        "Switchover": {"type": "object", "properties": {
            "candidate": {"type": "string", "description": "the worker id to promote (default: the best slave)"}}},
        "SwitchoverDone": {"type": "object", "required": ["old", "new", "term"], "properties": {
            "old": {"type": "string"}, "new": {"type": "string"}, "term": {"type": "integer"}}},
        "ClusterWorker": {"type": "object", "required": ["id", "pid", "role", "state", "term", "applied_lsn",
                                                         "lag", "ready", "leader"],
                          "properties": {
                              "id": {"type": "string"}, "pid": {"type": "integer", "nullable": True},
                              "host": {"type": "string", "nullable": True},
                              "role": {"type": "string"}, "state": {"type": "string"},
                              "term": {"type": "integer"}, "applied_lsn": {"type": "integer"},
                              "lag": {"type": "integer", "nullable": True}, "ready": {"type": "boolean"},
                              "serves_reads": {"type": "boolean"}, "reads": {"type": "integer"},
                              "leader": {"type": "boolean"}, "draining": {"type": "boolean"}}},
        "Cluster": {"type": "object", "required": ["cluster", "term", "leader", "workers", "slave_target",
                                                   "elections", "orchestrator"],
                    "properties": {
                        "cluster": {"type": "string"},
                        "term": {"type": "integer"},
                        "leader": {"type": "string", "nullable": True},
                        "workers": {"type": "array", "items": _ref("ClusterWorker")},
                        "slave_target": {"type": "integer", "minimum": 0},
                        "reads_in_window": {"type": "integer", "minimum": 0},
                        "window_start": {"type": "number", "nullable": True},
                        "window_seconds": {"type": "number"},
                        "reads_per_slave": {"type": "integer"},
                        "max_slaves": {"type": "integer"},
                        "last_decision": {"description": "the last scaling decision, or null"},
                        "decisions": {"type": "array"},
                        "decisions_total": {"type": "integer"},
                        "elections": {"type": "array", "items": {"type": "object"}},
                        "orchestrator": {"type": "object", "required": ["id", "leading"], "properties": {
                            "id": {"type": "string"}, "pid": {"type": "integer"},
                            "leading": {"type": "boolean"}, "lead_since": {"type": "number", "nullable": True},
                            "candidates": {"type": "integer"}}}}},
        "Health": {"type": "object", "required": ["status", "service"], "additionalProperties": True,
                   "properties": {"status": {"type": "string", "enum": ["ok"]}, "service": {"type": "string"}},
                   "description": "The orchestrator's, or through the gateway the gateway's own (with its "
                                  "upstreams and cache)."},
        "Credentials": {"type": "object", "required": ["username", "password"], "properties": {
            "username": {"type": "string", "minLength": 1, "maxLength": 256},
            "password": {"type": "string", "minLength": 1, "maxLength": 1024}}},
        "Token": {"type": "object", "required": ["token", "role", "expires_in"], "properties": {
            "token": {"type": "string", "description": "a JWT (HS256): sub, role, exp, iat, and tenant for "
                      "the roles tenant and user"},
            "role": {"type": "string", "enum": ["admin", "developer", "tenant", "user"]},
            "expires_in": {"type": "integer", "minimum": 1}}},
    }


def _paths() -> dict:
    tenant_p, app_p, role_p = [_TENANT_PARAM], [_TENANT_PARAM, _APP_PARAM], [_TENANT_PARAM, _APP_PARAM, _ROLE_PARAM]
    public: list = []   # no token needed, on either server
    app = _ref("App")
    return {
        # --- accounts (paas.md Accounts) -----------------------------------------------------
        "/api/v1/tenants": {
            "post": {"tags": ["accounts"], "operationId": "createTenant", "summary": "Create a tenant",
                     "description": _ADMIN + " Makes the owner's account, its broker account and its directory "
                                    "entry; returns the owner's generated password once.",
                     "requestBody": _body(_ref("NewTenant")),
                     "responses": _responses({201: _ok("Created.", _ref("TenantCreated"))},
                                             400, 409, 413, *_PROTECTED)},
            "get": {"tags": ["accounts"], "operationId": "listTenants", "summary": "List the tenants",
                    "description": _ADMIN,
                    "responses": _responses({200: _ok("Every tenant.", {"type": "array", "items": _ref("Tenant")})},
                                            *_PROTECTED)}},
        "/api/v1/tenants/{t}": {
            "parameters": tenant_p,
            "delete": {"tags": ["accounts"], "operationId": "deleteTenant", "summary": "Delete a tenant",
                       "description": _ADMIN + " Its apps are stopped, its tables dropped on every worker "
                                      "through the log, its accounts removed.",
                       "responses": _responses({200: _ok("Deleted.", _ref("Empty"))}, 400, 404, *_PROTECTED)}},
        "/api/v1/developers": {
            "post": {"tags": ["accounts"], "operationId": "createDeveloper", "summary": "Create a developer",
                     "description": _ADMIN,
                     "requestBody": _body(_ref("NewDeveloper")),
                     "responses": _responses({201: _ok("Created.", _ref("DeveloperCreated"))},
                                             400, 409, 413, *_PROTECTED)}},
        # --- apps (paas.md Apps) ---------------------------------------------------------------
        "/api/v1/tenants/{t}/apps": {
            "parameters": tenant_p,
            "get": {"tags": ["apps"], "operationId": "listApps", "summary": "The tenant's apps",
                    "description": _OWNER + " Each app as GET /api/v1/tenants/{t}/apps/{a} shows it.",
                    "responses": _responses({200: _ok("The apps.", {"type": "array", "items": app})},
                                            400, 404, *_PROTECTED)}},
        "/api/v1/tenants/{t}/apps/{a}": {
            "parameters": app_p,
            "put": {"tags": ["apps"], "operationId": "deployApp", "summary": "Deploy (or change) an app",
                    "description": _OWNER + " The platform then starts, stops or replaces instances until the "
                                   "app matches. 400: an invalid manifest or no package uploaded; 409: a route "
                                   "owned by another app or reserved, or over the instance quota.",
                    "parameters": [{"name": "digest", "in": "query", "required": False,
                                    "description": "the package to deploy (default: the one uploaded last)",
                                    "schema": {"type": "string", "pattern": r"^sha256:[0-9a-f]{64}$"}}],
                    "requestBody": _body(_ref("Manifest")),
                    "responses": _responses({201: _ok("A new app, as GET shows it.", app),
                                             200: _ok("The app changed, as GET shows it.", app)},
                                            400, 404, 409, 413, *_PROTECTED)},
            "get": {"tags": ["apps"], "operationId": "getApp", "summary": "An app, its roles and instances",
                    "description": _OWNER,
                    "responses": _responses({200: _ok("The app.", app)}, 400, 404, *_PROTECTED)},
            "delete": {"tags": ["apps"], "operationId": "deleteApp", "summary": "Delete an app",
                       "description": _OWNER + " Its instances are stopped and its routes gone (404 afterwards).",
                       "responses": _responses({200: _ok("Deleted.", _ref("Empty"))}, 400, 404,
                                               *_PROTECTED)}},
        "/api/v1/tenants/{t}/apps/{a}/package": {
            "parameters": app_p,
            "put": {"tags": ["apps"], "operationId": "uploadPackage", "summary": "Upload an app's package",
                    "description": _OWNER + " A .tar.gz of at most 50 MiB whose every member stays inside the "
                                   "package's directory.",
                    "requestBody": {"required": True, "content": {
                        "application/gzip": {"schema": {"type": "string", "format": "binary"}},
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                    "responses": _responses({201: _ok("Stored.", _ref("Digest"))},
                                            400, 404, 413, 507, *_PROTECTED)}},
        "/api/v1/tenants/{t}/apps/{a}/roles/{r}": {
            "parameters": role_p,
            "patch": {"tags": ["apps"], "operationId": "scaleRole", "summary": "Scale a role",
                      "description": _OWNER + " Scaled live; 0 allowed. 409: over the tenant's instance quota.",
                      "requestBody": _body(_ref("Scale")),
                      "responses": _responses({200: _ok("Scaled: the app as GET shows it.", app)},
                                              400, 404, 409, 413, *_PROTECTED)}},
        "/api/v1/tenants/{t}/apps/{a}/restart": {
            "parameters": app_p,
            "post": {"tags": ["apps"], "operationId": "restartApp", "summary": "Rolling restart",
                     "description": _OWNER + " A web role with 2 or more instances keeps at least one healthy "
                                    "instance throughout.",
                     "responses": _responses({202: _ok("Restarting.", _ref("Restarting"))}, 400, 404,
                                             *_PROTECTED)}},
        "/api/v1/tenants/{t}/events": {
            "parameters": tenant_p,
            "get": {"tags": ["apps"], "operationId": "tenantEvents", "summary": "The tenant's events",
                    "description": _OWNER + " The events after sequence number `since`, oldest first.",
                    "parameters": [{"name": "since", "in": "query", "required": False,
                                    "schema": {"type": "integer", "minimum": 0, "default": 0}}],
                    "responses": _responses({200: _ok("The events.", _ref("Events"))}, 400, 404, *_PROTECTED)}},
        "/api/v1/logs": {
            "get": {"tags": ["platform"], "operationId": "logs", "summary": "Log lines, newest last",
                    "description": "Admin and developer: any component (gateway, orchestrator, each worker, each "
                                   "instance). Tenant owner: its own instances only (another component: 403). "
                                   "Credentials never appear.",
                    "parameters": [
                        {"name": "component", "in": "query", "required": False, "schema": {"type": "string"},
                         "description": "a component, <tenant>/<app>/<instance>, <tenant>/<app> or <tenant>"},
                        {"name": "since", "in": "query", "required": False,
                         "schema": {"type": "number", "minimum": 0}, "description": "unix time"},
                        {"name": "q", "in": "query", "required": False,
                         "schema": {"type": "string", "maxLength": 1000},
                         "description": "text the line contains (a request id follows one request)"},
                        {"name": "limit", "in": "query", "required": False,
                         "schema": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 1000}}],
                    "responses": _responses({200: _ok("The lines.", _ref("Logs"))}, 400, 404, *_PROTECTED)}},
        # --- the database (rideshare.md, paas.md Data isolation) -------------------------------
        "/api/v1/db/read": {
            "post": {"tags": ["database"], "operationId": "dbRead", "summary": "Read",
                     "description": "The admin (any tenant, default rideshare) or a tenant's owner (its own "
                                    "tenant only).",
                     "requestBody": _body(_ref("ReadRequest")),
                     "responses": _responses({200: _ok("The result.", _ref("ReadResult"), headers=_LSN_HEADER)},
                                             400, 404, 413, *_PROTECTED)}},
        "/api/v1/db/write": {
            "post": {"tags": ["database"], "operationId": "dbWrite", "summary": "Write, atomically",
                     "description": "The admin (any tenant, default rideshare) or a tenant's owner (its own "
                                    "tenant only). 400 includes a failed precondition or constraint: nothing "
                                    "is written.",
                     "requestBody": _body(_ref("WriteRequest")),
                     "responses": _responses({200: _ok("Applied.", _ref("WriteResult"), headers=_LSN_HEADER)},
                                             400, 404, 413, 507, *_PROTECTED)}},
        "/api/v1/db/clear": {
            "post": {"tags": ["database"], "operationId": "dbClear", "summary": "Empty every table of a tenant",
                     "description": "Through the log, on every worker. The admin (any tenant, default "
                                    "rideshare) or a tenant's owner (its own tenant only).",
                     "requestBody": _body(_ref("ClearRequest"), required=False),
                     "responses": _responses({200: _ok("Cleared.", _ref("Empty"), headers=_LSN_HEADER)},
                                             400, 404, 413, *_PROTECTED)}},
        # --- the cluster (platform.md admin routes) ----------------------------------------------
        "/api/v1/crash/master": {
            "post": {"tags": ["cluster"], "operationId": "crashMaster", "summary": "Kill the master",
                     "description": _ADMIN + " 409 or 503 when there is no master to kill.",
                     "responses": _responses({200: _ok("Killed.", _ref("Pids"))}, 409, *_PROTECTED)}},
        "/api/v1/crash/slave": {
            "post": {"tags": ["cluster"], "operationId": "crashSlave", "summary": "Kill the slave with the highest pid",
                     "description": _ADMIN + " 409 when there is no slave.",
                     "responses": _responses({200: _ok("Killed.", _ref("Pids"))}, 409, *_PROTECTED)}},
        "/api/v1/worker/list": {
            "get": {"tags": ["cluster"], "operationId": "workerList", "summary": "Every worker's pid, ascending",
                    "description": _ADMIN,
                    "responses": _responses({200: _ok("The pids.", {"type": "array", "items": {"type": "integer"}})},
                                            *_PROTECTED)}},
        "/api/v1/cluster": {
            "get": {"tags": ["cluster"], "operationId": "cluster", "summary": "The DB cluster's state",
                    "description": _ADMIN + " Members, roles, term, LSNs, lag, scaling, elections.",
                    "responses": _responses({200: _ok("The cluster.", _ref("Cluster"))}, *_PROTECTED)}},
        "/api/v1/switchover": {
            "post": {"tags": ["cluster"], "operationId": "switchover", "summary": "Planned switchover",
                     "description": _ADMIN + " Promotes a caught-up slave (or `candidate`) and retires the old "
                                    "master.",
                     "requestBody": _body(_ref("Switchover"), required=False),
                     "responses": _responses({200: _ok("Switched.", _ref("SwitchoverDone"))},
                                             400, 409, 413, *_PROTECTED)}},
        # --- the platform ----------------------------------------------------------------------
        OPENAPI_PATH: {
            "get": {"tags": ["platform"], "operationId": "openapi", "summary": "This document",
                    "security": public,
                    "responses": _responses({200: _ok("The OpenAPI document.", {"type": "object",
                                                                              "required": ["openapi", "paths"]})},
                                            *_GATEWAY)}},
        "/health": {
            "get": {"tags": ["platform"], "operationId": "health", "summary": "Liveness", "security": public,
                    "responses": _responses({200: _ok("Alive.", _ref("Health"))}, 431)}},
        "/metrics": {
            "get": {"tags": ["platform"], "operationId": "metrics", "summary": "Prometheus metrics",
                    "security": public,
                    "description": "The orchestrator's (503 while it starts), or through the gateway the "
                                   "gateway's own.",
                    "responses": _responses({200: _ok("Prometheus text format.", content={
                        "text/plain": {"schema": {"type": "string"}}})}, 431, 503)}},
        "/api/v1/auth/token": {
            "post": {"tags": ["auth"], "operationId": "token", "summary": "A token (the gateway only)",
                     "description": "Served by the gateway itself. RideShare users get the role user (their "
                                    "password is the SHA-1 hex they registered with); the administrator's "
                                    "username is admin.",
                     "security": public,
                     "requestBody": _body(_ref("Credentials")),
                     "responses": _responses({200: _ok("Granted.", _ref("Token"))}, 400, 401, 413, 429, 431,
                                             503)}},
    }


def _build() -> dict:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Stratus platform API",
            "version": "1.0.0",
            "description": "The platform API of Stratus (shared specs paas.md, platform.md; rideshare.md "
                           "\"The database, seen from outside\"). Every body is JSON unless said otherwise; every "
                           "failure is a JSON object with \"error\". Through the gateway the platform routes need "
                           "a bearer token (POST /api/v1/auth/token); the orchestrator's own port acts as the "
                           "admin without one. Tenants' own app routes are not described here.",
        },
        "servers": [
            {"url": "http://127.0.0.1:8080", "description": "the gateway (bearer tokens)"},
            {"url": "http://127.0.0.1:8081", "description": "the orchestrator's own port (loopback or the "
                                                              "stack's private network; acts as the admin)"},
        ],
        "tags": [{"name": n} for n in ("accounts", "apps", "database", "cluster", "platform", "auth")],
        "security": [{"bearer": []}, {}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                                           "description": "A token from POST /api/v1/auth/token. Not needed on "
                                                          "the orchestrator's own port."}},
            "schemas": _schemas(),
            "responses": {"TooManyRequests": {
                "description": _REASONS[429],
                "headers": {"Retry-After": {"required": True, "description": "seconds",
                                            "schema": {"type": "string", "pattern": r"^[0-9]+$"}}},
                "content": _json(_ref("Error"))}},
        },
    }


SPEC: dict = _build()


def describe() -> dict:
    """The OpenAPI document, a fresh copy the caller may change."""
    return copy.deepcopy(SPEC)


def register(app: Flask) -> None:
    """Serve the document at GET /api/v1/openapi.json (no token needed)."""
    @app.get(OPENAPI_PATH)
    def openapi_document():
        return jsonify(SPEC)
