"""The group commit of --fsync always (app.storage.flusher.Flusher), with a
sync function the test holds open: when a sync starts, which waiters it
answers, what it counts, and what a failed one does."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future

import pytest

from app.errors import StorageError
from app.storage.flusher import Flusher

WAIT_S = 10.0  # bounds a hang; every wait below ends in milliseconds


class HeldSync:
    """A sync that signals when it starts and returns when released (or raises `fail`)."""

    def __init__(self) -> None:
        self.started = threading.Semaphore(0)
        self.release = threading.Semaphore(0)
        self.fail: list[BaseException] = []

    def __call__(self) -> None:
        self.started.release()
        assert self.release.acquire(timeout=WAIT_S)
        if self.fail:
            raise self.fail.pop()

    def wait_started(self) -> None:
        assert self.started.acquire(timeout=WAIT_S), "no sync started"


@pytest.fixture
def held() -> HeldSync:
    return HeldSync()


@pytest.fixture
def flusher(held: HeldSync) -> Iterator[Flusher]:
    flusher = Flusher(policy="always", window_ms=5, sync=held, name="test")
    yield flusher
    held.release.release(100)  # let a final sync through
    flusher.close()


def waiter(flusher: Flusher) -> Future[None]:
    future = flusher.wait_durable()
    assert future is not None
    return future


def test_a_lone_waiter_starts_a_sync_at_once(flusher: Flusher, held: HeldSync) -> None:
    flusher.applied()
    first = waiter(flusher)
    held.wait_started()  # no timer, no second writer needed
    assert not first.done()
    held.release.release()
    assert first.result(timeout=WAIT_S) is None
    assert waiter(flusher).done()  # nothing new since: no sync needed


def test_writes_committed_during_a_sync_share_the_next_one(flusher: Flusher, held: HeldSync) -> None:
    flusher.applied()
    first = waiter(flusher)
    held.wait_started()
    during = []
    for _ in range(3):
        flusher.applied(2)
        during.append(waiter(flusher))
    held.release.release()
    assert first.result(timeout=WAIT_S) is None
    held.wait_started()  # one more sync, for all three
    assert not any(future.done() for future in during)  # not covered by the first sync
    held.release.release()
    for future in during:
        assert future.result(timeout=WAIT_S) is None
    stats = flusher.stats()
    assert (stats.syncs, stats.synced_writes) == (2, 7)


def test_a_failed_sync_fails_its_waiters_and_the_next_one_retries(flusher: Flusher, held: HeldSync) -> None:
    held.fail.append(StorageError("storage: sync failed: EIO"))
    flusher.applied()
    doomed = [waiter(flusher), waiter(flusher)]
    held.wait_started()
    held.release.release()
    for future in doomed:
        with pytest.raises(StorageError):
            future.result(timeout=WAIT_S)
    assert flusher.stats().syncs == 0  # a failed sync made nothing durable
    retried = waiter(flusher)
    held.wait_started()
    held.release.release()
    assert retried.result(timeout=WAIT_S) is None
    assert (flusher.stats().syncs, flusher.stats().synced_writes) == (1, 1)
