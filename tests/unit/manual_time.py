"""A Scheduler (app.cluster.hedging) whose time moves only when a test says
so: what unit tests hand the hedger and peer health instead of the loop's
clock, so timing logic is driven step by step and nothing sleeps."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

START_S = 1000.0  # any monotonic reading well past zero, as a real one is (PeerState's times start at 0)


class ManualScheduler:
    def __init__(self, start_s: float = START_S) -> None:
        self.now = start_s
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()  # timers due at the same time run in the order they were set

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None], /) -> None:
        heapq.heappush(self._timers, (self.now + delay, next(self._order), callback))

    def advance(self, seconds: float) -> None:
        """Move time forward, running each timer due on the way at its own
        time (a timer set by one that runs is run too, if due)."""
        until = self.now + seconds
        while self._timers and self._timers[0][0] <= until:
            due, _, callback = heapq.heappop(self._timers)
            self.now = max(self.now, due)
            callback()
        self.now = until

    @property
    def pending(self) -> int:
        return len(self._timers)
