"""orchestrator/logs.py on real files in a temporary state dir: time parsing,
credential scrubbing, the backwards tail (limit, since with inherited
times, q, cut lines, a 1 GiB file read in bounded memory and time), the
components and who may read them, the query parameters, and the route on a
Flask app with the orchestrator's own identity function."""
from __future__ import annotations

import dataclasses
import datetime as dt
import os
import time
import tracemalloc
from pathlib import Path

import pytest

from bus.service import base_app
from bus.settings import load
from orchestrator import logs
from orchestrator.api import Identity, identity


def asctime(t: float) -> str:
    """logging's %(asctime)s for unix time t (local time)."""
    d = dt.datetime.fromtimestamp(t)
    return d.strftime("%Y-%m-%d %H:%M:%S") + f",{int(d.microsecond / 1000):03d}"


# --- times ------------------------------------------------------------------------------
def test_parse_asctime_is_local_time():
    t = 1_790_000_000.123
    assert logs.parse_time(f"{asctime(t)} gateway INFO x") == pytest.approx(t, abs=1e-3)


@pytest.mark.parametrize("text,expected", [
    ("2026-11-25T15:43:52Z rest", dt.datetime(2026, 11, 25, 15, 43, 52, tzinfo=dt.timezone.utc).timestamp()),
    ("2026-11-25T15:43:52.5+02:00 x", dt.datetime(2026, 11, 25, 13, 43, 52, 500000, tzinfo=dt.timezone.utc).timestamp()),
    ("2026-11-25T15:43:52.123456-0130", dt.datetime(2026, 11, 25, 17, 13, 52, 123456, tzinfo=dt.timezone.utc).timestamp()),
    ("2026-11-25 15:43:52,123 worker", dt.datetime(2026, 11, 25, 15, 43, 52, 123000).timestamp()),
])
def test_parse_iso_and_zones(text, expected):
    assert logs.parse_time(text) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("text", ["", "hello", "Traceback (most recent call last):", "2026-13-45 99:99:99 x",
                                  "  2026-11-25 15:43:52,123 indented", "2026/11/25 15:43:52"])
def test_no_time(text):
    assert logs.parse_time(text) is None


# --- credentials ------------------------------------------------------------------------------
@pytest.mark.parametrize("raw,served", [
    ("connecting to amqp://stratus:s3cr3t@127.0.0.1:5672/%2F now", "connecting to amqp://stratus:***@127.0.0.1:5672/%2F now"),
    ("AMQPS://t-acme:Zx9-_q@broker/ and amqp://u:v@h", "AMQPS://t-acme:***@broker/ and amqp://u:***@h"),
    ("STRATUS_ADMIN_PASSWORD=hunter2 next", "STRATUS_ADMIN_PASSWORD=*** next"),
    ("PlainCredentials(username='acme', password='pw123')", "PlainCredentials(username='acme', password='***')"),
    ("token_secret: abc.def", "token_secret: ***"),
])
def test_scrub(raw, served):
    assert logs.scrub(raw) == served


def test_scrub_leaves_plain_lines_alone():
    for line in ("GET /api/v1/users 200 3.1ms", "http://127.0.0.1:8080/health ok", "user@example.com logged in"):
        assert logs.scrub(line) == line


# --- one file -----------------------------------------------------------------------------------
def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{x}\n" for x in lines))
    return path


def test_tail_newest_last_and_limit(tmp_path):
    t0 = time.time() - 100
    p = write_lines(tmp_path / "a.log", [f"{asctime(t0 + i)} svc INFO line {i}" for i in range(50)])
    got = logs.tail(p, limit=5)
    assert [line.rsplit(" ", 1)[1] for _, line in got] == ["45", "46", "47", "48", "49"]
    assert [t for t, _ in got] == sorted(t for t, _ in got)
    assert got[-1][0] == pytest.approx(t0 + 49, abs=1e-3)
    assert len(logs.tail(p, limit=1000)) == 50


