"""The Docker runtime's logic without a Docker engine: names, labels, the
environment a worker or an app instance gets, an instance's image (tag,
Dockerfile, build context), event parsing, and the start/kill/adopt/close
flows of both kinds against a small in-memory fake of the docker SDK. The real behaviour
(containers, die events, docker-compose down) is tested in the Docker stage."""
from __future__ import annotations

import hashlib
import types

import dataclasses
import threading
import time
from pathlib import Path

import pytest

from bus.settings import Settings
from orchestrator.runtimes import Spec, StartError, instance_log
from orchestrator.runtimes.docker import (DockerRuntime, app_base_image, app_image_tag, build_context,
                                          cluster_filters, container_instance_env, container_name, die_event,
                                          dockerfile_text, instance_labels, parse_started, spec_labels,
                                          volume_name, worker_env, worker_image, worker_labels)


def settings(**kw) -> Settings:
    return dataclasses.replace(Settings(), cluster="c1", amqp_url="amqp://guest:guest@rabbitmq:5672/%2F",
                               zk_hosts="zookeeper:2181", **kw)


# --- pure helpers -------------------------------------------------------------------
def test_names_and_labels_are_per_cluster_and_worker():
    assert container_name("c1", "w-1") == "stratus-c1-w-1"
    assert volume_name("c1", "w-1") == "stratus-c1-w-1-data"
    assert worker_labels("c1", "w-1") == {"stratus.cluster": "c1", "stratus.role": "worker",
                                          "stratus.worker_id": "w-1", "stratus.volume": "stratus-c1-w-1-data"}
    assert cluster_filters("c1") == {"label": ["stratus.cluster=c1", "stratus.role=worker"]}


def test_worker_env_passes_settings_but_not_secrets_or_runtime_knobs():
    environ = {"STRATUS_SCALE_WINDOW": "8", "STRATUS_ADMIN_PASSWORD": "pw", "STRATUS_TOKEN_SECRET": "s",
               "STRATUS_WORKER_IMAGE": "x/worker", "STRATUS_DOCKER_NETWORK": "net", "STRATUS_STATE_DIR": "/host",
               "STRATUS_AMQP_URL": "amqp://ignored", "PATH": "/usr/bin", "HOME": "/root"}
    env = worker_env(environ, settings(zk_timeout=1.5), "w-9")
    assert env["STRATUS_SCALE_WINDOW"] == "8"
    assert env["STRATUS_AMQP_URL"] == "amqp://guest:guest@rabbitmq:5672/%2F"  # as the orchestrator resolved it
    assert env["STRATUS_ZK_HOSTS"] == "zookeeper:2181"
    assert env["STRATUS_CLUSTER"] == "c1"
    assert env["STRATUS_ZK_TIMEOUT"] == "1.5"
    assert env["STRATUS_WORKER_ID"] == "w-9"
    assert env["STRATUS_STATE_DIR"] == "/var/lib/stratus"
    for secret in ("STRATUS_ADMIN_PASSWORD", "STRATUS_TOKEN_SECRET", "STRATUS_WORKER_IMAGE",
                   "STRATUS_DOCKER_NETWORK", "PATH", "HOME"):
        assert secret not in env


def test_worker_image_default_and_override():
    assert worker_image({}) == "stratus/worker:latest"
    assert worker_image({"STRATUS_IMAGE_PREFIX": "reg.example/st"}) == "reg.example/st/worker:latest"
    assert worker_image({"STRATUS_WORKER_IMAGE": "mine/w:1"}) == "mine/w:1"


def test_parse_started():
    assert parse_started("1970-01-01T00:00:10.5Z") == pytest.approx(10.5)
    assert parse_started("2026-11-23T10:43:52.381928123Z") == pytest.approx(1795430632.381928, abs=1e-5)
    assert parse_started("0001-01-01T00:00:00Z") == 0.0
    assert parse_started("") == 0.0 and parse_started(None) == 0.0 and parse_started("garbage") == 0.0


def _event(action="die", cluster="c1", role="worker", wid="w-1", code="137"):
    attrs = {"stratus.cluster": cluster, "stratus.role": role, "stratus.worker_id": wid, "name": "x"}
    if code is not None:
        attrs["exitCode"] = code
    return {"Type": "container", "Action": action, "Actor": {"ID": "cid1", "Attributes": attrs}}


