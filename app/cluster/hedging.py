"""When to hedge a replica read: a read not answered within its replica's
hedge delay (PeerHealth.hedge_delay, its recent p95) gets a second replica.

One timer per read cost a uvloop timer handle per remote read, about a tenth
of a quorum GET's server CPU here (BENCHMARKS.md). Instead each read is
queued with its deadline, per peer (a peer's delay changes slowly, so its
queue stays in deadline order), and one timer ticking every TICK_S while
anything waits hands the overdue ones their hedge: a read is hedged at most
a tick late. Used by the coordinator's read rounds; no I/O of its own.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

TICK_S = 0.002  # the hedge fires within this of its deadline: a fifth of the 10 ms floor


class Hedger:
    def __init__(self) -> None:
        self._waiting: dict[str, deque[tuple[float, asyncio.Future[Any], Callable[[], None]]]] = {}
        self._ticking = False

    def watch(self, peer_id: str, delay_s: float, call: asyncio.Future[Any], hedge: Callable[[], None]) -> None:
        """Run hedge() if `call` is still pending delay_s from now."""
        loop = asyncio.get_running_loop()
        queue = self._waiting.get(peer_id)
        if queue is None:
            queue = self._waiting[peer_id] = deque()
        queue.append((loop.time() + delay_s, call, hedge))
        if not self._ticking:
            self._ticking = True
            loop.call_later(TICK_S, self._tick)

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
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
