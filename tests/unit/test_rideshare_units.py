"""RideShare pieces that need no bus: input parsing, timestamps, the request
counter, JSON bodies, the route table against docs/rideshare-openapi.json,
the shared schema, and the load command's dispatcher and percentiles."""
from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pytest
from werkzeug.exceptions import RequestEntityTooLarge

from rideshare import schema as rs
from harness import free_port
from rides import app as rides_app
from bus import web
from stratus import load, load_rides
from users import app as users_app

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("value,area", [(1, 1), (198, 198), ("1", 1), ("198", 198), ("007", 7)])
def test_parse_area_ok(value, area):
    assert rides_app.parse_area(value, "source") == area


@pytest.mark.parametrize("value", [0, 199, -1, "0", "199", "", " 1", "1 ", "+1", "1.0", 1.0, True, False, None,
                                   [1], {"a": 1}, "١", "abc", "9" * 20, "1\n", "12\n"])
def test_parse_area_refused(value):
    with pytest.raises(web.InputError):
        rides_app.parse_area(value, "source")


def test_timestamp_round_trip_utc():
    ts = rides_app.parse_timestamp("21-08-2031:05-04-03")
    assert ts == 1945047845  # 2031-08-21 03:04:05 UTC
    assert rides_app.format_timestamp(ts) == "21-08-2031:05-04-03"
    assert rides_app.format_timestamp(rides_app.parse_timestamp("01-01-1970:00-00-00")) == "01-01-1970:00-00-00"


@pytest.mark.parametrize("value", ["21-08-2031", "2031-08-21 03:04:05", "32-01-2031:00-00-00", "21-08-2031:00-60-00",
                                   "21-08-2031:00-00-24", "29-02-2031:00-00-00", "", 1945393445, None,
                                   "21-08-2031:00-00-00 ", "1-8-2031:0-0-0", "21-08-31:00-00-00", "２1-08-2031:00-00-00",
                                   "21-08-2031:00-00-00\n"])
def test_timestamp_refused(value):
    with pytest.raises(web.InputError):
        rides_app.parse_timestamp(value)