def test_untimed_lines_inherit_the_previous_time(tmp_path):
    t0 = time.time() - 100
    p = write_lines(tmp_path / "a.log", [
        f"{asctime(t0)} svc ERROR boom",
        "Traceback (most recent call last):",
        '  File "x.py", line 1',
        f"{asctime(t0 + 10)} svc INFO after",
        "trailing untimed",
    ])
    got = logs.tail(p)
    assert [line for _, line in got][1:3] == ["Traceback (most recent call last):", '  File "x.py", line 1']
    assert [round(t - t0, 2) for t, _ in got] == [0, 0, 0, 10, 10]
    # since drops the early block whole (its untimed lines have its time) and keeps the later one
    assert [line for _, line in logs.tail(p, since=t0 + 5)] == [f"{asctime(t0 + 10)} svc INFO after",
                                                                  "trailing untimed"]


def test_lines_before_the_first_time_take_its_time(tmp_path):
    t0 = time.time() - 100
    p = write_lines(tmp_path / "a.log", ["shop.web i-1 listening on 4000", "still untimed",
                                         f"{asctime(t0)} shop.web GET /health 200", "after"])
    got = logs.tail(p)
    assert [line for _, line in got][:2] == ["shop.web i-1 listening on 4000", "still untimed"]
    assert [t for t, _ in got] == [pytest.approx(t0, abs=1e-3)] * 4
    assert [line for _, line in logs.tail(p, limit=3)][0] == "still untimed"


def test_lines_of_a_file_without_times_take_its_mtime(tmp_path):
    p = write_lines(tmp_path / "plain.log", ["hello from print()", "second", "third"])
    mtime = time.time() - 3600
    os.utime(p, (mtime, mtime))
    got = logs.tail(p)
    assert [line for _, line in got] == ["hello from print()", "second", "third"]
    assert all(t == pytest.approx(mtime) for t, _ in got)
    assert logs.tail(p, since=mtime + 1) == []
    assert len(logs.tail(p, since=mtime - 1)) == 3


def test_q_is_a_case_sensitive_substring_of_the_served_line(tmp_path):
    t0 = time.time() - 100
    p = write_lines(tmp_path / "a.log", [f"{asctime(t0)} gw INFO GET /x rid=abc123",
                                         f"{asctime(t0 + 1)} gw INFO GET /y rid=ABC123",
                                         f"{asctime(t0 + 2)} gw INFO amqp://u:pw@h rid=abc123"])
    assert [line for _, line in logs.tail(p, q="abc123")] == [f"{asctime(t0)} gw INFO GET /x rid=abc123",
                                                              f"{asctime(t0 + 2)} gw INFO amqp://u:***@h rid=abc123"]
    assert logs.tail(p, q="u:pw@") == []            # a password cannot be searched for
    assert len(logs.tail(p, q="u:***@")) == 1       # its scrubbed form can
    assert logs.tail(p, q="nothing") == []


def test_a_long_line_is_cut_keeping_its_time(tmp_path):
    t0 = time.time() - 100
    long_line = f"{asctime(t0 + 1)} svc INFO " + "x" * (logs.MAX_LINE * 3)
    p = write_lines(tmp_path / "a.log", [f"{asctime(t0)} svc INFO first", long_line, f"{asctime(t0 + 2)} svc INFO last"])
    got = logs.tail(p)
    assert len(got) == 3
    assert got[1][1].endswith("[...cut]") and len(got[1][1]) <= logs.MAX_LINE + 20
    assert got[1][0] == pytest.approx(t0 + 1, abs=1e-3)
    assert got[0][1].endswith("first") and got[2][1].endswith("last")


def test_no_trailing_newline_and_crlf(tmp_path):
    t0 = time.time() - 100
    p = tmp_path / "a.log"
    p.write_bytes(f"{asctime(t0)} a\r\n\n{asctime(t0 + 1)} b".encode())
    assert [line for _, line in logs.tail(p)] == [f"{asctime(t0)} a", f"{asctime(t0 + 1)} b"]
    assert logs.tail(tmp_path / "missing.log") == []


