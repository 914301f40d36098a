"""Coalescing of single-key peer calls, the frames they travel in, and the durable waits of one loop turn."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future

import pytest

from app.clock import Version
from app.coalesce import Coalescer, DurableWaits
from app.errors import StorageError
from app.storage.base import Record
from app.transport import codec


class Recorder:
    """A send function that records each batch and answers item * 10; with
    `gate`, each batch waits for the gate to open (`sent` is set once one is in flight)."""

    def __init__(self, *, fail_with: BaseException | None = None, gate: asyncio.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.fail_with = fail_with
        self.gate = gate
        self.sent = asyncio.Event()

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.sent.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return [item * 10 for item in items]


def coalescer(send: Recorder, *, max_items: int = 64, max_bytes: int = 1 << 20) -> Coalescer[int, int]:
    return Coalescer(send, max_items=max_items, max_bytes=max_bytes, size_of=lambda item: item)


async def test_calls_made_in_one_loop_iteration_travel_together() -> None:
    send = Recorder()
    c = coalescer(send)
    results = await asyncio.gather(*(c.submit(i) for i in range(1, 6)))
    assert results == [10, 20, 30, 40, 50]
    assert send.batches == [[1, 2, 3, 4, 5]]


async def test_calls_in_later_iterations_go_in_later_batches() -> None:
    send = Recorder()
    c = coalescer(send)
    assert await c.submit(1) == 10
    assert await c.submit(2) == 20
    assert send.batches == [[1], [2]]


async def test_batches_are_split_by_count_and_by_bytes() -> None:
    send = Recorder()
    results = await asyncio.gather(*(coalescer(send, max_items=2).submit(i) for i in range(1, 6)))
    assert results == [10, 20, 30, 40, 50]
    assert len(send.batches) == 5  # separate coalescers: nothing shared

    send = Recorder()
    c = coalescer(send, max_items=2)
    await asyncio.gather(*(c.submit(i) for i in range(1, 6)))
    assert send.batches == [[1, 2], [3, 4], [5]]

    send = Recorder()
    c = coalescer(send, max_bytes=10)
    await asyncio.gather(*(c.submit(i) for i in (4, 5, 6, 30, 1)))
    assert send.batches == [[4, 5], [6], [30], [1]]  # an item over the limit goes alone


async def test_a_failed_batch_fails_every_call_in_it_and_only_those() -> None:
    send = Recorder(fail_with=ConnectionResetError("peer went away"))
    c = coalescer(send)
    results = await asyncio.gather(*(c.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, ConnectionResetError) for r in results)
    send.fail_with = None
    assert await c.submit(7) == 70


async def test_a_short_answer_fails_the_batch() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    c: Coalescer[int, int] = Coalescer(short, max_items=8, max_bytes=100, size_of=lambda item: 1)
    results = await asyncio.gather(c.submit(1), c.submit(2), return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results)


async def test_a_caller_cancelled_before_the_flush_is_left_out() -> None:
    send = Recorder()
    c = coalescer(send)
    gone = asyncio.ensure_future(c.submit(1))
    kept = asyncio.ensure_future(c.submit(2))
    await asyncio.sleep(0)  # both submitted, flush scheduled but not run
    gone.cancel()
    assert await kept == 20
    assert send.batches == [[2]]


async def test_a_caller_cancelled_while_its_batch_is_in_flight_does_not_disturb_the_others() -> None:
    gate = asyncio.Event()
    send = Recorder(gate=gate)
    c = coalescer(send)
    first = asyncio.ensure_future(c.submit(1))
    second = asyncio.ensure_future(c.submit(2))
    await send.sent.wait()  # the batch is in flight
    first.cancel()
    gate.set()
    assert await second == 20
    assert first.cancelled()
    assert send.batches == [[1, 2]]  # both travelled together: the cancel came while it was in flight


def test_write_frames_round_trip_with_hints_and_tombstones() -> None:
    writes = [
        (b"k1", Record(Version(5, "n1"), b"abc", 0), None),
        (b"k\xc3\xa9", Record(Version(6, "n2"), None, 99), "node-3"),
        (b"k3", Record(Version(7, "n1"), b"", 0), None),
    ]
    assert codec.decode_writes(codec.encode_writes(writes)) == writes


def test_read_answer_frames_round_trip() -> None:
    answers = [
        (b"a", Record(Version(1, "n1"), b"x" * 300, 0), False),
        (b"b", None, True),
        (b"c", Record(Version(2, "n2"), None, 5), True),
    ]
    assert codec.decode_read_answers(codec.encode_read_answers(answers)) == [(r, s) for _, r, s in answers]
    assert codec.decode_keys(codec.encode_keys([b"a", b"bb", b"x" * 1024])) == [b"a", b"bb", b"x" * 1024]


@pytest.mark.parametrize(
    "decode, frames",
    [
        (codec.decode_writes, codec.encode_writes([(b"k", Record(Version(1, "n"), b"value", 0), "h")])),
        (codec.decode_keys, codec.encode_keys([b"key"])),
        (codec.decode_read_answers, codec.encode_read_answers([(b"k", Record(Version(1, "n"), b"value", 0), False)])),
    ],
)
def test_truncated_frames_are_refused(decode, frames) -> None:
    for cut in range(1, len(frames)):
        with pytest.raises(ValueError):
            decode(frames[:cut])


# -- DurableWaits: one durable wait per loop turn --------------------------------


class Durability:
    """A store's wait_durable: each call is logged and answered with a fresh
    future, settled by the test (from a thread, as the flusher does)."""

    def __init__(self, *, policy_waits: bool = True) -> None:
        self.log: list[str] = []
        self.futures: list[Future[None]] = []
        self.policy_waits = policy_waits

    def __call__(self) -> Future[None] | None:
        self.log.append("request")
        if not self.policy_waits:
            return None
        future: Future[None] = Future()
        future.set_running_or_notify_cancel()
        self.futures.append(future)
        return future

    def sync_from_a_thread(self, *, error: BaseException | None = None) -> None:
        future = self.futures[-1]
        thread = threading.Thread(target=future.set_exception if error else future.set_result, args=(error,))
        thread.start()
        thread.join()


async def _until(predicate: Callable[[], bool], turns: int = 100) -> None:
    for _ in range(turns):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"not true after {turns} loop turns")


async def test_writers_of_one_turn_share_one_request_made_after_every_commit() -> None:
    durability = Durability()
    waits = DurableWaits(durability)

    async def writer(i: int) -> None:
        durability.log.append(f"commit {i}")
        await waits.wait()

    tasks = [asyncio.ensure_future(writer(i)) for i in range(5)]
    await _until(lambda: bool(durability.futures))
    assert durability.log == [*(f"commit {i}" for i in range(5)), "request"]
    assert not any(task.done() for task in tasks)  # nobody is answered before the sync
    durability.sync_from_a_thread()
    await asyncio.gather(*tasks)
    assert len(durability.futures) == 1


async def test_each_turn_asks_again() -> None:
    durability = Durability()
    waits = DurableWaits(durability)
    first = asyncio.ensure_future(waits.wait())
    await _until(lambda: len(durability.futures) == 1)
    second = asyncio.ensure_future(waits.wait())  # a later turn: its commit may follow the first request
    await _until(lambda: len(durability.futures) == 2)
    durability.sync_from_a_thread()
    await second
    assert not first.done()  # the first request's sync has not ended
    durability.futures[0].set_result(None)
    await first


async def test_a_waiter_that_gives_up_leaves_the_others_waiting() -> None:
    durability = Durability()
    waits = DurableWaits(durability)
    tasks = [asyncio.ensure_future(waits.wait()) for _ in range(3)]
    await _until(lambda: bool(durability.futures))
    tasks[1].cancel()
    await asyncio.sleep(0)
    assert tasks[1].cancelled() and not tasks[0].done() and not tasks[2].done()
    durability.sync_from_a_thread()
    await asyncio.gather(tasks[0], tasks[2])
    assert not durability.futures[0].cancelled()


async def test_a_failed_sync_fails_every_write_of_the_turn() -> None:
    durability = Durability()
    waits = DurableWaits(durability)
    tasks = [asyncio.ensure_future(waits.wait()) for _ in range(3)]
    await _until(lambda: bool(durability.futures))
    durability.sync_from_a_thread(error=StorageError("storage: sync failed: EIO"))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert [type(result) for result in results] == [StorageError] * 3


async def test_a_refused_request_fails_every_write_of_the_turn() -> None:
    def closed() -> Future[None] | None:
        raise StorageError("storage: the store is closed")

    waits = DurableWaits(closed)
    results = await asyncio.gather(waits.wait(), waits.wait(), return_exceptions=True)
    assert [type(result) for result in results] == [StorageError] * 2


async def test_an_already_durable_answer_needs_no_thread() -> None:
    def done() -> Future[None]:
        future: Future[None] = Future()
        future.set_result(None)
        return future

    waits = DurableWaits(done)
    await asyncio.wait_for(asyncio.gather(waits.wait(), waits.wait()), timeout=5)


async def test_a_policy_that_never_waits_is_asked_once() -> None:
    durability = Durability(policy_waits=False)
    waits = DurableWaits(durability)
    await asyncio.gather(waits.wait(), waits.wait())
    await waits.wait()
    assert durability.log == ["request"]