def test_die_event_parsing():
    assert die_event(_event(), "c1") == ("cid1", "w-1", 137)
    assert die_event(_event(code=None), "c1") == ("cid1", "w-1", None)
    assert die_event(_event(action="start"), "c1") is None
    assert die_event(_event(cluster="other"), "c1") is None
    assert die_event(_event(role="gateway"), "c1") is None
    assert die_event({"Type": "network", "Action": "die"}, "c1") is None


# --- a fake docker SDK ----------------------------------------------------------------
class NotFound(Exception):
    status_code = 404


class FakeContainer:
    def __init__(self, api, cid, name, labels, pid, status="running"):
        self.api, self.id, self.name, self.labels = api, cid, name, labels
        self.attrs = {"State": {"Status": status, "Running": status == "running", "Pid": pid if status == "running" else 0,
                                "StartedAt": "2026-01-01T00:00:00.5Z", "ExitCode": 0}}
        self.stop_timeout = None

    def reload(self):
        pass

    def start(self):
        self.started = True

    def _die(self, code):
        if self.attrs["State"]["Status"] != "running":
            return
        self.attrs["State"].update(Status="exited", Running=False, Pid=0, ExitCode=code)
        self.api.emit({"Type": "container", "Action": "die",
                       "Actor": {"ID": self.id, "Attributes": {**self.labels, "exitCode": str(code)}}})

    def kill(self, signal="SIGKILL"):
        self._die(137)

    def stop(self, timeout=10):
        self.stop_timeout = timeout
        self._die(0)

    def remove(self, force=False):
        self.api.containers_by_id.pop(self.id, None)

    def logs(self, **kw):
        self.api.log_calls.append((self.id, kw))
        return iter(list(self.api.output.get(self.name, [])))


class FakeNetwork:
    def __init__(self, api, name, kw):
        self.api, self.name, self.id, self.kw = api, name, f"net-{name}", kw
        self.attrs = {"Labels": kw.get("labels") or {}, "Containers": {}}
        self.aliases: dict[str, list] = {}
        self.removed = False

    def reload(self):
        pass

    def connect(self, c, aliases=None):
        self.attrs["Containers"][c.id] = {"Name": c.name}
        self.aliases[c.name] = aliases

    def disconnect(self, cid, force=False):
        self.attrs["Containers"].pop(cid, None)

    def remove(self):
        assert not self.attrs["Containers"], "a network with containers cannot be removed"
        self.removed = True
        self.api.nets.pop(self.name, None)


class FakeVolume:
    def __init__(self, api, name, labels):
        self.api, self.name, self.attrs = api, name, {"Labels": labels}

    def remove(self, force=False):
        self.api.volumes_by_name.pop(self.name, None)


class FakeStream:
    def __init__(self):
        self.cond = threading.Condition()
        self.items = []
        self.closed = False

    def put(self, ev):
        with self.cond:
            self.items.append(ev)
            self.cond.notify_all()

    def close(self):
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def __iter__(self):
        while True:
            with self.cond:
                while not self.items and not self.closed:
                    self.cond.wait(0.1)
                if self.closed:
                    return
                ev = self.items.pop(0)
            yield ev


