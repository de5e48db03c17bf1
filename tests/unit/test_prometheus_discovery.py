"""The Prometheus file service discovery's content, as pure logic
(orchestrator/discovery.py target_groups, render, write_if_changed), the
probe of an instance's /metrics against real local HTTP servers, and the
worker's membership record carrying its metrics address (bus/cluster.py)."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from bus.cluster import Member
from orchestrator import discovery
from orchestrator.discovery import Prober, render, target_groups, write_if_changed

SERVICES = {
    "gateway": {"127.0.0.1:8080-abc": {"host": "127.0.0.1", "port": 8080, "health": "/health", "service": "gateway"},
                "127.0.0.1:9080-def": {"host": "127.0.0.1", "port": 9080, "health": "/health", "service": "gateway"}},
    "orchestrator": {"127.0.0.1:8081-aaa": {"host": "127.0.0.1", "port": 8081, "service": "orchestrator"}},
    "dashboard": {"h:8086-bbb": {"host": "dash.local", "port": 8086}},
    "app.rideshare.rideshare.users": {
        "i-1": {"host": "127.0.0.1", "port": 8082, "tenant": "rideshare", "app": "rideshare", "role": "users"},
        "i-2": {"host": "127.0.0.1", "port": 40001, "tenant": "rideshare", "app": "rideshare", "role": "users"}},
    "app.acme.shop.web": {"i-3": {"host": "127.0.0.1", "port": 40002}},
    "users": {"127.0.0.1:40003-ccc": {"host": "127.0.0.1", "port": 40003}},
}
MEMBERS = {
    "w-1": Member(id="w-1", host="box", metrics_host="127.0.0.1", metrics_port=41000),
    "w-2": Member(id="w-2", host="box", metrics_port=41001),             # no metrics host: the member's host
    "w-3": Member(id="w-3", host="box"),                                 # serves no metrics
}


def groups_by(groups, **labels):
    return [g for g in groups if all(g["labels"].get(k) == v for k, v in labels.items())]


def test_every_component_gets_its_group_with_its_labels():
    asked = []

    def has_metrics(service, iid, rec):
        asked.append((service, iid))
        return iid != "i-3"    # acme's shop serves no /metrics

    groups = target_groups("c1", SERVICES, MEMBERS, has_metrics)
    assert all(g["labels"]["cluster"] == "c1" for g in groups)
    gw = groups_by(groups, component="gateway")
    assert gw == [{"targets": ["127.0.0.1:8080", "127.0.0.1:9080"], "labels": {"cluster": "c1", "component": "gateway"}}]
    assert groups_by(groups, component="orchestrator")[0]["targets"] == ["127.0.0.1:8081"]
    assert groups_by(groups, component="dashboard")[0]["targets"] == ["dash.local:8086"]
    workers = groups_by(groups, component="worker")
    assert {g["labels"]["worker"]: g["targets"] for g in workers} == {"w-1": ["127.0.0.1:41000"], "w-2": ["box:41001"]}
    users = groups_by(groups, component="app")
    assert users == [{"targets": ["127.0.0.1:40001", "127.0.0.1:8082"],
                      "labels": {"cluster": "c1", "component": "app", "tenant": "rideshare", "app": "rideshare",
                                 "role": "users"}}]
    assert groups_by(groups, component="service") == [
        {"targets": ["127.0.0.1:40003"], "labels": {"cluster": "c1", "component": "service", "service": "users"}}]
    # The platform's own components are never probed; apps and other services are.
    assert {s for s, _ in asked} == {"app.rideshare.rideshare.users", "app.acme.shop.web", "users"}


def test_bad_records_are_left_out_and_ipv6_is_bracketed():
    services = {"gateway": {"a": {"host": "::1", "port": 8080}, "b": {"host": "", "port": 1}, "c": {"port": 2},
                            "d": {"host": "x", "port": 0}, "e": {"host": "x", "port": "80"}, "f": "junk",
                            "g": {"host": "x", "port": True}, "h": {"host": "x", "port": 70000}}}
    members = {"w": Member(id="w", host=None, metrics_port=5000)}   # no host at all
    groups = target_groups("c", services, members)
    assert groups == [{"targets": ["[::1]:8080"], "labels": {"cluster": "c", "component": "gateway"}}]


def test_render_is_stable_and_valid_file_sd():
    a = render(target_groups("c", SERVICES, MEMBERS))
    shuffled = {k: dict(reversed(list(v.items()))) for k, v in reversed(list(SERVICES.items()))}
    b = render(target_groups("c", shuffled, dict(reversed(list(MEMBERS.items())))))
    assert a == b
    doc = json.loads(a)
    assert isinstance(doc, list) and doc
    for g in doc:   # what Prometheus's file_sd accepts: targets a list of host:port, labels strings
        assert set(g) == {"targets", "labels"} and g["targets"]
        assert all(isinstance(t, str) and t.rsplit(":", 1)[1].isdigit() for t in g["targets"])
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in g["labels"].items())
    assert render(target_groups("c", {}, {})) == "[]\n"


def test_write_if_changed_is_atomic_and_only_on_change(tmp_path):
    path = tmp_path / "targets" / "c.json"
    assert write_if_changed(path, "[]\n") is True
    mtime = path.stat().st_mtime_ns
    assert write_if_changed(path, "[]\n") is False and path.stat().st_mtime_ns == mtime
    assert write_if_changed(path, "[1]\n") is True and path.read_text() == "[1]\n"
    path.unlink()                                     # removed by someone else: written again
    assert write_if_changed(path, "[1]\n") is True and path.read_text() == "[1]\n"
    assert [p.name for p in path.parent.iterdir()] == ["c.json"]   # no temporary file left
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_sd_file_follows_the_settings(tmp_path):
    from bus.settings import Settings
    s = Settings(cluster="abc", state_dir=str(tmp_path), prometheus_sd_dir="")
    assert discovery.sd_file(s) == tmp_path.resolve() / "prometheus" / "targets" / "abc.json"
    s = Settings(cluster="abc", state_dir=str(tmp_path), prometheus_sd_dir=str(tmp_path / "sd"))
    assert discovery.sd_file(s) == tmp_path / "sd" / "abc.json"


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        kind, status, body = self.server.answer
        self.server.hits += 1
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def _server(answer):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.answer, srv.hits = answer, 0
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_prober_asks_once_and_needs_prometheus_text():
    text = _server(("text/plain; version=0.0.4; charset=utf-8", 200, b"x_total 1\n"))
    json_ = _server(("application/json", 200, b"{}"))            # answers everything: not metrics
    missing = _server(("application/json", 404, b'{"error": "not found"}'))
    try:
        p = Prober(timeout=2.0, retry=60.0)
        rec = lambda srv: {"host": "127.0.0.1", "port": srv.server_address[1]}   # noqa: E731
        assert p("app.t.a.r", "i1", rec(text)) is True
        assert p("app.t.a.r", "i2", rec(json_)) is False
        assert p("app.t.a.r", "i3", rec(missing)) is False
        for _ in range(3):
            p("app.t.a.r", "i1", rec(text)), p("app.t.a.r", "i2", rec(json_)), p("app.t.a.r", "i3", rec(missing))
        assert (text.hits, json_.hits, missing.hits) == (1, 1, 1)   # remembered per instance
        # Unreachable: not listed, and not asked again before the retry time.
        import socket
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        dead = {"host": "127.0.0.1", "port": s.getsockname()[1]}
        s.close()
        assert p("app.t.a.r", "i4", dead) is False
        assert ("app.t.a.r", "i4", "127.0.0.1", dead["port"]) in p.unreachable
        # Instances that left the registry are forgotten.
        p.forget_except({("app.t.a.r", "i1", "127.0.0.1", text.server_address[1])})
        assert list(p.known) == [("app.t.a.r", "i1", "127.0.0.1", text.server_address[1])] and not p.unreachable
    finally:
        for srv in (text, json_, missing):
            srv.shutdown()
            srv.server_close()


def test_member_carries_its_metrics_address():
    m = Member(id="w-1", pid=3, host="box", metrics_host="10.0.0.5", metrics_port=41000)
    d = m.to_dict()
    assert d["metrics_host"] == "10.0.0.5" and d["metrics_port"] == 41000
    assert Member.from_dict(d) == m
    assert "metrics_port" not in Member(id="w-2").to_dict()   # none served: nothing written
    for bad in (0, -1, 70000, "x", True, None):
        assert Member.from_dict({**d, "metrics_port": bad}).metrics_port is None
    assert Member.from_dict({**d, "metrics_host": 5}).metrics_host is None
