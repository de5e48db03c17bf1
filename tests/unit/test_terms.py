"""Terms that never go back (issue #23): the orchestrator's rules for the next
term, a refused term and a cluster without its leader record, and a worker's
rule for when it stops serving reads. Pure logic: no ZooKeeper, no broker."""
from bus.cluster import Leader, Member, Role, State
from orchestrator.decisions import check_promotion, plan_election, term_floor
from worker.node import STALL_BOUND, stall_reason


def slave(wid, pid, lsn=0, *, term=0, ready=True, **kw):
    return Member(wid, pid=pid, applied_lsn=lsn, term=term, ready=ready,
                  state=State.READY if ready else State.CATCHING_UP, **kw)


def by_id(*ms):
    return {m.id: m for m in ms}


def test_the_next_term_is_above_every_term_the_workers_read_from_the_log():
    # ZooKeeper forgot the leader record (term 0) while the log holds term 2
    assert term_floor(Leader(None, 0), {}) == (0, "no term known yet: the next is 1")
    ms = by_id(slave("a", 1, 10, term=2), slave("b", 2, 12, term=1),
               Member("m", pid=3, role=Role.MASTER, state=State.MASTER, term=2))
    assert term_floor(Leader(None, 0), ms) == (2, "the highest term known is 2 (worker a): the next is above it")
    # the record itself may be the highest
    assert term_floor(Leader("m", 5), ms) == (5, "the highest term known is 5 (the leader record): the next is above it")
    # a refused term counts too (a worker that refused term 7 saw 7 or more)
    assert term_floor(Leader("x", 3), by_id(slave("x", 4, term=3, refused_term=7)))[0] == 7


def test_a_named_worker_that_refused_its_term_is_named_again_above_the_log():
    refused = slave("n", 5, 40, term=2, ready=False, refused_term=1, reason="refused term 1")
    w, d = check_promotion(None, Leader("n", 1), refused, now=0.0, timeout=10)
    assert w is None and d.action == "renumber" and d.ids == ("n",)
    assert d.text == "n refused term 1: the log already holds term 2; naming it again above that"
    # once named again (term 3), the old refusal does not count
    w, d = check_promotion(None, Leader("n", 3), refused, now=1.0, timeout=10)
    assert d.action == "wait" and w is not None and w.term == 3


def test_without_a_leader_record_running_workers_register_again_before_an_election():
    ms = by_id(slave("a", 1, 10, term=2), Member("b", pid=2, state=State.UNREGISTERED, started=5.0))
    d = plan_election(None, ms)
    assert d.action == "wait"
    assert d.text == ("no leader record and 1 running worker(s) not registered again (b): "
                      "waiting for their records before electing")
    # registered again: the most advanced slave is elected (term_floor puts its term above the log's)
    d = plan_election(None, by_id(slave("a", 1, 10, term=2), slave("b", 2, 30, term=2)))
    assert d.action == "elect" and d.ids == ("b",)
    # a master that died is replaced even if a slave has not registered again: the record names it
    assert plan_election("m", ms).action == "elect"


def test_the_refused_term_is_on_the_wire():
    m = Member("w", pid=1, term=2, refused_term=1)
    assert m.to_dict()["refused_term"] == 1 and Member.from_dict(m.to_dict()) == m
    assert "refused_term" not in Member("w").to_dict()
    assert Member.from_dict({"id": "w", "refused_term": "x"}).refused_term == 0


def test_a_replica_that_stalls_while_the_master_advances_serves_no_reads():
    assert stall_reason(100, 100, 60.0, 2, 2) == ""                  # caught up
    assert stall_reason(120, 100, STALL_BOUND - 0.1, 2, 2) == ""     # behind, but only just
    why = stall_reason(120, 100, STALL_BOUND, 2, 2)
    assert why == f"the master is at LSN 120, this replica stalls at 100 for {STALL_BOUND:.1f}s"
    why = stall_reason(8450, 100, 5.0, 2, 1)                         # the forked history of issue #23
    assert why.endswith("(the master's term 1 is below the log's 2: its entries are ignored)")


# --- the cluster identity --------------------------------------------------------------
def test_settle_identity():
    from bus.cluster import settle_identity
    assert settle_identity("a", "a", "n") == ("a", "cluster a: ZooKeeper and the log agree")
    assert settle_identity(None, "a", "n") == (
        "a", "cluster a: ZooKeeper holds no identity (its state was lost?), the log's is restored")
    assert settle_identity("z", "", "n")[0] == "z"
    assert settle_identity(None, "", "n") == ("n", "cluster n: a fresh cluster, a new identity")
    ident, why = settle_identity("z", "a", "n")
    assert ident is None and why.startswith("cluster identity mismatch: ZooKeeper holds z, the log holds a: "
                                            "not taking writes")


def test_check_identity_halts_on_another_clusters_log():
    from bus.cluster import Identity
    from orchestrator.decisions import check_identity
    ms = by_id(slave("a", 1, cluster_id="c1"), slave("b", 2), slave("c", 3, cluster_id="c2"))
    assert check_identity(None, ms).action == "none"
    assert check_identity(Identity("c1"), by_id(slave("a", 1, cluster_id="c1"), slave("b", 2))).text == \
        "no action: cluster c1"
    d = check_identity(Identity("c1"), ms)
    assert d.action == "halt" and d.ids == ("c",)
    assert d.text.startswith("cluster identity mismatch: ZooKeeper holds c1, the log of worker c holds c2: "
                             "electing no master")
    m = Member("w", cluster_id="c1")
    assert Member.from_dict(m.to_dict()) == m and "cluster_id" not in Member("w").to_dict()


def test_a_worker_restarted_under_its_own_id_resumes_its_own_term_but_not_anothers():
    from worker.node import foreign_term_at_start
    assert foreign_term_at_start(5, "w1", "w1") == 4      # its own barrier: named again at 5, it may resume
    assert foreign_term_at_start(5, "w2", "w1") == 5      # another's: 5 is refused, only above it
    assert foreign_term_at_start(5, "", "w1") == 5        # an older store does not say: another's
    assert foreign_term_at_start(0, "w1", "w1") == 0