class FakeDocker:
    """Just enough of docker.DockerClient for the runtime."""

    def __init__(self):
        self.containers_by_id: dict[str, FakeContainer] = {}
        self.volumes_by_name: dict[str, FakeVolume] = {}
        self.streams: list[FakeStream] = []
        self.runs: list[tuple[str, dict]] = []
        self.next_pid = 1000
        self.containers = self._Containers(self)
        self.networks = self._Networks(self)
        self.nets: dict[str, FakeNetwork] = {}
        self.volumes = self._Volumes(self)
        self.images = self._Images(self)
        self.built: dict[str, dict] = {}          # tag -> build kwargs (and the context's members)
        self.bases = {"pfx/app:latest": "sha256:" + "ba5e" * 16}   # the platform's base image, present
        self.build_fails = False
        self.output: dict[str, list[bytes]] = {}  # container name -> what it prints
        self.log_calls: list[tuple[str, dict]] = []

    def emit(self, ev):
        for s in self.streams:
            s.put(ev)

    def events(self, decode=True, filters=None):
        s = FakeStream()
        self.streams.append(s)
        return s

    def close(self):
        pass

    def add(self, name, labels, status="running"):
        self.next_pid += 1
        c = FakeContainer(self, f"id-{name}", name, labels, self.next_pid, status)
        self.containers_by_id[c.id] = c
        return c

    @staticmethod
    def _match(labels, filters, networks=None):
        for f in (filters or {}).get("label", []):
            k, eq, v = f.partition("=")
            if (labels.get(k) != v) if eq else (k not in labels):
                return False
        net = (filters or {}).get("network")
        return net is None or net in (networks or ())

    class _Containers:
        def __init__(self, api):
            self.api = api

        def create(self, image, **kw):
            self.api.runs.append((image, kw))
            if image == "missing/image":
                raise NotFound(image)
            return self.api.add(kw["name"], kw["labels"])

        def get(self, cid):
            try:
                return self.api.containers_by_id[cid]
            except KeyError:
                raise NotFound(cid)

        def list(self, all=False, filters=None):
            return [c for c in list(self.api.containers_by_id.values())
                    if self.api._match(c.labels, filters, getattr(c, "networks", ()))
                    and (all or c.attrs["State"]["Status"] == "running")]

    class _Networks:
        def __init__(self, api):
            self.api = api

        def get(self, name):
            try:
                return self.api.nets[name]
            except KeyError:
                raise NotFound(name)

        def create(self, name, **kw):
            n = FakeNetwork(self.api, name, kw)
            self.api.nets[name] = n
            return n

        def list(self, filters=None):
            return [n for n in list(self.api.nets.values()) if self.api._match(n.attrs["Labels"], filters)]

    class _Images:
        def __init__(self, api):
            self.api = api

        def get(self, tag):
            if tag in self.api.bases:
                return types.SimpleNamespace(id=self.api.bases[tag])
            if tag not in self.api.built:
                raise NotFound(tag)
            return types.SimpleNamespace(id="sha256:" + hashlib.sha256(tag.encode()).hexdigest())

        def build(self, fileobj=None, custom_context=False, **kw):
            import tarfile
            with tarfile.open(fileobj=fileobj, mode="r") as tar:
                kw["members"] = {m.name: (m.uid, m.mode, tar.extractfile(m).read() if m.isfile() else None)
                                 for m in tar.getmembers()}
            kw["custom_context"] = custom_context
            if self.api.build_fails:
                raise RuntimeError("The command '/bin/sh -c x' returned a non-zero code: 1")
            self.api.built[kw["tag"]] = kw
            return kw["tag"], iter(())

    class _Volumes:
        def __init__(self, api):
            self.api = api

        def create(self, name, labels=None):
            v = FakeVolume(self.api, name, labels or {})
            self.api.volumes_by_name[name] = v
            return v

        def get(self, name):
            try:
                return self.api.volumes_by_name[name]
            except KeyError:
                raise NotFound(name)

        def list(self, filters=None):
            return [v for v in list(self.api.volumes_by_name.values())
                    if self.api._match(v.attrs["Labels"], filters)]


