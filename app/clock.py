"""Hybrid logical clock and the Version it stamps on every write.

A Version is (hlc, node): hlc packs wall-clock milliseconds in the high bits
and a logical counter in the low 16, so versions sort by time first, stay
monotonic on a node even if its wall clock steps back, and tie-break by the
writing node's id so any two versions are totally ordered across the cluster.

The clock never goes back: it starts at the store's high-water mark (`restore`)
and folds in every version the node sees (`observe`). A version from further
ahead of this node's wall clock than the max offset is refused, as
CockroachDB's --max-offset does, so one fast clock cannot drag every node's
stamps into the future. Pure: stdlib and app.errors only. Used by storage
(last-writer-wins), the replica side and the coordinator.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from app.errors import FutureVersionError

LOGICAL_BITS = 16
LOGICAL_MASK = (1 << LOGICAL_BITS) - 1


class Version(NamedTuple):
    """A totally ordered write stamp. Tuple order is the version order."""

    hlc: int
    node: str

    @property
    def physical_ms(self) -> int:
        """The wall-clock milliseconds the version was stamped at (its HLC's physical part)."""
        return self.hlc >> LOGICAL_BITS

    def encode(self) -> str:
        """'<hlc>.<node>': the wire and header form."""
        return f"{self.hlc}.{self.node}"

    @classmethod
    def decode(cls, text: str) -> Version:
        hlc, sep, node = text.partition(".")
        if not sep or not node or not hlc.isdigit():
            raise ValueError(f"not a version: {text!r}")
        return cls(int(hlc), node)


ZERO = Version(0, "")


def wall_ms() -> int:
    """This machine's wall clock, in milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


class HybridClock:
    """Issues strictly increasing Versions for one node.

    `now()` stamps a local write; `observe()` folds in a version seen from
    another node so that this node's next stamp is later than it (causality
    across nodes survives clock skew). Thread-safe: storage threads use it too.
    max_offset_ms 0 accepts any version (unit tests of the clock alone).
    """

    def __init__(self, node_id: str, *, wall: Callable[[], int] = wall_ms, max_offset_ms: int = 0) -> None:
        self._node = node_id
        self._wall = wall
        self._max_offset_ms = max_offset_ms
        self._last = 0
        self._lock = threading.Lock()

    @property
    def node_id(self) -> str:
        return self._node

    @property
    def max_offset_ms(self) -> int:
        return self._max_offset_ms

    def reading_ms(self) -> int:
        """This clock's wall-clock reading (its injected `wall`, else the machine's)."""
        return self._wall()

    def ahead_ms(self, version: Version) -> int:
        """How far the version's wall time is ahead of this node's wall clock."""
        return version.physical_ms - self._wall()

    def now(self) -> Version:
        with self._lock:
            physical = self._wall() << LOGICAL_BITS
            # Wall clock ahead of everything seen: use it. Otherwise (same ms,
            # or the clock stepped back) tick the logical counter instead.
            self._last = physical if physical > self._last else self._last + 1
            return Version(self._last, self._node)

    def observe(self, version: Version) -> None:
        """Fold in a version seen from elsewhere; FutureVersionError if it is
        further ahead of this node's wall clock than the max offset."""
        if version.hlc <= self._last:
            return  # not past where this clock already stands: nothing to fold in or check (a replica's usual case)
        if self._max_offset_ms and (ahead := self.ahead_ms(version)) > self._max_offset_ms:
            raise FutureVersionError(
                f"clock: version {version.encode()} from node {version.node or '?'} is {ahead} ms ahead of "
                f"node {self._node}'s clock, beyond --max-clock-offset ({self._max_offset_ms} ms); "
                "one of the two clocks is wrong: check their time sync"
            )
        self.restore(version.hlc)

    def observe_if_plausible(self, version: Version) -> bool:
        """observe() for what a read saw: a version beyond the bound is not
        folded in (False), and the read goes on."""
        try:
            self.observe(version)
        except FutureVersionError:
            return False
        return True

    def restore(self, hlc: int) -> None:
        """Never stamp at or below hlc again: the start-up high-water mark of
        the node's store (no bound: these are versions it already holds)."""
        with self._lock:
            if hlc > self._last:
                self._last = hlc