def test_a_1gib_file_is_read_from_its_end_in_bounded_memory_and_time(tmp_path):
    """A sparse 1 GiB file (zeros) with real lines at its end: the newest
    lines come back at once; a search that matches nothing stops at the
    scan budget, with memory bounded by the block and line sizes."""
    p = tmp_path / "big.log"
    t0 = time.time() - 1000
    with open(p, "wb") as f:
        f.truncate(1 << 30)
        f.seek(1 << 30)
        f.write("".join(f"\n{asctime(t0 + i / 10)} svc INFO request {i}" for i in range(5000)).encode() + b"\n")
    tracemalloc.start()
    try:
        t = time.monotonic()
        got = logs.tail(p, limit=100)
        fast = time.monotonic() - t
        assert [line.rsplit(" ", 1)[1] for _, line in got] == [str(i) for i in range(4900, 5000)]
        budget = [8 * 1024 * 1024]
        t = time.monotonic()
        assert logs.tail(p, q="never-there", budget=budget) == []
        scan = time.monotonic() - t
        assert budget[0] == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert fast < 1.0 and scan < 10.0, (fast, scan)
    assert peak < 4 * 1024 * 1024, peak


# --- components and access ------------------------------------------------------------------------
@pytest.fixture
def tree(tmp_path):
    settings = dataclasses.replace(load(), state_dir=str(tmp_path / "state"), cluster="tlogs")
    lay = logs.Layout(settings)
    t0 = time.time() - 100
    write_lines(lay.platform / "gateway.log", [f"{asctime(t0)} gateway INFO GET / rid=r1"])
    write_lines(lay.platform / "orchestrator.log", [f"{asctime(t0 + 1)} orchestrator INFO started"])
    write_lines(lay.cluster / "w-1a2b3c4d.log", [f"{asctime(t0 + 2)} worker[w-1a2b3c4d] INFO write r1/x",
                                                 "amqp://stratus:topsecret@localhost/"])
    write_lines(lay.instances / "acme" / "shop" / "i-1.log", [f"{asctime(t0 + 3)} shop says hi"])
    write_lines(lay.instances / "acme" / "shop" / "i-2.log", [f"{asctime(t0 + 4)} shop says hi too"])
    write_lines(lay.instances / "acme" / "jobs" / "i-3.log", [f"{asctime(t0 + 5)} jobs ran"])
    write_lines(lay.instances / "beta" / "blog" / "i-9.log", [f"{asctime(t0 + 6)} beta's own"])
    (lay.platform / "notalog.txt").write_text("x\n")
    os.symlink(lay.cluster / "w-1a2b3c4d.log", lay.platform / "link.log")
    return settings, lay, t0


def names(sources):
    return sorted(s.component for s in sources)


def test_components_by_name_and_prefix(tree):
    _, lay, _ = tree
    assert names(lay.all_sources()) == ["acme/jobs/i-3", "acme/shop/i-1", "acme/shop/i-2", "beta/blog/i-9",
                                        "gateway", "orchestrator", "w-1a2b3c4d"]
    assert names(lay.select("gateway")) == ["gateway"]
    assert names(lay.select("w-1a2b3c4d")) == ["w-1a2b3c4d"]
    assert names(lay.select("acme")) == ["acme/jobs/i-3", "acme/shop/i-1", "acme/shop/i-2"]
    assert names(lay.select("acme/shop")) == ["acme/shop/i-1", "acme/shop/i-2"]
    assert names(lay.select("acme/shop/i-2")) == ["acme/shop/i-2"]


@pytest.mark.parametrize("component", ["nope", "link", "notalog", "acme/nope", "acme/shop/i-7", "../state/logs/gateway",
                                       "acme/../beta", "a/b/c/d", "/etc/passwd", ".", "gateway.log", "x" * 400])
def test_unknown_components_are_404(tree, component):
    _, lay, _ = tree
    with pytest.raises(logs.LogsError) as exc:
        lay.select(component)
    assert exc.value.status == 404


