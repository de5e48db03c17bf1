"""The data plane against the real RabbitMQ and ZooKeeper: replication,
replay, failover with fencing. Workers are real processes."""
import collections
import signal
import threading
import time


from bus import ops
from bus.cluster import choose_master
from bus.errors import DBError
from harness import EV_TABLE, Writers, check_no_loss, wait_for


def kv_table(db):
    db.create_table("kv", [ops.column("k", "text", nullable=False), ops.column("v", "integer")], ["k"])


def counter_tables(db):
    """A row per write plus a counter bumped by every write: a write applied
    twice anywhere shows up as counter != number of rows."""
    db.write([ops.create_table("events", [ops.column("id", "integer", nullable=False),
                                          ops.column("n", "integer")], ["id"]),
              ops.create_table("counter", [ops.column("name", "text", nullable=False),
                                           ops.column("value", "integer")], ["name"]),
              ops.upsert("counter", {"name": "c", "value": 0})])


def bump(db, i):
    return db.write([ops.insert("events", {"id": i, "n": i}), ops.update("counter", [ops.eq("name", "c")], add={"value": 1})])


def test_write_on_master_reads_back_from_slave(cluster):
    cluster.bootstrap(slaves=1)
    db = cluster.client()
    kv_table(db)
    w = db.write([ops.insert("kv", {"k": "a", "v": 1})])
    r = db.read(ops.select("kv", [ops.eq("k", "a")]), min_lsn=w.lsn)
    assert r.result == [{"k": "a", "v": 1}]
    assert r.worker == "s1"
    assert r.lsn >= w.lsn


def test_three_slaves_share_reads_round_robin(cluster):
    cluster.bootstrap(slaves=3)
    db = cluster.client()
    kv_table(db)
    w = db.write([ops.insert("kv", {"k": "a", "v": 1})])
    cluster.wait_ready(["s1", "s2", "s3"])
    wait_for(lambda: all(x["applied_lsn"] >= w.lsn for x in cluster.workers().values()), 10, what="slaves caught up")
    served = collections.Counter(db.read(ops.count("kv")).worker for _ in range(90))
    assert set(served) == {"s1", "s2", "s3"}, served
    for n in served.values():  # sequential requests: strict round robin, give or take one
        assert 25 <= n <= 35, served


def test_read_with_min_lsn_waits_for_the_slave_or_falls_back_to_master(cluster):
    cluster.bootstrap(slaves=1)
    db = cluster.client()
    kv_table(db)
    w = db.write([ops.insert("kv", {"k": "a", "v": 1})])
    # An LSN the log has not reached: the slave holds the read, then hands it to the master.
    t0 = time.monotonic()
    r = db.read(ops.count("kv"), min_lsn=w.lsn + 1000)
    assert r.worker == "w1" and r.result == 1
    assert time.monotonic() - t0 >= cluster.settings.min_lsn_wait * 0.9


def test_a_primary_read_sees_a_write_the_stopped_slave_has_not(cluster):
    """read(primary=True) goes to the master, even while the only slave lags;
    the platform's accounts are read that way (a login right after the account
    was made by another process)."""
    from bus import accounts
    from bus.errors import Timeout
    cluster.bootstrap(slaves=1)
    db = cluster.client()
    kv_table(db)
    accounts.ensure_schema(db)
    cluster.signal("s1", signal.SIGSTOP)    # the slave applies nothing from here on
    try:
        w = db.write([ops.insert("kv", {"k": "a", "v": 1})])
        r = db.read(ops.select("kv", [ops.eq("k", "a")]), primary=True)
        assert r.result == [{"k": "a", "v": 1}] and r.worker == "w1" and r.lsn >= w.lsn
        try:   # the plain read really meets the stopped slave: no answer
            db.read(ops.count("kv"), timeout=1.0)
            raise AssertionError("a plain read was answered while the only slave was stopped")
        except Timeout:
            pass
        password, _ = accounts.create(db, "fresh", "developer")
        acct = accounts.verify(db, "fresh", password)
        assert acct is not None and acct["name"] == "fresh" and acct["kind"] == "developer"
        assert [a["name"] for a in accounts.list_(db, "developer")] == ["fresh"]
        assert accounts.delete(db, "fresh") and accounts.get(db, "fresh") is None
    finally:
        cluster.signal("s1", signal.SIGCONT)
    n = db.read(ops.count("kv"), min_lsn=w.lsn)
    assert n.result == 1 and n.worker == "s1"   # caught up once resumed