def wait(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    raise AssertionError("timed out")


@pytest.fixture
def fake(monkeypatch, tmp_path):
    # the platform's secrets as the orchestrator would see them: never this machine's
    monkeypatch.setenv("STRATUS_ZK_AUTH", "stratus:unit-zk-secret")
    monkeypatch.setenv("STRATUS_SECRETS_DIR", str(tmp_path / "secrets"))
    return FakeDocker()


@pytest.fixture
def runtime(fake):
    rt = DockerRuntime(settings(), client_factory=lambda: fake,
                       environ={"STRATUS_WORKER_IMAGE": "img/worker:t", "STRATUS_DOCKER_NETWORK": "net1",
                                "STRATUS_SCALE_WINDOW": "5"})
    yield rt
    rt.close(remove_workers=False)


def test_start_worker_runs_a_labelled_container_with_its_own_volume(runtime, fake):
    h = runtime.start_worker("w-1")
    image, kw = fake.runs[0]
    assert image == "img/worker:t"
    assert kw["command"] == ["python", "-m", "worker", "--id", "w-1"]
    assert kw["network"] == "net1" and kw["name"] == "stratus-c1-w-1"
    assert kw["labels"]["stratus.cluster"] == "c1" and kw["labels"]["stratus.worker_id"] == "w-1"
    assert kw["volumes"] == {"stratus-c1-w-1-data": {"bind": "/var/lib/stratus", "mode": "rw"}}
    assert "stratus-c1-w-1-data" in fake.volumes_by_name
    assert kw["environment"]["STRATUS_SCALE_WINDOW"] == "5"
    assert h.pid == fake.containers_by_id[h.ref].attrs["State"]["Pid"] > 0
    assert set(runtime.workers()) == {"w-1"}


def test_a_missing_image_is_an_error_and_leaves_no_volume(fake):
    rt = DockerRuntime(settings(), client_factory=lambda: fake, environ={"STRATUS_WORKER_IMAGE": "missing/image"})
    try:
        with pytest.raises(NotFound):
            rt.start_worker("w-1")
        assert fake.volumes_by_name == {} and rt.workers() == {}
    finally:
        rt.close(remove_workers=False)


def test_a_die_event_reports_the_exit_and_removes_container_and_volume(runtime, fake):
    exits = []
    runtime.on_exit(lambda wid, code: exits.append((wid, code)))
    h = runtime.start_worker("w-1")
    runtime.start_worker("w-2")
    runtime.kill_worker("w-1")
    wait(lambda: exits == [("w-1", 137)])
    assert set(runtime.workers()) == {"w-2"}
    wait(lambda: h.ref not in fake.containers_by_id and "stratus-c1-w-1-data" not in fake.volumes_by_name)
    with pytest.raises(KeyError):
        runtime.kill_worker("w-unknown")


def test_stop_worker_is_graceful_with_the_timeout(runtime, fake):
    exits = []
    runtime.on_exit(lambda wid, code: exits.append((wid, code)))
    h = runtime.start_worker("w-1")
    c = fake.containers_by_id[h.ref]
    runtime.stop_worker("w-1", timeout=7)
    assert c.stop_timeout == 7
    assert runtime.workers() == {}
    wait(lambda: exits == [("w-1", 0)])


def test_adopt_takes_running_containers_and_removes_dead_ones(fake):
    running = fake.add("stratus-c1-w-a", worker_labels("c1", "w-a"))
    fake.volumes.create(volume_name("c1", "w-a"), worker_labels("c1", "w-a"))
    dead = fake.add("stratus-c1-w-b", worker_labels("c1", "w-b"), status="exited")
    fake.volumes.create(volume_name("c1", "w-b"), worker_labels("c1", "w-b"))
    other = fake.add("stratus-c2-w-c", worker_labels("c2", "w-c"))
    fake.volumes.create("stratus-c1-w-gone-data", worker_labels("c1", "w-gone"))  # orphan volume
    rt = DockerRuntime(settings(), client_factory=lambda: fake, environ={})
    try:
        adopted = rt.adopt()
        assert [(h.id, h.pid, h.labels["adopted"]) for h in adopted] == [("w-a", running.attrs["State"]["Pid"], True)]
        assert adopted[0].started == pytest.approx(parse_started("2026-01-01T00:00:00.5Z"))
        assert dead.id not in fake.containers_by_id
        assert set(fake.volumes_by_name) == {"stratus-c1-w-a-data"}
        assert other.id in fake.containers_by_id  # another cluster's worker is not ours
        assert set(rt.workers()) == {"w-a"}
        assert rt.adopt() == []  # idempotent
    finally:
        rt.close(remove_workers=False)


def test_close_removes_its_workers_and_the_dead_ones_of_the_cluster(fake):
    other = fake.add("stratus-c2-w-c", worker_labels("c2", "w-c"))
    rt = DockerRuntime(settings(), client_factory=lambda: fake, environ={})
    rt.start_worker("w-1")
    rt.start_worker("w-2")
    fake.add("stratus-c1-w-3", worker_labels("c1", "w-3"), status="exited")  # left by an earlier run
    rt.close(remove_workers=True)
    assert [c.id for c in fake.containers_by_id.values()] == [other.id]
    assert fake.volumes_by_name == {}
    assert rt.workers() == {}


def test_a_standby_closing_leaves_the_leaders_running_workers_alone(fake):
    leaders = fake.add("stratus-c1-w-l", worker_labels("c1", "w-l"))  # started by the leading orchestrator
    standby = DockerRuntime(settings(), client_factory=lambda: fake, environ={})
    standby.close(remove_workers=True)
    assert leaders.id in fake.containers_by_id and leaders.attrs["State"]["Status"] == "running"


def test_close_without_removal_leaves_workers_for_a_successor(fake):
    rt = DockerRuntime(settings(), client_factory=lambda: fake, environ={})
    h = rt.start_worker("w-1")
    rt.close(remove_workers=False)
    assert fake.containers_by_id[h.ref].attrs["State"]["Status"] == "running"


# --- app instances ------------------------------------------------------------------------
DIGEST = "sha256:" + "0123456789abcdef" * 4


def instance_spec(iid="i-1a2b3c4d", *, image=None, context=None, port=8000, **kw):
    return Spec(id=iid, argv=("python", "-m", "shop.web"), image=image, context=context, port=port,
                env={"STRATUS_TENANT": "acme", "STRATUS_AMQP_URL": "amqp://acme:tenant-pw@rabbitmq:5672/%2F"},
                labels={"tenant": "acme", "app": "shop", "role": "web", "digest": DIGEST},
                log=instance_log("acme", "shop", iid), **kw)


def test_instance_labels_names_and_filters():
    spec = instance_spec()
    labels = instance_labels("c1", spec)
    assert labels == {"stratus.cluster": "c1", "stratus.kind": "instance", "stratus.instance_id": "i-1a2b3c4d",
                      "stratus.port": "8000", "stratus.log": "instances/acme/shop/i-1a2b3c4d.log",
                      "stratus.label.tenant": "acme", "stratus.label.app": "shop", "stratus.label.role": "web",
                      "stratus.label.digest": DIGEST}
    assert spec_labels(labels) == dict(spec.labels)
    assert container_name("c1", "i-1a2b3c4d") == "stratus-c1-i-1a2b3c4d"
    assert cluster_filters("c1", "instance") == {"label": ["stratus.cluster=c1", "stratus.kind=instance"]}
    assert "stratus.role" not in labels      # the worker filter (stratus.role=worker) never selects an instance
    # die events: each kind hears only its own
    ev = {"Type": "container", "Action": "die", "Actor": {"ID": "cid9", "Attributes": {**labels, "exitCode": "3"}}}
    assert die_event(ev, "c1", "instance") == ("cid9", "i-1a2b3c4d", 3)
    assert die_event(ev, "c1", "worker") is None
    assert die_event(_event(), "c1", "instance") is None
    assert die_event(ev, "c2", "instance") is None


def test_instance_container_env_holds_nothing_of_the_orchestrator():
    env = container_instance_env(instance_spec())
    assert env == {"LANG": "C.UTF-8", "HOME": "/app", "PYTHONUNBUFFERED": "1", "PORT": "8000",
                   "STRATUS_TENANT": "acme", "STRATUS_AMQP_URL": "amqp://acme:tenant-pw@rabbitmq:5672/%2F"}
    own = container_instance_env(instance_spec(image="acme/own:1", port=None))
    assert "HOME" not in own and "PORT" not in own       # an image of its own keeps its HOME
    assert container_instance_env(instance_spec(image="acme/own:1", cwd="/srv"))["HOME"] == "/srv"
    # the package's directory on the orchestrator's host means nothing inside an image
    host_dir = instance_spec(image="acme/own:1", cwd="/var/state/pkg", context="/var/state/pkg")
    assert "HOME" not in container_instance_env(host_dir)


def test_app_image_tag_base_and_dockerfile():
    assert app_image_tag("acme", "shop", DIGEST) == "stratus-app/acme-shop:0123456789ab"
    # a rebuilt base image makes another tag: an app never keeps an old base's code
    assert app_image_tag("acme", "shop", DIGEST, "sha256:" + "ba5e" * 16) == "stratus-app/acme-shop:0123456789ab-ba5eba5e"
    for bad in (("acme", "shop", "sha256:xyz"), ("acme", "shop", "0123"), ("Acme", "shop", DIGEST),
                ("acme", "sh/op", DIGEST), ("", "shop", DIGEST)):
        with pytest.raises(ValueError):
            app_image_tag(*bad)
    assert app_base_image({}) == "stratus/app:latest"
    assert app_base_image({"STRATUS_IMAGE_PREFIX": "reg.example/st"}) == "reg.example/st/app:latest"
    assert dockerfile_text("stratus/app:latest") == "FROM stratus/app:latest\nCOPY . /app\nWORKDIR /app\n"


def make_package(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "shop").mkdir(parents=True)
    (pkg / "shop" / "web.py").write_text("print('hi')\n")
    (pkg / "shop" / "web.py").chmod(0o600)              # unreadable to the image's user unless normalised
    (pkg / "run.sh").write_text("#!/bin/sh\n")
    (pkg / "run.sh").chmod(0o700)
    (pkg / ".dockerignore").write_text("shop\n")        # a package's own: not used
    return pkg


def test_build_context_is_the_package_plus_the_generated_dockerfile(tmp_path):
    import io
    import tarfile
    buf = io.BytesIO()
    build_context(make_package(tmp_path), "stratus/app:latest", buf)
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"shop", "shop/web.py", "run.sh", ".stratus.Dockerfile", ".dockerignore"}
        assert tar.extractfile(".stratus.Dockerfile").read() == b"FROM stratus/app:latest\nCOPY . /app\nWORKDIR /app\n"
        assert tar.extractfile(".dockerignore").read() == b".stratus.Dockerfile\n.dockerignore\n"
    assert all(m.uid == 0 and m.gid == 0 for m in members.values())
    assert members["shop/web.py"].mode == 0o644 and members["run.sh"].mode == 0o755 and members["shop"].mode == 0o755
    with pytest.raises(StartError):
        build_context(tmp_path / "nope", "stratus/app:latest", io.BytesIO())


