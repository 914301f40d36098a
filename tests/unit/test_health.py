"""Peer health: reachability flips, the source's readiness veto, load ranking."""

from __future__ import annotations

import random

from app.cluster.health import HEDGE_FLOOR_S, P95_EVERY, SUSPECT_FLOOR_S, PeerHealth


def test_probes_cannot_overrule_a_not_ready_pod() -> None:
    flips: list[tuple[str, bool]] = []
    health = PeerHealth(on_flip=lambda node, up: flips.append((node, up)))
    health.set_source_ready("b", False)
    assert not health.is_up("b")
    health.mark_down("b", "timeout")
    health.mark_up("b")  # its /health answers again
    assert not health.is_up("b")
    health.set_source_ready("b", True)
    assert health.is_up("b")
    assert flips[0] == ("b", False) and flips[-1] == ("b", True)


def test_rank_prefers_the_less_loaded_and_puts_down_peers_last() -> None:
    health = PeerHealth(rng=random.Random(7))
    for _ in range(20):
        started = health.begin("slow")
        health.end("slow", started - 0.05)  # 50 ms answers
        health.end("fast", health.begin("fast"))
    health.begin("slow")  # and one in flight
    health.mark_down("dead", "refused")
    for _ in range(10):
        assert health.rank(["dead", "slow", "fast"]) == ["fast", "slow", "dead"]


def test_a_deep_queue_at_a_fast_peer_does_not_send_reads_to_a_slow_one() -> None:
    health = PeerHealth(rng=random.Random(3))
    for _ in range(30):
        health.end("busy", health.begin("busy") - 0.004)  # 4 ms answers: queueing under load
        health.end("slowed", health.begin("slowed") - 0.022)  # 22 ms: a peer behind a 20 ms delay
    for _ in range(60):
        health.begin("busy")  # the whole pool in flight to the fast peer
    assert [health.rank(["slowed", "busy"])[0] for _ in range(200)] == ["busy"] * 200


def test_a_peer_not_asked_for_a_while_gets_one_read_to_refresh_its_estimate() -> None:
    now = [1000.0]
    health = PeerHealth(rng=random.Random(5), monotonic=lambda: now[0])
    for _ in range(30):
        health.end("fast", health.begin("fast") - 0.001)
        health.end("recovered", health.begin("recovered") - 0.050)
    assert health.rank(["recovered", "fast"])[0] == "fast"
    now[0] += 1.5  # nothing sent to "recovered" since
    health.end("fast", health.begin("fast") - 0.001)
    firsts = [health.rank(["recovered", "fast"])[0] for _ in range(5)]
    assert firsts == ["recovered", "fast", "fast", "fast", "fast"]  # one exploring read, not a burst


def test_the_hedge_delay_follows_the_peer_s_recent_p95_above_a_floor() -> None:
    health = PeerHealth()
    assert health.hedge_delay("b") == HEDGE_FLOOR_S  # never timed: the floor
    for i in range(P95_EVERY * 4):
        started = health.begin("b")
        health.end("b", started - (0.050 if i % 20 == 0 else 0.030))  # 30 ms, with a 50 ms tail
    assert 0.030 <= health.hedge_delay("b") <= 0.051
    assert health.suspect_after("b") == max(SUSPECT_FLOOR_S, 4 * health.hedge_delay("b"))
    slow_unanswered = health.begin("b")
    health.end("b", slow_unanswered - 2.0, answered=False)  # a timeout says nothing about answer times
    assert health.hedge_delay("b") <= 0.051


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_peer_silent_past_its_suspect_delay_with_calls_pending_is_marked_down() -> None:
    clock = Clock()
    health = PeerHealth(monotonic=clock)
    first = health.begin("b")
    clock.now += SUSPECT_FLOOR_S * 0.9
    assert health.trip_silent() == []
    health.end("b", first)  # an answer: the silence starts over
    health.begin("b")
    clock.now += SUSPECT_FLOOR_S * 0.9
    assert health.trip_silent() == [] and health.is_up("b")
    clock.now += SUSPECT_FLOOR_S * 0.2
    assert health.trip_silent() == ["b"]
    assert not health.is_up("b") and "no answer for" in health.state("b").last_error


def test_an_idle_peer_is_never_silent_and_any_evidence_brings_one_back() -> None:
    clock = Clock()
    health = PeerHealth(monotonic=clock)
    started = health.begin("b")
    health.end("b", started)
    clock.now += 60  # nothing asked of it, nothing owed
    assert health.trip_silent() == [] and health.is_up("b")
    health.mark_down("b", "timeout")
    health.heard_from("b")  # it sent us a request: up again, without waiting for a probe
    assert health.is_up("b")
    health.heard_from("stranger")  # not a peer this node has ever called: nothing to track
    assert "stranger" not in health.down_peers() and health.is_up("stranger")