def test_new_slave_converges_after_10000_writes(cluster):
    cluster.bootstrap(slaves=1)
    db = cluster.client()
    kv_table(db)
    counter_tables(db)
    # 10,000 single-row writes, sent by 8 threads so the master group-commits.
    def writer(t):
        for i in range(t, 10_000, 8):
            bump(db, i)
    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    last = db.write([ops.insert("kv", {"k": "done", "v": 1})])
    cluster.start_worker("late")
    cluster.wait_ready(["late"], timeout=120)
    wait_for(lambda: all(w["applied_lsn"] >= last.lsn for w in cluster.workers().values()), 60, what="all caught up")
    sums = {wid: cluster.checksum(wid) for wid in ("w1", "s1", "late")}
    assert sums["late"] == sums["w1"] == sums["s1"], sums
    assert set(sums["w1"]) == {"kv", "events", "counter"}
    r = db.read(ops.select("counter"), min_lsn=last.lsn)
    assert r.result == [{"name": "c", "value": 10_000}]


def test_slave_killed_while_streaming_resumes_from_its_lsn(cluster):
    cluster.bootstrap(slaves=1)
    db = cluster.client()
    counter_tables(db)
    stop = threading.Event()
    done = []

    def writer():
        i = 0
        while not stop.is_set() and i < 20_000:
            bump(db, i)
            done.append(i)
            i += 1
    t = threading.Thread(target=writer)
    t.start()
    wait_for(lambda: len(done) > 300, 30, what="writes flowing")
    cluster.kill("s1")
    time.sleep(0.5)
    cluster.start_worker("s1")       # same id, same database file
    cluster.wait_ready(["s1"], timeout=30)
    time.sleep(0.5)
    stop.set()
    t.join(30)
    last = db.write([ops.update("counter", [ops.eq("name", "c")], add={"value": 0})])
    wait_for(lambda: cluster.workers().get("s1", {}).get("applied_lsn", 0) >= last.lsn, 30, what="s1 caught up")
    assert cluster.checksum("s1") == cluster.checksum("w1")
    # every write applied once: the counter equals the number of event rows
    r = db.read(ops.select("counter"), min_lsn=last.lsn)
    n = db.read(ops.count("events"), min_lsn=last.lsn)
    assert r.result[0]["value"] == n.result == len(done)
    # the restarted slave resumed from its stored LSN, not from the start of the log
    starts = [line for line in cluster.log("s1").splitlines() if "applying the log from" in line]
    assert len(starts) == 2, starts
    assert "from offset first (applied LSN 0)" in starts[0]
    assert "from offset first" not in starts[1] and "(applied LSN 0)" not in starts[1], starts[1]


def test_master_killed_under_concurrent_writes_loses_no_acknowledged_write(cluster):
    cluster.bootstrap(slaves=2)
    db = cluster.client()
    db.write([EV_TABLE])
    with Writers(db, 6) as w:
        wait_for(lambda: len(w.acked) > 200, 30, what="writes acknowledged")
        cluster.kill("w1")
        killed_at = time.monotonic()
        new = choose_master([x for x in cluster.workers().values() if x["id"] != "w1"])
        cluster.promote(new["id"])
        cluster.wait_master(new["id"])
        wait_for(lambda: len(w.acked_after(killed_at)) > 50, 30, what="writes on the new master")
        print(f"failover: first write acknowledged {w.acked_after(killed_at)[0][0] - killed_at:.2f}s after the kill")
    check_no_loss(db, w)


def test_stale_master_cannot_get_a_write_acknowledged(cluster):
    cluster.bootstrap(slaves=1)
    db = cluster.client()
    kv_table(db)
    db.write([ops.insert("kv", {"k": "before", "v": 0})])
    cluster.signal("w1", signal.SIGSTOP)
    time.sleep(cluster.settings.zk_timeout * 2.5)   # past its session timeout
    cluster.promote("s1")
    # Writes sent now may sit in the stale master's prefetch buffer.
    results, errors = [], []

    def writer(i):
        try:
            results.append(db.write([ops.insert("kv", {"k": f"k{i}", "v": i})], timeout=20))
        except DBError as e:
            errors.append(e)
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    cluster.wait_master("s1")
    cluster.signal("w1", signal.SIGCONT)
    for t in threads:
        t.join(40)
    assert results, errors
    assert all(r.worker == "s1" for r in results), [r.worker for r in results]
    wait_for(lambda: cluster.procs["w1"].poll() is not None, 15, what="the stale master to exit")
    rows = db.read(ops.select("kv", columns=["k"]), min_lsn=max(r.lsn for r in results)).result
    keys = [r["k"] for r in rows]
    assert len(keys) == len(set(keys))
    assert {f"k{i}" for i in range(30)} >= {k for k in keys if k.startswith("k")}
    for r in results:
        assert r.result[0]["values"]["k"] in keys