def test_counter_exact_under_threads():
    c = web.RequestCounter("/api/v1/rides")
    assert c.matches("/api/v1/rides") and c.matches("/api/v1/rides/count") and c.matches("/api/v1/rides/7")
    assert not c.matches("/api/v1/ridesX") and not c.matches("/api/v1/_count") and not c.matches("/api/v1/db/clear")

    def hit():
        for _ in range(5000):
            c.incr()
    ts = [threading.Thread(target=hit) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert c.get() == 40000
    c.reset()
    assert c.get() == 0


@pytest.fixture
def flask_app():
    return rides_app.create_app(ensure_schema=False)


@pytest.mark.parametrize("data,ok", [(b'{"a": "b"}', True), (b"[1]", False), (b"nope", False), (b"", False),
                                     (b"null", False), (b'{"a": ""}', False), (b'{"b": 1}', False),
                                     (b'{"a": "' + b"x" * 256 + b'"}', False), (b'{"a": "x", "' + b"k" * 256 + b'": 1}', False),
                                     (b'{"a": "' + b"x" * 255 + b'"}', True), (b"\xff\xfe", False),
                                     (b'{"a": "\\ud800"}', False), (b'{"a": "ok", "\\udfff": 1}', False),
                                     (b'{"a": "\\u00e9\\ud83d\\ude00"}', True)])
def test_json_object(flask_app, data, ok):
    with flask_app.test_request_context("/api/v1/rides", method="POST", data=data):
        if ok:
            assert web.json_object(("a",))["a"]
        else:
            with pytest.raises(web.InputError):
                web.json_object(("a",))


def test_json_object_too_large(flask_app):
    with flask_app.test_request_context("/api/v1/rides", method="POST", data=b"{" + b" " * 70_000 + b"}"):
        with pytest.raises(RequestEntityTooLarge):
            web.json_object(())


def test_app_answers_bad_input_before_any_db_call(flask_app):
    """400, 404, 405 and 413 need no database (ensure_schema=False: no bus at all)."""
    cl = flask_app.test_client()
    assert cl.post("/api/v1/rides", data=b"nope").status_code == 400
    assert cl.post("/api/v1/rides", json={"created_by": "a", "timestamp": "x", "source": 1, "destination": 2}).status_code == 400
    assert cl.post("/api/v1/rides", json={"created_by": "a", "timestamp": "21-08-2031:00-00-00", "source": 3,
                                          "destination": 3}).status_code == 400
    assert cl.get("/api/v1/rides?source=1").status_code == 400
    assert cl.get("/api/v1/nothing").status_code == 404
    r = cl.put("/api/v1/rides/count")
    assert r.status_code == 405 and r.get_json()["error"]
    r = cl.post("/api/v1/rides", data=b"x" * 70_000)
    assert r.status_code == 413 and r.get_json()["error"]
    assert cl.get("/api/v1/rides", headers={"X-Stratus-Min-LSN": "-3"}).status_code == 400
    assert cl.get("/api/v1/_count").get_json() == [7]  # the 404 is not a rides route
    users = users_app.create_app(ensure_schema=False).test_client()
    assert users.put("/api/v1/users", json={"username": "a", "password": "z" * 40}).status_code == 400
    assert users.put("/api/v1/users", json={"username": "a", "password": "a" * 40 + "\n"}).status_code == 400
    assert users.get("/api/v1/_count").get_json() == [2]


def _routes(app) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.rule in ("/health", "/metrics") or rule.endpoint == "static":
            continue
        path = rule.rule.replace("<path:username>", "{username}").replace("<int:ride_id>", "{rideId}")
        out.setdefault(path, set()).update(m.lower() for m in rule.methods - {"HEAD", "OPTIONS"})
    return out


def test_every_route_is_documented_and_every_documented_route_exists():
    doc = json.loads((ROOT / "docs" / "rideshare-openapi.json").read_text())
    served: dict[str, set[str]] = {}
    for app in (users_app.create_app(ensure_schema=False), rides_app.create_app(ensure_schema=False)):
        for path, methods in _routes(app).items():
            served.setdefault(path, set()).update(methods)
    documented = {p: {m for m in item if m in ("get", "put", "post", "delete", "patch")}
                  for p, item in doc["paths"].items()}
    assert served == documented


def test_schema_module():
    names = [t["table"] for t in rs.tables()]
    assert names == ["users", "rides", "ride_members"]
    users = rs.users_table()
    assert [c["name"] for c in users["columns"]] == ["username", "password"] and users["primary_key"] == ["username"]
    assert rs.members_table()["primary_key"] == ["ride_id", "username"]
    assert {op["table"] for op in rs.clear_ops()} == set(names)
    assert all(op["op"] == "delete" and op["where"] == [] for op in rs.clear_ops())


def test_percentile_nearest_rank():
    assert load_rides.percentile([], 50) is None
    assert load_rides.percentile([1.0], 95) == 1.0
    assert load_rides.percentile([1, 2, 3], 50) == 2
    assert load_rides.percentile(list(range(1, 21)), 95) == 19
    assert load_rides.percentile(list(range(1, 101)), 50) == 50


def test_load_dispatcher(capsys):
    assert load.main("load", []) == 2
    assert load.main("load", ["--help"]) == 0
    assert "rides" in capsys.readouterr().out
    assert load.main("load", ["nosuch"]) == 2
    assert load.main("load", ["rides", "--duration", "0"]) == 2


def test_load_rides_run_counts_refused_connections():
    out = io.StringIO()
    summary = load_rides.run(f"http://127.0.0.1:{free_port()}", rate=20, duration=0.5, threads=2, orchestrator=None, out=out)
    assert summary["sent"] == summary["errors"] >= 9 and summary["ok"] == 0
    assert "slaves ?" in out.getvalue()


def test_write_id_is_the_request_id_and_a_digest_of_the_write():
    """A retry (same X-Request-Id, route and write) gets the same bus id;
    anything else another one; every id fits the bus's 128 characters."""
    app = users_app.create_app(ensure_schema=False)
    ops_a, ops_b = [{"op": "insert", "table": "users", "values": {"username": "a"}}], [{"op": "clear"}]

    def wid(ops, rid=None, path="/api/v1/users", method="PUT"):
        headers = {"X-Request-Id": rid} if rid is not None else {}
        with app.test_request_context(path, method=method, headers=headers):
            app.preprocess_request()
            return web.write_id(ops)
    assert wid(ops_a, "r1") == wid(ops_a, "r1") and wid(ops_a, "r1").startswith("r1/")
    assert len({wid(ops_a, "r1"), wid(ops_b, "r1"), wid(ops_a, "r2"), wid(ops_a, "r1", method="POST"),
                wid(ops_a, "r1", path="/api/v1/users/a")}) == 5
    assert wid(ops_a) != wid(ops_a)  # no X-Request-Id: a fresh id per request
    for odd in ("x" * 8000, "spaces and ünïcode", "a/b", "\ud800"):
        w = wid(ops_a, odd)
        assert w == wid(ops_a, odd) and len(w) <= 128 and not w.startswith(odd[:3] + "/")
