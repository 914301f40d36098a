"""Hybrid logical clock and the Version it stamps on every write.

A Version is (hlc, node): hlc packs wall-clock milliseconds in the high bits
and a logical counter in the low 16, so versions sort by time first, stay
monotonic on a node even if its wall clock steps back, and tie-break by the
writing node's id so any two versions are totally ordered across the cluster.
Pure: stdlib only. Used by storage (last-writer-wins) and the coordinator.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import NamedTuple

LOGICAL_BITS = 16
LOGICAL_MASK = (1 << LOGICAL_BITS) - 1


class Version(NamedTuple):
    """A totally ordered write stamp. Tuple order is the version order."""

    hlc: int
    node: str

    @property
    def wall_ms(self) -> int:
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
    return time.time_ns() // 1_000_000


class HybridClock:
    """Issues strictly increasing Versions for one node.

    `now()` stamps a local write; `observe()` folds in a version seen from
    another node so that this node's next stamp is later than it (causality
    across nodes survives clock skew). Thread-safe: storage threads use it too.
    """

    def __init__(self, node_id: str, *, wall: Callable[[], int] = wall_ms) -> None:
        self._node = node_id
        self._wall = wall
        self._last = 0
        self._lock = threading.Lock()

    @property
    def node_id(self) -> str:
        return self._node

    def now(self) -> Version:
        with self._lock:
            physical = self._wall() << LOGICAL_BITS
            # Wall clock ahead of everything seen: use it. Otherwise (same ms,
            # or the clock stepped back) tick the logical counter instead.
            self._last = physical if physical > self._last else self._last + 1
            return Version(self._last, self._node)

    def observe(self, version: Version) -> None:
        with self._lock:
            if version.hlc > self._last:
                self._last = version.hlc
