"""When to hedge a replica read: a read not answered within its replica's
hedge delay (PeerHealth.hedge_delay, its recent p95) gets a second replica.

One timer per read cost a uvloop timer handle per remote read, about a tenth
of a quorum GET's server CPU here (BENCHMARKS.md). Instead each read is
queued with its deadline, per peer (a peer's delay changes slowly, so its
queue stays in deadline order), and one timer ticking every TICK_S while
anything waits hands the overdue ones their hedge: a read is hedged at most
a tick late. Used by the coordinator's read rounds; no I/O of its own.
Its clock and timer are the running event loop's unless a Scheduler is
given (unit tests pass a manual one and advance it).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

TICK_S = 0.002  # the hedge fires within this of its deadline: a fifth of the 10 ms floor


class Scheduler(Protocol):
    """A monotonic clock in seconds and a timer on it: what the hedger needs
    of an event loop (asyncio's loops are Schedulers)."""

    def time(self) -> float: ...

    def call_later(self, delay: float, callback: Callable[[], None], /) -> object: ...


class Hedger:
    def __init__(self, *, scheduler: Scheduler | None = None) -> None:
        """scheduler: None uses the running event loop's (looked up per call,
        so a Hedger may be built before the loop runs)."""
        self._waiting: dict[str, deque[tuple[float, asyncio.Future[Any], Callable[[], None]]]] = {}
        self._ticking = False
        self._scheduler = scheduler

    def _loop(self) -> Scheduler:
        return self._scheduler if self._scheduler is not None else asyncio.get_running_loop()

    def watch(self, peer_id: str, delay_s: float, call: asyncio.Future[Any], hedge: Callable[[], None]) -> None:
        """Run hedge() if `call` is still pending delay_s from now."""
        loop = self._loop()
        queue = self._waiting.get(peer_id)
        if queue is None:
            queue = self._waiting[peer_id] = deque()
        queue.append((loop.time() + delay_s, call, hedge))
        if not self._ticking:
            self._ticking = True
            loop.call_later(TICK_S, self._tick)

    def _tick(self) -> None:
        loop = self._loop()
        now = loop.time()
        overdue: list[Callable[[], None]] = []
        for queue in self._waiting.values():
            while queue and (queue[0][0] <= now or queue[0][1].done()):
                _, call, hedge = queue.popleft()
                if not call.done():
                    overdue.append(hedge)
        self._ticking = False
        for hedge in overdue:  # after the sweep: a hedge asks another replica, which queues a new read here
            hedge()
        if not self._ticking and any(self._waiting.values()):
            self._ticking = True
            loop.call_later(TICK_S, self._tick)
