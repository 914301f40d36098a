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
