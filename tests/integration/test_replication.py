"""The data plane against the real RabbitMQ and ZooKeeper."""
from bus import ops


def kv_table(db):
    db.create_table("kv", [ops.column("k", "text", nullable=False), ops.column("v", "integer")], ["k"])


def test_write_on_master_reads_back_from_slave(cluster):
    cluster.bootstrap(slaves=1)
    db = cluster.client()
    kv_table(db)
    w = db.write([ops.insert("kv", {"k": "a", "v": 1})])
    r = db.read(ops.select("kv", [ops.eq("k", "a")]), min_lsn=w.lsn)
    assert r.result == [{"k": "a", "v": 1}]
    assert r.worker == "s1"
