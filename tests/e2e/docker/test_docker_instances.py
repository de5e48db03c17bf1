"""App instances as containers (orchestrator/runtimes/docker.py, kind
"instance"), against the real engine of the Docker stage: a tiny package is
built into an image on the platform's base image (stratus/app:latest, offline),
run on a network of the test's own, reached by the container's address on it,
and its output lands in the instance's log file. A second runtime (a new
orchestrator) adopts it with its labels and port and hears its death with the
exit code; a stop is graceful (the instance's own exit status). Everything the
test made (containers, the image, the network) is removed and checked gone."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import urllib.request
import uuid

import pytest
from dockerkit import image_env, run, wait_for

from bus.ports import free_port
from bus.settings import load
from orchestrator.runtimes import Spec, instance_log
from orchestrator.runtimes.docker import DockerRuntime, app_base_image, app_image_tag

pytestmark = [pytest.mark.docker, pytest.mark.timeout(600)]

SERVER = r'''
import json, os, signal, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import bus  # installed in the base image's venv

class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"ok" if self.path == "/health" else json.dumps(
            {"env": dict(os.environ), "cwd": os.getcwd(), "bus": bus.__file__, "files": sorted(os.listdir("."))}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

def term(*_):
    print("got SIGTERM, exiting 3", flush=True)
    os._exit(3)

signal.signal(signal.SIGTERM, term)
print("hello from", os.environ["STRATUS_INSTANCE"], flush=True)
ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), H).serve_forever()
'''

SECRETS = {"STRATUS_ADMIN_PASSWORD": "admin-pw-not-for-tenants", "STRATUS_TOKEN_SECRET": "token-secret-xyz"}


class Exits:
    def __init__(self, rt):
        self.seen = []
        self.cond = threading.Condition()
        rt.on_exit(self.add)

    def add(self, uid, code):
        with self.cond:
            self.seen.append((uid, code))
            self.cond.notify_all()

    def wait(self, uid, timeout=30.0):
        with self.cond:
            assert self.cond.wait_for(lambda: any(u == uid for u, _ in self.seen), timeout), self.seen
            return [c for u, c in self.seen if u == uid]


def address(container: str) -> str:
    out = run(["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
               container]).stdout.split()
    assert out, f"{container} has no address"
    return out[0]


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.status == 200
        return r.read()


def test_an_instance_is_built_from_its_package_runs_adopted_and_stopped(tmp_path):
    cid = f"stinst{uuid.uuid4().hex[:8]}"
    net = f"{cid}-net"
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "server.py").write_text(SERVER)
    (pkg / "server.py").chmod(0o600)     # the image normalises modes: its user can read it
    digest = "sha256:" + hashlib.sha256(cid.encode()).hexdigest()
    settings = dataclasses.replace(load(), cluster=cid, state_dir=str(tmp_path / "state"))
    environ = {**image_env(), **SECRETS, "STRATUS_DOCKER_NETWORK": net}
    base_id = json.loads(run(["docker", "image", "inspect", app_base_image(environ)]).stdout)[0]["Id"]
    tag = app_image_tag("acme", "shop", digest, base_id)    # named after the package and the base it is built on
    run(["docker", "network", "create", "--label", f"stratus.cluster={cid}", net])
    runtimes = []

    def runtime():
        rt = DockerRuntime(settings, kind="instance", environ=environ)
        runtimes.append(rt)
        return rt

    def spec(iid, port):
        return Spec(id=iid, argv=("python", "server.py"), context=str(pkg), port=port,
                    env={"STRATUS_TENANT": "acme", "STRATUS_APP": "shop", "STRATUS_ROLE": "web",
                         "STRATUS_INSTANCE": iid},
                    labels={"tenant": "acme", "app": "shop", "role": "web", "digest": digest},
                    log=instance_log("acme", "shop", iid))
    try:
        first = runtime()
        port = free_port()
        h = first.start(spec("i-0000d0c1", port))
        assert (h.host, h.port) == (f"stratus-{cid}-i-0000d0c1", port)
        url = f"http://{address(h.host)}:{port}"
        wait_for(lambda: get(url + "/health") == b"ok", 60, what="the instance to serve")
        info = json.loads(get(url + "/env"))
        env = info["env"]
        assert env["PORT"] == str(port) and env["HOME"] == "/app" and info["cwd"] == "/app"
        assert info["files"] == ["server.py"]                     # exactly the package
        assert info["bus"].startswith("/opt/stratus/")            # the base image's bus
        assert "PYTHONPATH" not in env
        assert not any(k in env for k in SECRETS) and not any(v in json.dumps(env) for v in SECRETS.values())
        logf = tmp_path / "state" / "clusters" / cid / "logs" / "instances" / "acme" / "shop" / "i-0000d0c1.log"
        wait_for(lambda: "hello from i-0000d0c1" in logf.read_text(), 30, what="the greeting in its log file")
        image = json.loads(run(["docker", "image", "inspect", tag]).stdout)[0]
        assert image["Config"]["Labels"]["stratus.cluster"] == cid

        # a second instance reuses the image; a new orchestrator adopts both
        port2 = free_port()
        h2 = first.start(spec("i-0000d0c2", port2))
        assert json.loads(run(["docker", "image", "inspect", tag]).stdout)[0]["Id"] == image["Id"]
        first.close(remove=False)
        second = runtime()
        exits = Exits(second)
        adopted = {a.id: a for a in second.adopt()}
        assert set(adopted) == {"i-0000d0c1", "i-0000d0c2"}
        a = adopted["i-0000d0c1"]
        assert (a.host, a.port, a.pid, a.adopted) == (h.host, port, h.pid, True)
        assert a.labels == {"tenant": "acme", "app": "shop", "role": "web", "digest": digest}
        assert get(url + "/health") == b"ok"
        wait_for(lambda: logf.read_text().count("GET /health") >= 2, 30, what="the request after the takeover")
        assert logf.read_text().count("hello from i-0000d0c1") == 1   # the successor resumes, never repeats

        # a crash (kill -9 of its main process) and a graceful stop, each with its exit code
        run(["kill", "-9", str(a.pid)])
        assert exits.wait("i-0000d0c1") == [137]
        url2 = f"http://{address(h2.host)}:{port2}"
        wait_for(lambda: get(url2 + "/health") == b"ok", 60, what="the second instance to serve")
        second.stop("i-0000d0c2", timeout=10)
        assert exits.wait("i-0000d0c2") == [3]
        log2 = logf.with_name("i-0000d0c2.log")
        wait_for(lambda: "got SIGTERM" in log2.read_text(), 30, what="its last words in its log file")
        wait_for(lambda: not run(["docker", "ps", "-aq", "--filter", f"label=stratus.cluster={cid}"]).stdout.split(),
                 30, what="the dead containers to be removed")
        second.close(remove=True)
    finally:
        for rt in runtimes:
            rt.close(remove=True)
        left = run(["docker", "ps", "-aq", "--filter", f"label=stratus.cluster={cid}"], check=False).stdout.split()
        if left:
            run(["docker", "rm", "-f", *left], check=False)
        run(["docker", "image", "rm", "-f", tag], check=False)
        run(["docker", "network", "rm", net], check=False)
    assert not left, f"containers left behind: {left}"
