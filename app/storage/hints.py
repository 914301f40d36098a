"""Hinted handoff's durable side: writes this node holds for a replica that
could not take them, keyed by the intended owner, until they are delivered.

Backed by any Store engine (its own directory for LMDB), one record per
(target, key), newest version wins, so a burst of overwrites while a node is
down costs one delivery per key. Pure storage: the delivery loop lives in
app.cluster.handoff.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future

from app.clock import Version
from app.storage.base import Record, Store
from app.storage.flusher import SyncStats

SEPARATOR = b"\x00"  # node ids never contain NUL (config refuses control characters)


def _composite(target: str, key: bytes) -> bytes:
    return target.encode() + SEPARATOR + key


class HintStore:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._pending: Counter[str] = Counter()
        for composite, _ in store.iter_range(0, 0):  # start == end: the whole circle
            self._pending[composite.split(SEPARATOR, 1)[0].decode()] += 1

    def add(self, target: str, key: bytes, record: Record) -> None:
        result = self._store.apply(_composite(target, key), record)
        if result.applied and result.previous is None:
            with self._lock:
                self._pending[target] += 1

    def wait_durable(self) -> Future[None] | None:
        """As Store.wait_durable, for the hints' own engine."""
        return self._store.wait_durable()

    def sync_stats(self) -> SyncStats | None:
        return self._store.sync_stats()

    def targets(self) -> list[str]:
        with self._lock:
            return [target for target, count in self._pending.items() if count > 0]

    def pending(self) -> int:
        with self._lock:
            return sum(self._pending.values())

    def for_target(self, target: str, limit: int) -> list[tuple[bytes, Record]]:
        prefix = target.encode() + SEPARATOR
        found: list[tuple[bytes, Record]] = []
        for composite, record in self._iter():
            if composite.startswith(prefix):
                found.append((composite[len(prefix) :], record))
                if len(found) >= limit:
                    break
        if not found:  # expired or swept meanwhile: the count was stale
            with self._lock:
                self._pending[target] = 0
        return found

    def remove(self, target: str, key: bytes, version: Version) -> None:
        """Drop a delivered hint (unless a newer one for the same key arrived)."""
        if self._store.discard(_composite(target, key), version):
            with self._lock:
                self._pending[target] -= 1

    def sweep(self, now_ms: int) -> int:
        return self._store.sweep(now_ms)

    def high_water(self) -> int:
        return self._store.high_water()

    def _iter(self) -> Iterator[tuple[bytes, Record]]:
        return self._store.iter_range(0, 0)

    def close(self) -> None:
        self._store.close()