@pytest.fixture
def instances(fake, tmp_path):
    rt = DockerRuntime(settings(state_dir=str(tmp_path / "state")), client_factory=lambda: fake, kind="instance",
                       environ={"STRATUS_IMAGE_PREFIX": "pfx", "STRATUS_DOCKER_NETWORK": "net1",
                                "STRATUS_ADMIN_PASSWORD": "admin-pw", "STRATUS_TOKEN_SECRET": "tok"})
    yield rt
    rt.close(remove=False)


def test_an_instance_is_built_once_from_its_package_and_runs_labelled(instances, fake, tmp_path):
    pkg = make_package(tmp_path)
    fake.output["stratus-c1-i-00000001"] = [b"hello from i-00000001\n", b"serving\n"]
    exits = []
    instances.on_exit(lambda uid, code: exits.append((uid, code)))
    h = instances.start(instance_spec("i-00000001", context=str(pkg)))
    tag = "stratus-app/acme-shop:0123456789ab-ba5eba5e"   # the package digest, then the base image's id
    built = fake.built[tag]
    assert built["custom_context"] and built["dockerfile"] == ".stratus.Dockerfile" and built["pull"] is False
    assert built["labels"] == {"stratus.cluster": "c1"} and built["network_mode"] == "none"
    assert built["members"][".stratus.Dockerfile"][2] == b"FROM pfx/app:latest\nCOPY . /app\nWORKDIR /app\n"
    image, kw = fake.runs[0]
    assert image == tag and kw["name"] == "stratus-c1-i-00000001" and kw["network"] == "stratus-c1-tenant-acme"
    assert kw["command"] == ["python", "-m", "shop.web"] and kw["working_dir"] == "/app"
    assert kw["labels"] == instance_labels("c1", instance_spec("i-00000001", context=str(pkg)))
    assert kw["environment"] == container_instance_env(instance_spec("i-00000001"))
    assert "volumes" not in kw
    assert (h.host, h.port, h.adopted) == ("stratus-c1-i-00000001", 8000, False)
    assert h.labels == {"tenant": "acme", "app": "shop", "role": "web", "digest": DIGEST}
    # its output is followed into the process runtime's log file layout
    logf = tmp_path / "state" / "clusters" / "c1" / "logs" / "instances" / "acme" / "shop" / "i-00000001.log"
    assert h.log == str(logf)
    wait(lambda: logf.exists() and logf.read_bytes() == b"hello from i-00000001\nserving\n")
    # a second instance of the same package reuses the image
    instances.start(instance_spec("i-00000002", context=str(pkg)))
    assert len(fake.built) == 1 and fake.runs[1][0] == tag
    assert set(instances.running()) == {"i-00000001", "i-00000002"}
    # a crash: the die event reports the exit code, the container goes
    instances.kill("i-00000001")
    wait(lambda: exits == [("i-00000001", 137)])
    wait(lambda: h.ref not in fake.containers_by_id)
    assert set(instances.running()) == {"i-00000002"}