def test_a_tenant_sees_its_own_instances_only(tree):
    _, lay, _ = tree
    assert names(lay.select(None, tenant="acme")) == ["acme/jobs/i-3", "acme/shop/i-1", "acme/shop/i-2"]
    assert names(lay.select("acme/jobs", tenant="acme")) == ["acme/jobs/i-3"]
    for other in ("beta", "beta/blog", "gateway", "w-1a2b3c4d", "acme-x", "acmeshop/x"):
        with pytest.raises(logs.LogsError) as exc:
            lay.select(other, tenant="acme")
        assert exc.value.status == 403, other
    assert lay.select(None, tenant="gamma") == []          # no instances yet: none, not an error
    with pytest.raises(logs.LogsError) as exc:
        lay.select("gamma/app", tenant="gamma")
    assert exc.value.status == 404


@pytest.mark.parametrize("args,status", [
    ({"since": "yesterday"}, 400), ({"since": "nan"}, 400), ({"since": "inf"}, 400), ({"since": "-1"}, 400),
    ({"limit": "0"}, 400), ({"limit": "10001"}, 400), ({"limit": "ten"}, 400), ({"limit": "1.5"}, 400),
    ({"q": "x" * 1001}, 400),
])
def test_bad_parameters_are_400(args, status):
    with pytest.raises(logs.LogsError) as exc:
        logs.parse_params(args)
    assert exc.value.status == status


def test_parameters():
    assert logs.parse_params({}) == logs.Params(None, None, None, 1000)
    assert logs.parse_params({"component": "gateway", "since": "12.5", "q": "rid", "limit": "10000"}) == \
        logs.Params("gateway", 12.5, "rid", 10000)


def test_serve_merges_files_by_time_and_applies_the_roles(tree):
    settings, _, t0 = tree
    admin = logs.serve(settings, Identity("admin"), {})
    assert [(x["component"], round(x["time"] - t0)) for x in admin] == [
        ("gateway", 0), ("orchestrator", 1), ("w-1a2b3c4d", 2), ("w-1a2b3c4d", 2), ("acme/shop/i-1", 3),
        ("acme/shop/i-2", 4), ("acme/jobs/i-3", 5), ("beta/blog/i-9", 6)]
    assert all("topsecret" not in x["line"] for x in admin)
    assert "amqp://stratus:***@localhost/" in [x["line"] for x in admin]
    assert logs.serve(settings, Identity("developer", "dev1"), {"q": "r1"}) == [x for x in admin if "r1" in x["line"]]
    assert len(logs.serve(settings, Identity("admin"), {"limit": "2"})) == 2
    assert [x["component"] for x in logs.serve(settings, Identity("tenant", "acme", "acme"), {})] == \
        ["acme/shop/i-1", "acme/shop/i-2", "acme/jobs/i-3"]
    assert [x["line"] for x in logs.serve(settings, Identity("admin"), {"since": str(t0 + 5.5)})] == \
        [admin[-1]["line"]]
    for who in (Identity("user", "bob", "acme"), Identity("tenant", "acme", None), Identity("anything")):
        with pytest.raises(logs.LogsError) as exc:
            logs.serve(settings, who, {})
        assert exc.value.status == 403


def test_the_route_with_the_orchestrators_identity(tree):
    settings, _, _ = tree
    app = base_app("orchestrator")
    logs.register(app, settings, identity)
    c = app.test_client()
    r = c.get("/api/v1/logs")                       # the orchestrator's own port: admin
    assert r.status_code == 200 and len(r.json["lines"]) == 8
    assert set(r.json["lines"][0]) == {"component", "time", "line"}
    tenant = {"X-Stratus-Role": "tenant", "X-Stratus-Subject": "acme", "X-Stratus-Tenant": "acme"}
    r = c.get("/api/v1/logs?component=acme/shop", headers=tenant)
    assert r.status_code == 200 and [x["component"] for x in r.json["lines"]] == ["acme/shop/i-1", "acme/shop/i-2"]
    for query, headers, status in (("component=beta", tenant, 403), ("component=gateway", tenant, 403),
                                   ("", {"X-Stratus-Role": "user", "X-Stratus-Tenant": "acme"}, 403),
                                   ("component=nope", {}, 404), ("since=x", {}, 400), ("limit=0", {}, 400)):
        r = c.get(f"/api/v1/logs?{query}", headers=headers)
        assert r.status_code == status and "error" in r.json, (query, r.status_code, r.json)
    r = c.get("/api/v1/logs?component=gateway", headers={"X-Stratus-Role": "developer", "X-Stratus-Subject": "d"})
    assert r.status_code == 200 and [x["component"] for x in r.json["lines"]] == ["gateway"]


