"""The DB client against the real broker: what a caller sees when RabbitMQ
restarts under a request in flight."""
import threading
import time

import pytest

from bus import ops
from bus.errors import Timeout
from harness import restart_rabbitmq


@pytest.mark.slow
def test_a_request_in_flight_when_the_broker_restarts_fails_fast_as_a_timeout(cluster):
    """The reply queue is not durable, so a broker restart loses it and any
    reply to a request already sent. The client notices its queue was gone
    when it reconnects and answers the caller then, with a 504-class Timeout
    (the write may still be applied), not after the caller's full timeout."""
    db = cluster.client(name="inflight")   # no worker runs: the write waits in writeQ
    out = {}

    def call():
        t0 = time.monotonic()
        try:
            db.write([ops.upsert("kv", {"k": "a", "v": 1})], timeout=90)
            out["result"] = "reply"
        except Exception as exc:
            out["result"] = exc
        out["elapsed"] = time.monotonic() - t0
    t = threading.Thread(target=call, daemon=True)
    t.start()
    time.sleep(0.5)
    restart_rabbitmq(down_for=0)
    t.join(80)
    assert not t.is_alive(), "the caller is still waiting"
    assert isinstance(out["result"], Timeout), out
    assert "restarted" in str(out["result"]) and out["elapsed"] < 60, out
    # The client keeps working after the restart.
    with pytest.raises(Timeout):
        db.read(ops.select("kv"), timeout=1)   # still no worker: a plain timeout, over a live connection
    assert db.connected


def test_two_requests_in_flight_under_one_request_id_each_get_their_reply(cluster):
    """A caller's retry while the first attempt is still in flight: one write
    happens, and both attempts are answered with it (replies are matched by a
    correlation id of each send, not by the request id)."""
    cluster.bootstrap(slaves=0)
    db = cluster.client()
    db.write([ops.create_table("t", [ops.column("k", "integer", nullable=False)], ["k"])])
    results, errors = [], []

    def attempt():
        try:
            results.append(db.write([ops.insert("t", {"k": 1})], request_id="same-id-twice", timeout=10))
        except Exception as exc:  # collected: the test asserts there are none
            errors.append(exc)
    threads = [threading.Thread(target=attempt) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert not errors and len(results) == 4
    assert len({r.lsn for r in results}) == 1
    assert db.read(ops.count("t")).result == 1
