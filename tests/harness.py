"""A real local cluster for tests: a unique STRATUS_CLUSTER namespace on the
shared RabbitMQ and ZooKeeper, processes started by pid and cleaned up by pid,
queues and znodes deleted at the end. Every wait is bounded."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pika

from bus import ops
from bus import zk as bzk
from bus.errors import DBError
from bus.client import DBClient, connection_params
from bus.cluster import Member, set_leader, workers
from bus.names import Names, Paths
from bus.ports import free_port  # noqa: F401  (tests import it from here)
from bus.settings import Settings, load, secrets_dir
from bus.topology import delete_cluster
from stratus.measure import wait_for  # noqa: F401  (tests import it from here)

ROOT = Path(__file__).resolve().parent.parent


def sqlite_checksum(path: Path) -> dict[str, str]:
    import hashlib
    import json
    import sqlite3
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        out = {}
        for name, definition in conn.execute("SELECT name, definition FROM _stratus_tables ORDER BY name"):
            pk = ", ".join(f'"{c}"' for c in json.loads(definition)["primary_key"])
            h = hashlib.sha256()
            for row in conn.execute(f'SELECT * FROM "{name}" ORDER BY {pk}'):
                h.update(json.dumps(list(row)).encode())
            out[name] = h.hexdigest()
        return out
    finally:
        conn.close()


def restart_rabbitmq(down_for: float = 1.0) -> float:
    """Restart the broker's application (stop_app, start_app), as a broker
    restart looks to clients; durable queues and streams survive it. Returns
    the monotonic time it went down. Skips the test without rabbitmqctl."""
    import shutil
    import pytest
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is needed to restart the broker")
    try:
        subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True, timeout=60, capture_output=True)
        down_at = time.monotonic()
        time.sleep(down_for)
    finally:
        subprocess.run(["rabbitmqctl", "-q", "start_app"], check=True, timeout=120, capture_output=True)
        subprocess.run(["rabbitmqctl", "-q", "await_startup"], timeout=120, capture_output=True)
    return down_at


# --- concurrent writers with a set check (no acknowledged write lost or doubled) ---
EV_TABLE = ops.create_table("ev", [ops.column("id", "integer", nullable=False),
                                   ops.column("k", "text", nullable=False)], ["id"])


class Writers:
    """`n` threads inserting unique keys through one DB client; each records
    the keys whose write was acknowledged, with the time of the reply."""

    def __init__(self, db, n: int = 4):
        self.db = db
        self.stop = threading.Event()
        self.acked: list[tuple[float, str, int]] = []   # (monotonic time, key, lsn)
        self.failed: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def _run(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            key = f"t{i}-{n}-{uuid.uuid4().hex[:6]}"
            n += 1
            try:
                r = self.db.write([ops.insert("ev", {"id": ops.seq("ev"), "k": key})], timeout=15)
            except DBError:
                with self.lock:
                    self.failed.append(key)
                time.sleep(0.02)
                continue
            with self.lock:
                self.acked.append((time.monotonic(), key, r.lsn))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def acked_after(self, t: float) -> list:
        with self.lock:
            return [a for a in self.acked if a[0] >= t]


def check_no_loss(db, writers: Writers) -> tuple[int, int]:
    """Every acknowledged key is in the table exactly once; no key twice."""
    top = max(a[2] for a in writers.acked)
    keys: list[str] = []
    last = 0
    while True:   # pages of 10,000 (the largest read), in id order
        rows = db.read(ops.select("ev", [["id", ">", last]], order_by=[["id", "asc"]], limit=10_000),
                       min_lsn=top).result
        keys += [r["k"] for r in rows]
        if len(rows) < 10_000:
            break
        last = rows[-1]["id"]
    counts: dict[str, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    doubled = [k for k, c in counts.items() if c > 1]
    lost = [k for _, k, _ in writers.acked if k not in counts]
    assert not doubled, f"keys written twice: {doubled[:10]}"
    assert not lost, f"{len(lost)} acknowledged writes lost: {lost[:10]}"
    return len(writers.acked), len(keys)


class LocalCluster:
    def __init__(self, tmp_path: Path, name: str | None = None, **overrides):
        self.name = name or f"t{uuid.uuid4().hex[:10]}"
        self.state_dir = tmp_path / "state"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = tmp_path / "logs"
        self.log_dir.mkdir(exist_ok=True)
        # The cluster's state is its own; the broker accounts are the machine's
        # (scripts/services.sh): each process started here uses its component's.
        env_over = {"STRATUS_CLUSTER": self.name, "STRATUS_STATE_DIR": str(self.state_dir),
                    "STRATUS_SECRETS_DIR": str(secrets_dir().resolve())}
        for k, v in overrides.items():
            env_over[f"STRATUS_{k.upper()}"] = str(v)
        self.env = {**os.environ, **env_over, "PYTHONUNBUFFERED": "1"}
        base = load()
        fields = {f.name for f in dataclasses.fields(Settings)}
        typed = {k: type(getattr(base, k))(v) for k, v in overrides.items() if k in fields}
        self.settings = dataclasses.replace(base, cluster=self.name, state_dir=str(self.state_dir), **typed)
        self.names = Names(self.name)
        self.paths = Paths(self.name)
        self.zk = bzk.connect(self.settings)
        self.procs: dict[str, subprocess.Popen] = {}
        self._clients: list[DBClient] = []

    # --- processes -----------------------------------------------------------
    def spawn(self, key: str, args: list[str], **env) -> subprocess.Popen:
        """Start `python -m ...` (or any args) with this cluster's settings."""
        logf = open(self.log_dir / f"{key}.log", "ab")
        p = subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**self.env, **{k: str(v) for k, v in env.items()}},
                             stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[key] = p
        return p

    def start_worker(self, worker_id: str, **env) -> subprocess.Popen:
        return self.spawn(worker_id, ["-m", "worker", "--id", worker_id], **env)

    def signal(self, key: str, sig: int) -> None:
        p = self.procs[key]
        if p.poll() is None:
            os.kill(p.pid, sig)

    def kill(self, key: str) -> None:
        self.signal(key, signal.SIGKILL)
        self.procs[key].wait(10)

    def log(self, key: str) -> str:
        return (self.log_dir / f"{key}.log").read_text(errors="replace")

    # --- the data plane ----------------------------------------------------------
    def workers(self) -> dict[str, dict]:
        """The raw membership records, as dicts (see members() for Members)."""
        return bzk.children_json(self.zk, self.paths.workers)

    def members(self) -> dict[str, Member]:
        return workers(self.zk, self.paths)

    def promote(self, worker_id: str) -> int:
        return set_leader(self.zk, self.paths, worker_id)

    def wait_master(self, worker_id: str, timeout: float = 20.0) -> dict:
        return wait_for(lambda: (w := self.workers().get(worker_id)) and w["role"] == "master" and w,
                        timeout, what=f"{worker_id} to be master")

    def wait_ready(self, ids: list[str], timeout: float = 30.0) -> None:
        def ok():
            ws = self.workers()
            return all(ws.get(i, {}).get("ready") for i in ids)
        wait_for(ok, timeout, what=f"workers {ids} ready")

    def bootstrap(self, slaves: int = 1) -> list[str]:
        """A master w1 and `slaves` slaves (s1..sN), all ready."""
        self.promote("w1")
        self.start_worker("w1")
        self.wait_master("w1")
        ids = [f"s{i}" for i in range(1, slaves + 1)]
        for i in ids:
            self.start_worker(i)
        self.wait_ready(ids)
        if ids:  # the master stops serving reads once it sees a ready slave
            wait_for(lambda: not self.workers()["w1"].get("serves_reads"), 10, what="master to leave reads to slaves")
        return ids

    def client(self, **kw) -> DBClient:
        c = DBClient(self.settings, **kw)
        self._clients.append(c)
        return c

    def db_path(self, worker_id: str) -> Path:
        return self.state_dir / "clusters" / self.name / "workers" / worker_id / "store.sqlite"

    def checksum(self, worker_id: str) -> dict[str, str]:
        """sha256 of every tenant table of one worker, read-only from its file."""
        return sqlite_checksum(self.db_path(worker_id))

    # --- teardown ----------------------------------------------------------------
    def close(self) -> None:
        for c in self._clients:
            c.close()
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)
        try:   # the tenants' host accounts and cgroups of this cluster (orchestrator/runtimes/confine.py)
            from orchestrator.runtimes.confine import Jail
            Jail(self.settings).remove_all_accounts()
        except Exception:
            pass
        try:
            self.zk.delete(self.paths.root, recursive=True)
        except Exception:
            pass
        self.zk.stop()
        self.zk.close()
        try:
            conn = pika.BlockingConnection(connection_params(self.settings.amqp_url))
            delete_cluster(conn.channel(), self.names)
            conn.close()
        except Exception:
            pass
