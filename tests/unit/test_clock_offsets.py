"""The max-offset rule: a node refuses to coordinate when most peers it
measured recently are further off than the bound, allowing for each probe's
uncertainty; stale and slow samples say nothing."""

from __future__ import annotations

from app.cluster.clock_offsets import FRESH_FOR_S, ClockOffsets


class Monotonic:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def offsets_with(samples: dict[str, float], *, round_trip_ms: float = 2.0) -> tuple[ClockOffsets, Monotonic]:
    monotonic = Monotonic()
    offsets = ClockOffsets(max_offset_ms=500, monotonic=monotonic)
    for peer, offset in samples.items():
        offsets.record(
            peer,
            sent_wall_ms=1_000_000,
            round_trip_ms=round_trip_ms,
            peer_wall_ms=1_000_000 + round_trip_ms / 2 + offset,
        )
    return offsets, monotonic


def test_the_offset_is_measured_against_the_probes_midpoint() -> None:
    offsets, _ = offsets_with({"b": 1234.0}, round_trip_ms=10)
    assert offsets.offset_ms("b") == 1234.0


def test_one_far_peer_of_two_is_that_peer_s_problem_not_ours() -> None:
    offsets, _ = offsets_with({"b": 30_000, "c": 3})
    assert offsets.refusal() is None


def test_most_peers_far_means_our_clock_is_the_odd_one_out() -> None:
    offsets, _ = offsets_with({"b": -30_000, "c": -29_990, "d": 2})
    reason = offsets.refusal()
    assert reason is not None and "off from 2 of 3 peers" in reason and "--max-clock-offset (0.5s" in reason


def test_with_a_single_peer_neither_side_can_tell_so_both_refuse() -> None:
    offsets, _ = offsets_with({"b": 600})
    assert offsets.refusal() is not None


def test_the_probe_s_uncertainty_is_given_the_benefit_of_the_doubt() -> None:
    offsets, _ = offsets_with({"b": 700, "c": 700}, round_trip_ms=500)  # 700 ± 250 may be within 500
    assert offsets.refusal() is None


def test_stale_and_slow_samples_say_nothing() -> None:
    offsets, monotonic = offsets_with({"b": 5000, "c": 5000})
    assert offsets.refusal() is not None
    monotonic.now += FRESH_FOR_S + 1
    assert offsets.refusal() is None and offsets.offset_ms("b") is None
    slow, _ = offsets_with({"b": 5000}, round_trip_ms=5000)
    assert slow.offset_ms("b") is None


def test_a_departed_peer_is_forgotten() -> None:
    offsets, _ = offsets_with({"b": 5000})
    offsets.forget("b")
    assert offsets.refusal() is None and offsets.offset_ms("b") is None