def test_a_failed_build_or_missing_image_is_a_start_error(instances, fake, tmp_path):
    fake.build_fails = True
    with pytest.raises(StartError, match="building stratus-app/acme-shop"):
        instances.start(instance_spec("i-00000003", context=str(make_package(tmp_path))))
    with pytest.raises(StartError, match="no image and no build context"):
        instances.start(instance_spec("i-00000004"))
    with pytest.raises(StartError, match="missing/image"):
        instances.start(instance_spec("i-00000005", image="missing/image"))
    assert fake.containers_by_id == {} and instances.running() == {}


def test_instances_are_adopted_with_their_labels_and_kinds_stay_apart(fake, tmp_path):
    st = settings(state_dir=str(tmp_path / "state"))
    first = DockerRuntime(st, client_factory=lambda: fake, kind="instance", environ={})
    workers = DockerRuntime(st, client_factory=lambda: fake, environ={})
    h = first.start(instance_spec("i-00000006", image="acme/own:1"))
    w = workers.start_worker("w-1")
    dead = fake.add("stratus-c1-i-00000007", instance_labels("c1", instance_spec("i-00000007")), status="exited")
    first.close(remove=False)
    workers.close(remove_workers=False)

    second = DockerRuntime(st, client_factory=lambda: fake, kind="instance", environ={})
    workers2 = DockerRuntime(st, client_factory=lambda: fake, environ={})
    try:
        wait(lambda: Path(h.log).exists())
        mtime_before = Path(h.log).stat().st_mtime
        adopted = second.adopt()
        assert [(a.id, a.host, a.port, a.adopted, a.ref) for a in adopted] == \
            [("i-00000006", "stratus-c1-i-00000006", 8000, True, h.ref)]
        assert adopted[0].labels == {"tenant": "acme", "app": "shop", "role": "web", "digest": DIGEST}
        assert adopted[0].log.endswith("logs/instances/acme/shop/i-00000006.log")
        assert dead.id not in fake.containers_by_id              # a dead instance is removed
        assert [x.id for x in workers2.adopt()] == ["w-1"]       # workers adopt workers only
        # the successor follows the output on from where the log file ends
        # (the first runtime's follower may still be finishing its last write:
        # the successor's `since` is the file's time when it looked)
        calls = lambda: [kw.get("since") for cid, kw in fake.log_calls if cid == h.ref]  # noqa: E731
        wait(lambda: len(calls()) == 2)
        first_since, since = calls()
        assert first_since is None and mtime_before <= since <= Path(h.log).stat().st_mtime
        # closing the instances leaves the workers alone, and vice versa
        second.close(remove=True)
        assert h.ref not in fake.containers_by_id and w.ref in fake.containers_by_id
        assert second.running() == {}
    finally:
        second.close(remove=False)
        workers2.close(remove_workers=True)
    assert w.ref not in fake.containers_by_id


