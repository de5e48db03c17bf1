"""The grader sequence, 50 times in a row, against a master and 3 slaves,
talking to the services directly and sending back the LSN it is given."""
from __future__ import annotations

import uuid

import requests

from harness import free_port, wait_for
from kits.testkit import route_builtins
from test_rideshare_support import RideShare, future_ts, pw


def grader_sequence(c, rounds: int) -> None:
    for i in range(rounds):
        user = f"grader-{i}-{uuid.uuid4().hex[:6]}"
        src, dst = 1 + i % 150, 151 + i % 40
        r = c.users("PUT", json={"username": user, "password": pw("f")})                    # 1
        assert r.status_code == 201, (i, r.text)
        ts = future_ts(7)
        r = c.rides("POST", json={"created_by": user, "timestamp": ts,
                                  "source": str(src), "destination": str(dst)})             # 2
        assert r.status_code == 201, (i, r.text)
        r = c.rides("GET", params={"source": src, "destination": dst})                      # 3
        assert r.status_code == 200, (i, r.status_code, r.text)
        mine = [x for x in r.json() if x["username"] == user]
        assert len(mine) == 1 and mine[0]["timestamp"] == ts, (i, r.text)
        ride_id = mine[0]["rideId"]
        r = c.rides("GET", f"/api/v1/rides/{ride_id}")                                      # 4
        assert r.status_code == 200, (i, r.status_code, r.text)
        assert r.json() == {"rideId": ride_id, "created_by": user, "users": [], "timestamp": ts,
                            "source": str(src), "destination": str(dst)}
        assert c.rides("DELETE", f"/api/v1/rides/{ride_id}").status_code == 200, i          # 5
        assert c.users("DELETE", f"/api/v1/users/{user}").status_code == 200, i             # 6
        assert c.users("DELETE", f"/api/v1/users/unknown-{user}").status_code == 400, i     # 7
        r = c.rides("GET", params={"source": 197, "destination": 198})                      # 8
        assert r.status_code == 204, (i, r.text)


def test_grader_sequence_50_times_with_3_slaves(tmp_path):
    with RideShare.start(tmp_path, slaves=3) as rs:
        grader_sequence(rs.client(), 50)
        # the reads really went to the 3 slaves (4 reads per round; membership updates every second)
        ws = rs.cluster.workers()
        assert not ws["w1"].get("serves_reads")
        assert sorted(k for k, w in ws.items() if k != "w1" and w.get("ready")) == ["s1", "s2", "s3"]
        wait_for(lambda: sum(w.get("reads", 0) for k, w in rs.cluster.workers().items() if k != "w1") >= 200,
                 5, what="slaves to report the reads they served")


def test_grader_sequence_through_the_gateway(tmp_path):
    """The same sequence through the real gateway, which finds the instances
    in the ZooKeeper registry and passes the LSN headers through."""
    with RideShare.start(tmp_path, slaves=1) as rs:
        port = free_port()
        route_builtins(rs.cluster)
        rs.cluster.spawn("gateway", ["-m", "gateway", "--port", str(port)])
        gw = f"http://127.0.0.1:{port}"
        c = rs.client(base_url=gw)

        def routed():
            try:
                return c.users("GET").status_code in (200, 204) and \
                    c.rides("GET", "/api/v1/rides/count").status_code == 200
            except (requests.RequestException, AssertionError):  # not routed yet: 404/502/503
                return False
        wait_for(routed, 30, 0.2, what="the gateway to route to users and rides")
        grader_sequence(c, 10)