def reference(path: Path, since, q, limit) -> list[tuple[float, str]]:
    """What tail must give, computed forwards over the whole file."""
    mtime = path.stat().st_mtime
    last, out = None, []
    raws = path.read_bytes().split(b"\n")
    times = [logs.parse_time(r.decode("latin-1")) for r in raws]
    first = next((t for t in times if t is not None), None)   # dates the untimed lines before it
    for raw in raws:
        if not raw:
            continue
        if len(raw) > logs.MAX_LINE:
            raw = raw[:logs.MAX_LINE] + b" [...cut]"
        line = logs.scrub(raw.decode("utf-8", "replace").rstrip("\r"))
        t = logs.parse_time(line)
        last = t if t is not None else last
        when = last if last is not None else first if first is not None else mtime
        if (since is None or when >= since) and (q is None or q in line):
            out.append((when, line))
    return out[-limit:]


@pytest.mark.parametrize("seed", range(60))
def test_tail_matches_a_forward_reading_across_block_boundaries(tmp_path, monkeypatch, seed):
    import random
    rnd = random.Random(seed)
    monkeypatch.setattr(logs, "BLOCK", rnd.choice([7, 64, 100, 4096]))
    monkeypatch.setattr(logs, "MAX_LINE", rnd.choice([40, 80, 1000]))
    t0 = time.time() - 10_000
    lines, t = [], t0
    for i in range(rnd.randint(0, 300)):
        kind = rnd.random()
        if kind < 0.6:
            t += rnd.random() * 3
            lines.append(f"{asctime(t)} svc INFO rid={rnd.choice('abc')}{i % 7} " + "x" * rnd.randint(0, 60))
        elif kind < 0.8:
            lines.append(f"  untimed rid={rnd.choice('abc')}{i % 7}")
        elif kind < 0.9:
            lines.append("")
        else:
            lines.append(f"amqp://u:p{i}@h rid=a{i % 7}")
    p = tmp_path / "r.log"
    p.write_text("\n".join(lines) + rnd.choice(["", "\n"]))
    for _ in range(15):
        since = rnd.choice([None, t0 + rnd.random() * (t - t0 + 1)])
        q = rnd.choice([None, "rid=a", "rid=b3", "***", "u:***@", "zzz"])
        limit = rnd.choice([1, 3, 50, 1000])
        assert logs.tail(p, since=since, q=q, limit=limit) == reference(p, since, q, limit), (since, q, limit)


def test_one_huge_file_does_not_starve_the_others(tmp_path):
    """q over many files: each gets a fair part of the scan budget."""
    t0 = time.time() - 100
    big = tmp_path / "gateway.log"
    with open(big, "w") as f:
        for i in range(40_000):   # about 2.4 MB, none of it matching
            f.write(f"{asctime(t0 + i / 1000)} gateway INFO GET /x rid=other{i}\n")
    small = write_lines(tmp_path / "w-1.log", [f"{asctime(t0 + 50)} worker INFO write rid-wanted/x lsn 9"])
    sources = [logs.Source("gateway", big), logs.Source("w-1", small)]
    got = logs.read(sources, q="rid-wanted", budget=1024 * 1024)
    assert [(x["component"], x["line"][-20:]) for x in got] == [("w-1", "write rid-wanted/x lsn 9"[-20:])]
    # With the budget spent on the first file alone, the second would not have been read.
    assert logs.tail(big, q="rid-wanted", budget=[1024 * 1024]) == []