# --- the walls (issue #22) -----------------------------------------------------------
def test_confinement_is_the_engines_own_limits_and_an_unprivileged_user():
    from orchestrator.runtimes.docker import confinement, log_options, tenant_uid
    from orchestrator.runtimes.limits import Limits
    lim = Limits(memory_mb=300, cpus=0.5, pids=64, disk_mb=32, log_mb=10)
    kw = confinement(lim, 234567)
    assert kw["user"] == "234567:234567" and kw["cap_drop"] == ["ALL"] and kw["read_only"] is True
    assert kw["security_opt"] == ["no-new-privileges:true"]
    assert kw["mem_limit"] == kw["memswap_limit"] == "300m"      # no swap beyond the memory limit
    assert kw["nano_cpus"] == 500_000_000 and kw["pids_limit"] == 64
    assert kw["tmpfs"] == {"/tmp": "rw,nosuid,nodev,size=32m,mode=1777"}
    assert kw["log_config"] == {"type": "json-file", "config": {"max-size": "5120k", "max-file": "2"}}
    assert log_options(Limits(log_mb=1)) == {"max-size": "512k", "max-file": "2"}
    uid = tenant_uid("c1", "acme")
    assert 200000 <= uid <= 299999 and uid == tenant_uid("c1", "acme")
    assert uid != tenant_uid("c1", "globex") and uid != tenant_uid("c2", "acme")


def test_peers_setting_is_parsed():
    from orchestrator.runtimes.docker import parse_peers
    assert parse_peers("amqp-relay:rabbitmq, gateway,,prometheus") == [
        ("amqp-relay", "rabbitmq"), ("gateway", None), ("prometheus", None)]
    assert parse_peers(None) == [] and parse_peers("") == []


