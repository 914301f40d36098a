"""The hedger, on a manual clock: an overdue pending call gets its hedge once,
no sooner than its deadline and at most a tick after it; a call that answered
in time gets none; a hedge may queue a new call while the tick that ran it is
still sweeping; and the tick stops once nothing waits."""

from __future__ import annotations

import asyncio

from app.cluster.hedging import TICK_S, Hedger
from tests.unit.manual_time import ManualScheduler

DELAY_S = 0.01


async def test_only_overdue_pending_calls_are_hedged_and_a_hedge_may_queue_another() -> None:
    loop = asyncio.get_running_loop()
    clock = ManualScheduler()
    hedger = Hedger(scheduler=clock)
    hung: asyncio.Future[object] = loop.create_future()
    answered: asyncio.Future[object] = loop.create_future()
    second: asyncio.Future[object] = loop.create_future()
    hedged: dict[str, float] = {}  # which call's hedge ran, and when

    def hedge_hung() -> None:
        hedged["hung"] = clock.time()
        hedger.watch("other-peer", DELAY_S, second, lambda: hedged.update(second=clock.time()))

    start = clock.time()
    hedger.watch("peer", DELAY_S, hung, hedge_hung)
    hedger.watch("peer", DELAY_S, answered, lambda: hedged.update(answered=clock.time()))
    answered.set_result(None)
    clock.advance(DELAY_S - TICK_S / 2)
    assert hedged == {}  # not before the deadline
    clock.advance(1.5 * TICK_S)
    assert list(hedged) == ["hung"]
    assert start + DELAY_S <= hedged["hung"] <= start + DELAY_S + TICK_S + 1e-9  # at most a tick late
    clock.advance(DELAY_S + 1.5 * TICK_S)
    assert list(hedged) == ["hung", "second"]  # the hedge's own call was watched, and hedged in turn
    assert hedged["hung"] + DELAY_S <= hedged["second"] <= hedged["hung"] + DELAY_S + TICK_S + 1e-9
    clock.advance(5 * TICK_S)
    assert list(hedged) == ["hung", "second"]  # once each
    assert clock.pending == 0  # nothing waits: the tick stopped
    for future in (hung, second):
        future.cancel()
