"""The hybrid logical clock: monotonic on a node whatever its wall clock does,
causal across nodes, totally ordered, and stable on the wire."""

from __future__ import annotations

import itertools
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.clock import LOGICAL_BITS, ZERO, HybridClock, Version
from app.errors import FutureVersionError

wall_readings = st.lists(st.integers(0, 2**40), min_size=1, max_size=60)
node_ids = st.text(min_size=1, max_size=12)


class ScriptedWall:
    """A wall clock that returns the readings it was given, then repeats the last."""

    def __init__(self, readings: list[int]) -> None:
        self.readings = list(readings)

    def __call__(self) -> int:
        return self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]


@given(wall_readings)
def test_stamps_strictly_increase_even_when_the_wall_clock_jumps_back(readings: list[int]) -> None:
    clock = HybridClock("n1", wall=ScriptedWall(readings))
    stamps = [clock.now() for _ in readings]
    assert all(a < b for a, b in itertools.pairwise(stamps))
    # Never behind the wall clock it has read so far.
    for reading, stamp in zip(readings, stamps, strict=True):
        assert stamp.physical_ms >= reading


def test_a_backwards_step_ticks_the_logical_counter() -> None:
    clock = HybridClock("n1", wall=ScriptedWall([1000, 400, 400, 1500]))
    first, second, third, fourth = (clock.now() for _ in range(4))
    assert first == Version(1000 << LOGICAL_BITS, "n1")
    assert second.hlc == first.hlc + 1 and third.hlc == first.hlc + 2
    assert second.physical_ms == third.physical_ms == 1000
    assert fourth == Version(1500 << LOGICAL_BITS, "n1")  # wall time takes over again


@given(st.integers(0, 2**40), st.integers(-(2**20), 2**20), st.lists(st.integers(0, 3), max_size=30))
def test_causality_holds_across_skewed_nodes(base: int, skew: int, local_events: list[int]) -> None:
    """A message bounces between two nodes whose clocks disagree (and never
    move); each hop's stamp is later than the one it answers, so the chain of
    causally related stamps only grows whichever clock is behind."""
    a = HybridClock("a", wall=lambda: base)
    b = HybridClock("b", wall=lambda: max(0, base + skew))
    last = ZERO
    for hop, events in enumerate(local_events):
        sender, receiver = (a, b) if hop % 2 == 0 else (b, a)
        for _ in range(events):
            sender.now()  # unrelated local writes in between
        sent = sender.now()
        assert sent > last
        receiver.observe(sent)
        last = receiver.now()
        assert last > sent


def test_observing_an_older_version_changes_nothing() -> None:
    clock = HybridClock("n1", wall=lambda: 5000)
    mine = clock.now()
    clock.observe(Version(10, "other"))
    assert clock.now().hlc == mine.hlc + 1


@given(st.integers(0, 2**63), node_ids, st.integers(0, 2**63), node_ids)
def test_versions_are_totally_ordered_by_hlc_then_node(h1: int, n1: str, h2: int, n2: str) -> None:
    v1, v2 = Version(h1, n1), Version(h2, n2)
    assert (v1 < v2) == ((h1, n1) < (h2, n2))
    assert (v1 == v2) == (h1 == h2 and n1 == n2)
    assert (v1 < v2) + (v2 < v1) + (v1 == v2) == 1


def test_equal_timestamps_tie_break_on_the_node_id() -> None:
    assert Version(7, "a") < Version(7, "b") < Version(8, "a")


@given(st.integers(0, 2**64 - 1), node_ids)
def test_encode_decode_round_trip(hlc: int, node: str) -> None:
    version = Version(hlc, node)
    assert Version.decode(version.encode()) == version


@pytest.mark.parametrize("text", ["", "12", "12.", ".n1", "x.n1", "-1.n1", "1 .n1"])
def test_decode_rejects_malformed_versions(text: str) -> None:
    with pytest.raises(ValueError, match="not a version"):
        Version.decode(text)


def test_wall_ms_is_the_physical_part() -> None:
    assert Version((123 << LOGICAL_BITS) | 9, "n").physical_ms == 123


def test_concurrent_stamps_are_unique() -> None:
    clock = HybridClock("n1", wall=lambda: 1)  # a frozen wall: only the counter moves
    stamps: list[Version] = []
    lock = threading.Lock()

    def stamp() -> None:
        mine = [clock.now() for _ in range(500)]
        with lock:
            stamps.extend(mine)

    threads = [threading.Thread(target=stamp) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(stamps)) == 2000


# -- never back across a restart, and bounded in how far it follows ---------------


def test_restore_starts_the_clock_above_a_high_water_mark_far_ahead_of_the_wall() -> None:
    clock = HybridClock("n1", wall=lambda: 1000, max_offset_ms=500)
    clock.restore(Version(5000 << LOGICAL_BITS, "n2").hlc)  # versions it held before the restart
    assert clock.now() > Version(5000 << LOGICAL_BITS, "n2")


def test_observe_refuses_a_version_from_beyond_the_max_offset_and_does_not_follow_it() -> None:
    clock = HybridClock("n1", wall=lambda: 10_000, max_offset_ms=500)
    clock.observe(Version(10_500 << LOGICAL_BITS, "near"))  # exactly at the bound: followed
    assert clock.now().physical_ms == 10_500
    far = Version(10_502 << LOGICAL_BITS, "far")
    with pytest.raises(FutureVersionError, match=r"from node far is 502 ms ahead of node n1's clock"):
        clock.observe(far)
    assert not clock.observe_if_plausible(far)
    assert clock.now() < far


def test_an_unbounded_clock_follows_any_version() -> None:
    clock = HybridClock("n1", wall=lambda: 0)
    clock.observe(Version(10**9 << LOGICAL_BITS, "far"))
    assert clock.now().physical_ms == 10**9
