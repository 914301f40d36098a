"""Coalescing: calls made in the same event-loop iteration are handled as one
batch — single-key calls to one peer as one request (app.transport.http), a
replica's local writes as one storage transaction (app.cluster.replica).

Under load a coordinator fans out many replica reads and writes per loop
iteration, each of which would otherwise be one HTTP exchange with its own
request parsing, ASGI dispatch and syscalls on both nodes. Collecting them
until the loop has run every ready callback (call_soon) adds no timer and no
measurable latency, and divides the per-request cost by the batch size
(Cassandra and Scylla coalesce their internode messages the same way).
A batch that fails fails each call in it, exactly as if each had been sent
alone; a lone call is sent alone.

DurableWaits does the same for the waits on a store's group commit (--fsync
always): every writer of one loop turn shares one wait_durable() future,
asked for once all of them have committed.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Coalescer(Generic[Item, Result]):
    def __init__(
        self,
        send: Callable[[list[Item]], Awaitable[list[Result]]],
        *,
        max_items: int | None = None,
        max_bytes: int | None = None,
        size_of: Callable[[Item], int] = lambda item: 0,
    ) -> None:
        """Batches hold at most max_items items and max_bytes by size_of
        (None: no bound); an item bigger than max_bytes goes alone."""
        self._send = send
        self._max_items = max_items if max_items is not None else sys.maxsize
        self._max_bytes = max_bytes if max_bytes is not None else sys.maxsize
        self._size_of = size_of
        self._queued: list[tuple[Item, asyncio.Future[Result]]] = []
        self._flushing: set[asyncio.Task[None]] = set()

    async def submit(self, item: Item) -> Result:
        return await self.enqueue(item)

    def enqueue(self, item: Item) -> asyncio.Future[Result]:
        """submit() without the coroutine: the future of item's result, for
        callers that attach callbacks. Cancelling it before the batch is sent
        leaves item out."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        if not self._queued:
            loop.call_soon(self._flush)  # after every callback already ready in this iteration
        self._queued.append((item, future))
        return future

    def _flush(self) -> None:
        queued, self._queued = self._queued, []
        batch: list[tuple[Item, asyncio.Future[Result]]] = []
        size = 0
        for entry in queued:
            if entry[1].done():
                continue  # the caller gave up (cancelled) before we sent it
            entry_size = self._size_of(entry[0])
            if batch and (len(batch) >= self._max_items or size + entry_size > self._max_bytes):
                self._start(batch)
                batch, size = [], 0
            batch.append(entry)
            size += entry_size
        if batch:
            self._start(batch)

    def _start(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        task = asyncio.ensure_future(self._deliver(batch))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _deliver(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            results = await self._send([item for item, _ in batch])
            if len(results) != len(batch):
                raise ValueError(f"the peer answered {len(results)} of {len(batch)} coalesced calls")
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError)
            for _, future in batch:
                if not future.done():
                    future.cancel() if cancelled else future.set_exception(exc)
            if cancelled:
                raise
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)


class DurableWaits:
    """The writers of one store that committed in the same event-loop turn
    wait for durability together: one `request()` (Store.wait_durable) per
    turn, its answer fanned out on the loop.

    A concurrent.futures.Future per write, each awaited through
    asyncio.wrap_future, cost a call_soon_threadsafe (a self-pipe write and a
    wake-up of the loop) per write when the flusher answered; now it is one
    per turn. The request is made in a call_soon callback, after every writer
    of the turn has committed and called wait(): the flusher's next sync
    starts after all of them, so it covers them all (a write is acknowledged
    only after an fsync that started after its commit).

    A waiter that gives up (its task cancelled) leaves the others waiting; a
    failed sync fails every waiter of the turn. A store whose policy never
    waits (request() answers None, e.g. --fsync batch) is asked once, then
    wait() returns at once.
    """

    def __init__(self, request: Callable[[], Future[None] | None]) -> None:
        self._request = request
        self._waiters: list[asyncio.Future[None]] = []
        self._never = False  # the store answered None: its policy acknowledges before the flush

    async def wait(self) -> None:
        """Return once every write the caller committed before calling is durable."""
        if self._never:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        if not self._waiters:
            loop.call_soon(self._ask, loop)  # after every callback already ready in this turn
        self._waiters.append(waiter)
        await waiter

    def _ask(self, loop: asyncio.AbstractEventLoop) -> None:
        waiters, self._waiters = self._waiters, []
        try:
            pending = self._request()
        except Exception as exc:  # noqa: BLE001 - e.g. the store closed: each waiter learns of it
            _settle(waiters, exc)
            return
        if pending is None:
            self._never = True
            _settle(waiters, None)
        elif pending.done():  # nothing applied since the last sync: no thread hop
            _settle(waiters, pending.exception())
        else:
            pending.add_done_callback(lambda done: _settle_threadsafe(loop, waiters, done))


def _settle_threadsafe(
    loop: asyncio.AbstractEventLoop, waiters: list[asyncio.Future[None]], done: Future[None]
) -> None:
    """On the flusher's thread: hand the answer to the loop (unless it is
    gone: a node stopped with writers still waiting has nobody to tell)."""
    if not loop.is_closed():
        loop.call_soon_threadsafe(_settle, waiters, done.exception())


def _settle(waiters: list[asyncio.Future[None]], exc: BaseException | None) -> None:
    for waiter in waiters:
        if waiter.done():
            continue  # its writer gave up (cancelled)
        if exc is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(exc)
