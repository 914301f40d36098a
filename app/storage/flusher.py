"""The durability policy of an engine whose commits do not fsync (--fsync):
a thread that makes applied writes durable, and the futures writers wait on.

- always: group commit. A writer asks for a future (wait_durable); one sync
  runs for every writer waiting when it starts, and writers that arrive
  during a sync share the next one.
- batch: a sync every window, when something was applied; nobody waits.
- never: no thread; the kernel writes back when it likes.

The engine calls applied(count) after every committed transaction (count:
the records it changed) and hands over the blocking sync function. Used by
app.storage.lmdb_store; no asyncio here.

Every sync is counted (stats(): syncs, the writes they made durable, the
seconds they took), from the sequence numbers the flusher keeps anyway:
nothing is counted per write. app.metrics reads the counts when scraped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from app.errors import StorageError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SyncStats:
    """What a store's syncs did since it opened (monotonic counters)."""

    syncs: int  # fsyncs run (explicit ones, such as at close, included)
    synced_writes: int  # writes (records changed) they made durable; / syncs = writes per fsync
    sync_seconds: float  # time spent in them


class Flusher:
    def __init__(self, *, policy: str, window_ms: int, sync: Callable[[], None], name: str) -> None:
        self._policy = policy
        self._window_s = window_ms / 1000
        self._sync = sync
        # A sequence number per applied write (a record changed), and the
        # highest one a sync is known to cover.
        self._seq_lock = threading.Lock()
        self._applied_seq = 0
        self._durable_seq = 0
        self._syncs = 0
        self._sync_seconds = 0.0
        self._closed = False
        self._wake = threading.Condition()
        self._waiters: list[Future[None]] = []
        loops = {"always": self._group_commit_loop, "batch": self._batch_loop}
        self._thread: threading.Thread | None = None
        if policy in loops:
            self._thread = threading.Thread(target=loops[policy], name=f"{name}-{policy}-sync", daemon=True)
            self._thread.start()

    def applied(self, count: int = 1) -> None:
        """A transaction changing `count` records was committed; the next sync must cover it."""
        with self._seq_lock:
            self._applied_seq += count

    def sync(self) -> None:
        """Make everything applied so far durable now (blocking)."""
        with self._seq_lock:
            covered = self._applied_seq
        started = time.perf_counter()
        self._sync()
        took = time.perf_counter() - started
        with self._seq_lock:
            self._durable_seq = max(self._durable_seq, covered)
            self._syncs += 1
            self._sync_seconds += took

    def stats(self) -> SyncStats:
        with self._seq_lock:
            # Every write up to durable_seq was covered by exactly one sync:
            # the durable mark only moves forward, by what each sync covered.
            return SyncStats(syncs=self._syncs, synced_writes=self._durable_seq, sync_seconds=self._sync_seconds)

    def wait_durable(self) -> Future[None] | None:
        """See Store.wait_durable: a future under `always`, else None."""
        if self._policy != "always":
            return None
        future: Future[None] = Future()
        # Running futures cannot be cancelled: a caller that gives up (an
        # asyncio.wrap_future whose task was cancelled) must not leave a
        # cancelled future for the flusher to trip over.
        future.set_running_or_notify_cancel()
        with self._seq_lock:
            already = self._applied_seq <= self._durable_seq
        if already:
            future.set_result(None)
            return future
        with self._wake:
            if self._closed:
                raise StorageError("storage: the store is closed")
            self._waiters.append(future)
            self._wake.notify()
        return future

    def close(self) -> None:
        """Stop the thread after its last round (waiters are answered)."""
        with self._wake:
            if self._closed:
                return
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _group_commit_loop(self) -> None:
        while True:
            with self._wake:
                while not self._waiters and not self._closed:
                    self._wake.wait()
                waiters, self._waiters = self._waiters, []
                closing = self._closed
            if waiters:
                try:
                    self.sync()
                except Exception as exc:  # noqa: BLE001 - the waiters learn of it; the loop keeps serving
                    for future in waiters:
                        future.set_exception(exc)
                else:
                    for future in waiters:
                        future.set_result(None)
            if closing:
                return

    def _batch_loop(self) -> None:
        while True:
            with self._wake:
                if self._closed:
                    return
                self._wake.wait(self._window_s)
            with self._seq_lock:
                dirty = self._applied_seq > self._durable_seq
            if dirty:
                try:
                    self.sync()
                except StorageError:
                    # The next window retries; the engine's close() makes a last attempt and raises.
                    log.exception("batch fsync failed; retrying next window")
