"""The history checker's verdict (tests/integration/history.py), on synthetic
histories: no sockets, no clocks."""

from __future__ import annotations

from tests.integration.history import Observation, Op, Outcome, allowed_states, check, stale_reads, success_ratio


def put(key: str, value: str, sent: float, acked: float | None, outcome: Outcome = "ok", client: int = 0) -> Op:
    return Op(client, "put", key, value.encode(), sent, acked if outcome == "ok" else None, outcome)


def delete(key: str, sent: float, acked: float | None, outcome: Outcome = "ok", client: int = 0) -> Op:
    return Op(client, "delete", key, None, sent, acked if outcome == "ok" else None, outcome)


def seen(key: str, value: str | None, node: str = "node1") -> Observation:
    return Observation(node, key, None if value is None else value.encode())


def test_the_latest_acknowledged_value_passes_and_an_overwritten_one_is_lost() -> None:
    ops = [put("k", "a", 1, 2), put("k", "b", 3, 4)]
    assert check(ops, [seen("k", "b", "node1"), seen("k", "b", "node2")]).lost == 0
    verdict = check(ops, [seen("k", "b", "node1"), seen("k", "a", "node2")])
    assert verdict.lost_keys == ["k"]
    assert verdict.anomalies[0].node == "node2" and "stale" in verdict.anomalies[0].reason
    assert verdict.anomalies[0].expected == b"b"


def test_an_acknowledged_write_read_back_as_absent_is_lost() -> None:
    verdict = check([put("k", "a", 1, 2)], [seen("k", None)])
    assert verdict.lost == 1 and "lost" in verdict.anomalies[0].reason


def test_a_later_unacknowledged_write_may_be_the_final_value() -> None:
    ops = [put("k", "a", 1, 2), put("k", "late", 3, None, outcome="unknown")]
    assert check(ops, [seen("k", "late")]).lost == 0
    assert check(ops, [seen("k", "a")]).lost == 0  # or it never landed


def test_an_unknown_write_sent_before_the_last_ack_may_still_win() -> None:
    # Its ack time is unknown (infinity): it is not acknowledged-before anything.
    ops = [put("k", "slow", 0, None, outcome="unknown"), put("k", "a", 1, 2)]
    assert allowed_states(ops) == {b"slow", b"a"}


def test_concurrent_acknowledged_writes_may_end_either_way() -> None:
    # b was sent before a was acknowledged: they overlap, either may win.
    ops = [put("k", "a", 1, 5, client=1), put("k", "b", 2, 6, client=2)]
    assert allowed_states(ops) == {b"a", b"b"}
    # c was sent after both were acknowledged: only c.
    assert allowed_states([*ops, put("k", "c", 7, 8)]) == {b"c"}


def test_a_provably_failed_write_is_never_allowed() -> None:
    ops = [put("k", "a", 1, 2), put("k", "refused", 3, None, outcome="failed")]
    assert allowed_states(ops) == {b"a"}
    assert check(ops, [seen("k", "refused")]).lost == 1


def test_deletes_must_stay_deleted() -> None:
    ops = [put("k", "a", 1, 2), delete("k", 3, 4)]
    assert check(ops, [seen("k", None)]).lost == 0
    verdict = check(ops, [seen("k", "a")])
    assert verdict.lost == 1 and "resurrected" in verdict.anomalies[0].reason


def test_never_written_keys_must_be_absent_and_invented_values_are_caught() -> None:
    assert check([], [seen("fresh", None)]).lost == 0
    verdict = check([put("k", "a", 1, 2)], [seen("fresh", "a"), seen("k", "nobody wrote this")])
    assert verdict.lost_keys == ["fresh", "k"]
    assert any("nobody wrote" in anomaly.reason for anomaly in verdict.anomalies)


def test_an_unreadable_key_is_an_anomaly() -> None:
    verdict = check([put("k", "a", 1, 2)], [Observation("node2", "k", None, error="HTTP 503")])
    assert verdict.lost == 1 and "unreadable" in verdict.anomalies[0].reason


def test_counts_and_success_ratio() -> None:
    ops = [
        put("k", "a", 1, 2),
        put("k", "b", 3, None, outcome="unknown"),
        Op(0, "get", "k", None, 4, 5, "ok"),
        delete("j", 6, None, outcome="failed"),
    ]
    verdict = check(ops, [seen("k", "a"), seen("j", None)])
    assert (verdict.requests, verdict.succeeded, verdict.acknowledged, verdict.unknown) == (4, 2, 1, 1)
    assert verdict.keys_checked == 2 and verdict.lost == 0
    assert verdict.success_ratio == 0.5
    assert success_ratio(ops, since=3.5) == (0.5, 2)
    assert success_ratio(ops, since=10) == (1.0, 0)
    assert "4 requests" in verdict.summary()
    assert allowed_states([]) == {None}


def test_a_request_cut_short_by_the_fault_counts_against_it() -> None:
    # Sent at 1, before the crash at 2; the connection broke at 2.1.
    cut = Op(0, "put", "k", b"x", 1.0, None, "unknown", "ReadError", finished=2.1)
    before = Op(0, "put", "k", b"y", 0.5, 0.9, "ok", finished=0.9)
    after = Op(1, "put", "k", b"z", 2.5, 2.6, "ok", finished=2.6)
    assert success_ratio([cut, before, after], since=2.0, until=3.0) == (0.5, 2)


def test_a_ttl_d_value_is_allowed_until_it_expires_and_absence_after() -> None:
    ops = [
        Op(0, "put", "k", b"old", sent=0.0, acked=1.0, outcome="ok"),
        Op(0, "put", "k", b"short", sent=2.0, acked=3.0, outcome="ok", ttl_s=10.0),
    ]
    assert allowed_states(ops, at=5.0, expiry_slack_s=0.5) == {b"short"}
    assert allowed_states(ops, at=12.0, expiry_slack_s=0.5) == {b"short", None}  # expiring, give or take the clocks
    assert allowed_states(ops, at=20.0, expiry_slack_s=0.5) == {None}
    # What the TTL'd write superseded never comes back when it expires.
    verdict = check(ops, [Observation("n1", "k", b"old", at=20.0)], expiry_slack_s=0.5)
    assert verdict.lost == 1 and "stale value" in verdict.anomalies[0].reason
    assert check(ops, [Observation("n1", "k", None, at=20.0)], expiry_slack_s=0.5).lost == 0


def test_a_read_may_not_return_what_a_write_acknowledged_before_it_began_superseded() -> None:
    w1 = Op(0, "put", "k", b"one", sent=0.0, acked=1.0, outcome="ok", finished=1.0)
    w2 = Op(0, "put", "k", b"two", sent=2.0, acked=3.0, outcome="ok", finished=3.0)
    fresh = Op(1, "get", "k", b"two", sent=4.0, acked=4.5, outcome="ok", finished=4.5)
    stale = Op(1, "get", "k", b"one", sent=4.0, acked=4.5, outcome="ok", finished=4.5)
    concurrent = Op(1, "get", "k", b"one", sent=2.5, acked=2.6, outcome="ok", finished=2.6)  # w2 not yet acknowledged
    early = Op(1, "get", "k", None, sent=-1.0, acked=-0.5, outcome="ok", finished=-0.5)  # before anything was written
    assert stale_reads([w1, w2, fresh, stale, concurrent, early]) == [stale]
    too_early = Op(1, "get", "k", b"two", sent=0.5, acked=1.5, outcome="ok", finished=1.5)  # w2 not even sent yet
    assert stale_reads([w1, w2, too_early]) == [too_early]
