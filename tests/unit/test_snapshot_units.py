"""Snapshots without a bus: a consistent copy while another connection
writes, the chunk format, and refusal of any chunk that does not verify."""
import dataclasses
import sqlite3
import threading
import time

import pytest

from bus.settings import load
from bus.topology import log_arguments
from worker.__main__ import move_aside, sqlite_path
from worker.snapshot import Assembler, SnapshotError, chunk_messages, install, make_snapshot, read_meta


def make_store(path, rows: int = 0):
    """A store-like SQLite file in WAL mode: rows in t, and _stratus_meta's
    applied_lsn always equal to the row count (committed together)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE _stratus_meta (key TEXT PRIMARY KEY, value TEXT)")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, pad TEXT)")
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO t VALUES (?, ?)", [(i, "x" * 200) for i in range(1, rows + 1)])
    conn.executemany("INSERT INTO _stratus_meta VALUES (?, ?)",
                     [("applied_lsn", str(rows)), ("term", "3"), ("stream_offset", "41")])
    conn.execute("COMMIT")
    return conn


def test_snapshot_is_consistent_while_another_connection_writes(tmp_path):
    db = tmp_path / "store.sqlite"
    conn = make_store(db, rows=20_000)
    stop = threading.Event()
    written = [0]

    def writer():
        n = 20_000
        while not stop.is_set():
            n += 1
            conn.execute("BEGIN")
            conn.execute("INSERT INTO t VALUES (?, ?)", (n, "y" * 200))
            conn.execute("UPDATE _stratus_meta SET value = ? WHERE key = 'applied_lsn'", (str(n),))
            conn.execute("COMMIT")
            written[0] += 1

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        infos = []
        for i in range(5):
            before = written[0]
            info = make_snapshot(db, tmp_path / "snap" / "latest.sqlite")
            copy = sqlite3.connect(tmp_path / "snap" / "latest.sqlite")
            count, top = copy.execute("SELECT count(*), max(id) FROM t").fetchone()
            copy.close()
            # the copy is one transaction's view: the meta row matches the data exactly
            assert info["lsn"] == count == top, (info, count, top)
            assert info["term"] == 3 and info["stream_offset"] == 41
            infos.append((before, info["lsn"]))
            time.sleep(0.05)
    finally:
        stop.set()
        t.join(10)
    assert written[0] > 0, "the writer was blocked by the snapshots"
    assert infos[-1][1] > infos[0][1], "the snapshots did not see the writes in between"
    # one self-contained file: no WAL beside it, and the file says so
    assert not (tmp_path / "snap" / "latest.sqlite-wal").exists()
    assert read_meta(tmp_path / "snap" / "latest.sqlite")["lsn"] == infos[-1][1]


def test_make_snapshot_refuses_a_missing_store(tmp_path):
    with pytest.raises(SnapshotError):
        make_snapshot(tmp_path / "nope.sqlite", tmp_path / "out.sqlite")
    assert not (tmp_path / "nope.sqlite").exists()   # not created by the attempt


def _snapshot(tmp_path, rows=2_000):
    make_store(tmp_path / "store.sqlite", rows=rows).close()
    out = tmp_path / "snap.sqlite"
    info = make_snapshot(tmp_path / "store.sqlite", out)
    return out, {**info, "made_at": 1.5, "source": "s1", "role": "slave"}


def test_chunks_reassemble_to_the_same_file(tmp_path):
    out, info = _snapshot(tmp_path)
    msgs = list(chunk_messages(out, info, chunk_bytes=64 * 1024))
    assert len(msgs) == msgs[0][0]["count"] > 3
    assert [h["index"] for h, _ in msgs] == list(range(len(msgs)))
    asm = Assembler(tmp_path / "got.sqlite")
    done = [asm.add(h, b) for h, b in msgs]
    assert done == [False] * (len(msgs) - 1) + [True]
    assert (tmp_path / "got.sqlite").read_bytes() == out.read_bytes()
    assert asm.info["lsn"] == 2_000 and asm.info["stream_offset"] == 41 and asm.info["source"] == "s1"
    dest = tmp_path / "w" / "store.sqlite"
    dest.parent.mkdir()
    (tmp_path / "w" / "store.sqlite-wal").write_bytes(b"stale wal of an earlier store")
    install(tmp_path / "got.sqlite", dest)
    assert not (tmp_path / "w" / "store.sqlite-wal").exists()
    assert read_meta(dest) == {"lsn": 2_000, "term": 3, "stream_offset": 41}


@pytest.mark.parametrize("fault", ["flipped byte", "missing chunk", "reordered", "other snapshot",
                                   "whole-file checksum", "no headers"])
def test_a_bad_chunk_is_refused(tmp_path, fault):
    out, info = _snapshot(tmp_path)
    msgs = list(chunk_messages(out, info, chunk_bytes=64 * 1024))
    if fault == "flipped byte":
        h, b = msgs[2]
        msgs[2] = (h, b[:100] + bytes([b[100] ^ 1]) + b[101:])
    elif fault == "missing chunk":
        del msgs[1]
    elif fault == "reordered":
        msgs[1], msgs[2] = msgs[2], msgs[1]
    elif fault == "other snapshot":
        msgs[2] = ({**msgs[2][0], "snapshot": "another-1", "lsn": 7}, msgs[2][1])
    elif fault == "whole-file checksum":
        msgs = [({**h, "sha256": "0" * 64}, b) for h, b in msgs]
    elif fault == "no headers":
        msgs[0] = ({}, msgs[0][1])
    asm = Assembler(tmp_path / "got.sqlite")
    with pytest.raises(SnapshotError):
        for h, b in msgs:
            if asm.add(h, b):
                break
        else:
            pytest.fail("the assembler never finished nor refused")
    asm.discard()
    assert not (tmp_path / "got.sqlite").exists()


def test_store_urls_and_moving_a_diverged_store_aside(tmp_path):
    assert sqlite_path(f"sqlite:///{tmp_path}/a/store.sqlite") == tmp_path / "a" / "store.sqlite"
    assert sqlite_path("sqlite://") is None
    assert sqlite_path("postgresql://u@h/db") is None
    store = tmp_path / "store.sqlite"
    for side in ("", "-wal"):
        (tmp_path / f"store.sqlite{side}").write_text(f"new{side}")
        (tmp_path / f"store.sqlite.diverged{side}").write_text("older copy")
    (tmp_path / "store.sqlite.diverged-shm").write_text("older copy")
    move_aside(store)
    assert not store.exists() and not (tmp_path / "store.sqlite-wal").exists()
    assert (tmp_path / "store.sqlite.diverged").read_text() == "new"
    assert (tmp_path / "store.sqlite.diverged-wal").read_text() == "new-wal"
    assert not (tmp_path / "store.sqlite.diverged-shm").exists()   # only the last copy's files


def test_log_retention_arguments_are_checked():
    s = load()
    args = log_arguments(dataclasses.replace(s, log_max_bytes=60_000, log_max_age="12h", log_segment_bytes=20_000))
    assert args == {"x-queue-type": "stream", "x-max-length-bytes": 60_000, "x-max-age": "12h",
                    "x-stream-max-segment-size-bytes": 20_000}
    for bad in ({"log_max_age": "7 days"}, {"log_max_age": "12"}, {"log_max_bytes": 0}, {"log_segment_bytes": -1}):
        with pytest.raises(ValueError):
            log_arguments(dataclasses.replace(s, **bad))