def test_each_tenant_gets_an_internal_network_with_the_peers_and_loses_it_with_its_last_instance(fake, tmp_path):
    rt = DockerRuntime(settings(state_dir=str(tmp_path / "state")), client_factory=lambda: fake, kind="instance",
                       environ={"STRATUS_IMAGE_PREFIX": "pfx", "STRATUS_DOCKER_NETWORK": "net1",
                                "STRATUS_DOCKER_TENANT_PEERS": "amqp-relay:rabbitmq,gateway"})
    relay = fake.add("proj-amqp-relay-1", {"com.docker.compose.service": "amqp-relay"})
    gw = fake.add("proj-gateway-1", {"com.docker.compose.service": "gateway"})
    zk = fake.add("proj-zookeeper-1", {"com.docker.compose.service": "zookeeper"})
    other = fake.add("elsewhere-gateway-1", {"com.docker.compose.service": "gateway"})
    for c in (relay, gw, zk):
        c.networks = ("net1",)
    other.networks = ("net9",)
    try:
        rt.start(instance_spec("i-00000001", image="img/shop:1"))
        rt.start(instance_spec("i-00000002", image="img/shop:1"))
        spec = instance_spec("i-00000003", image="img/shop:1")
        spec = dataclasses.replace(spec, labels={**spec.labels, "tenant": "globex"})
        rt.start(spec)
        acme = fake.nets["stratus-c1-tenant-acme"]
        assert acme.kw["internal"] is True and acme.kw["driver"] == "bridge"
        assert acme.attrs["Labels"] == {"stratus.cluster": "c1", "stratus.kind": "tenant-network",
                                        "stratus.tenant": "acme"}
        # the relay under the broker's name, the gateway; never ZooKeeper nor another stack's gateway
        assert acme.aliases == {"proj-amqp-relay-1": ["rabbitmq"], "proj-gateway-1": None}
        assert set(fake.nets) == {"stratus-c1-tenant-acme", "stratus-c1-tenant-globex"}
        networks = [kw["network"] for _, kw in fake.runs]
        assert networks == ["stratus-c1-tenant-acme", "stratus-c1-tenant-acme", "stratus-c1-tenant-globex"]
        assert all(kw["user"] == f"{u}:{u}" for (_, kw), u in zip(fake.runs, [
            __import__("orchestrator.runtimes.docker", fromlist=["x"]).tenant_uid("c1", t)
            for t in ("acme", "acme", "globex")]))
        rt.stop("i-00000001", timeout=1)
        assert "stratus-c1-tenant-acme" in fake.nets          # acme still has an instance
        rt.stop("i-00000002", timeout=1)
        assert "stratus-c1-tenant-acme" not in fake.nets and acme.removed
        rt.close(remove=True)
        assert fake.nets == {}                               # globex's went with the runtime's removal
    finally:
        rt.close(remove=False)


def test_a_swarm_service_gets_what_the_engine_allows_of_the_walls():
    from orchestrator.runtimes.limits import Limits
    from orchestrator.runtimes.swarm import service_confinement
    kw = service_confinement(Limits(memory_mb=200, cpus=2.0, pids=50, disk_mb=16, log_mb=8), 211111)
    assert kw["user"] == "211111:211111" and kw["cap_drop"] == ["ALL"] and kw["read_only"] is True
    assert kw["resources"]["Limits"] == {"NanoCPUs": 2_000_000_000, "MemoryBytes": 200 << 20, "Pids": 50}
    (m,) = kw["mounts"]
    assert m["Type"] == "tmpfs" and m["Target"] == "/tmp" and m["TmpfsOptions"] == {"Mode": 0o1777,
                                                                                   "SizeBytes": 16 << 20}
    assert kw["log_driver"] == "json-file" and kw["log_driver_options"] == {"max-size": "4096k", "max-file": "2"}
    assert "security_opt" not in kw     # no such field for a service on API 1.41 (see service_confinement)


def test_a_worker_gets_the_platforms_zookeeper_identity_and_its_own_broker_account(monkeypatch, tmp_path):
    from orchestrator.runtimes.docker import worker_secrets_env
    sec = tmp_path / "secrets"
    sec.mkdir()
    (sec / "broker-worker.url").write_text("amqp://stratus-worker:pw@rabbitmq:5672/%2F\n")
    monkeypatch.setenv("STRATUS_SECRETS_DIR", str(sec))
    monkeypatch.setenv("STRATUS_ZK_AUTH", "stratus:zk-secret")
    assert worker_secrets_env({}, settings()) == {"STRATUS_AMQP_URL": "amqp://stratus-worker:pw@rabbitmq:5672/%2F",
                                                  "STRATUS_ZK_AUTH": "stratus:zk-secret"}
    # an orchestrator given an explicit URL passes that one (worker_env); auth off is said so
    monkeypatch.setenv("STRATUS_ZK_AUTH", "none")
    assert worker_secrets_env({"STRATUS_AMQP_URL": "amqp://x:y@h:5672/%2F"}, settings()) == {"STRATUS_ZK_AUTH": "none"}


def test_a_started_worker_container_carries_the_zookeeper_identity(runtime, fake):
    runtime.start(Spec(id="w-00000001", argv=("python", "-m", "worker", "--id", "w-00000001")))
    _, kw = fake.runs[0]
    assert kw["environment"]["STRATUS_ZK_AUTH"] == "stratus:unit-zk-secret"
    assert "user" not in kw and "cap_drop" not in kw     # a DB worker is the platform's: not confined
