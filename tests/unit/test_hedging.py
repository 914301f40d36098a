"""The hedger: an overdue pending call gets its hedge once, a call that
answered in time gets none, and a hedge may queue a new call while the tick
that ran it is still sweeping."""

from __future__ import annotations

import asyncio

from app.cluster.hedging import TICK_S, Hedger


async def test_only_overdue_pending_calls_are_hedged_and_a_hedge_may_queue_another() -> None:
    loop = asyncio.get_running_loop()
    hedger = Hedger()
    hung: asyncio.Future[object] = loop.create_future()
    answered: asyncio.Future[object] = loop.create_future()
    second: asyncio.Future[object] = loop.create_future()
    hedged: list[str] = []

    def hedge_hung() -> None:
        hedged.append("hung")
        hedger.watch("other-peer", 0.01, second, lambda: hedged.append("second"))  # asks the next replica

    hedger.watch("peer", 0.01, hung, hedge_hung)
    hedger.watch("peer", 0.01, answered, lambda: hedged.append("answered"))
    answered.set_result(None)
    await asyncio.sleep(0.01 + 3 * TICK_S)
    assert hedged == ["hung"]
    await asyncio.sleep(0.01 + 3 * TICK_S)
    assert hedged == ["hung", "second"]  # the hedge's own call was watched, and hedged in turn
    await asyncio.sleep(5 * TICK_S)
    assert hedged == ["hung", "second"]  # once each
    for future in (hung, second):
        future.cancel()
