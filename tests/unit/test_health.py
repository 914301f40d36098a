"""Peer health: reachability flips, the source's readiness veto, load ranking."""

from __future__ import annotations

import random

from app.cluster.health import PeerHealth


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
