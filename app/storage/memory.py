"""The in-memory engine: a dict behind a lock. For tests and the quick start;
it forgets everything when the process exits. Same contract as the durable
engine (the conformance suite in tests/unit/storage runs both)."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator

from app.clock import Version
from app.config import DIGEST_SUBARCS
from app.ring import in_arc, stable_hash
from app.storage.base import ApplyResult, Record, Store, record_fingerprint
from app.storage.digests import MaintainedDigests, Snapshot


class MemoryStore(Store):
    def __init__(self, *, tombstone_grace_s: float) -> None:
        self._records: dict[bytes, Record] = {}
        self._lock = threading.Lock()
        self._grace_ms = int(tombstone_grace_s * 1000)
        # Stored records with a value, expired-but-unswept ones included: the
        # sweep is what takes them out, as in the durable engine.
        self._live = 0
        self._high_water = 0
        self._digests: MaintainedDigests = MaintainedDigests(
            lock=self._lock, snapshot=self._snapshot, parts=DIGEST_SUBARCS, name="memory"
        )

    def get(self, key: bytes) -> Record | None:
        return self._records.get(key)

    def apply(self, key: bytes, record: Record) -> ApplyResult:
        with self._lock:
            stored = self._records.get(key)
            if stored is not None and stored.version >= record.version:
                return ApplyResult(False, stored)
            self._records[key] = record
            self._high_water = max(self._high_water, record.version.hlc)
            self._live += (record.value is not None) - (stored is not None and stored.value is not None)
            if self._digests.tracking:
                old = 0 if stored is None else record_fingerprint(key, stored)
                self._digests.changed(stable_hash(key), old ^ record_fingerprint(key, record))
            return ApplyResult(True, stored)

    def discard(self, key: bytes, version: Version) -> bool:
        with self._lock:
            record = self._records.get(key)
            if record is None or record.version != version:
                return False  # a newer write arrived since the caller read it: keep it
            del self._records[key]
            self._live -= record.value is not None
            if self._digests.tracking:
                self._digests.changed(stable_hash(key), record_fingerprint(key, record))
            return True

    def live_count(self) -> int:
        return self._live

    def high_water(self) -> int:
        return self._high_water

    def iter_range(self, start: int, end: int) -> Iterator[tuple[bytes, Record]]:
        for key, record in list(self._records.items()):
            if in_arc(stable_hash(key), start, end):
                yield key, record

    def sweep(self, now_ms: int) -> int:
        with self._lock:
            expired = [
                key for key, record in self._records.items() if record.value is not None and record.expired(now_ms)
            ]
            for key in expired:
                record = self._records[key]
                self._records[key] = Record(version=record.version, value=None, expires_at_ms=record.expires_at_ms)
                self._live -= 1
            doomed = [
                key
                for key, record in self._records.items()
                if record.value is None and record.dead_since_ms + self._grace_ms <= now_ms
            ]
            for key in doomed:
                record = self._records.pop(key)
                if self._digests.tracking:  # expiry keeps the version, so only a purge changes a digest
                    self._digests.changed(stable_hash(key), record_fingerprint(key, record))
            return len(expired) + len(doomed)

    def _snapshot(self) -> _MemorySnapshot:
        return _MemorySnapshot(list(self._records.items()))

    def close(self) -> None:
        self._digests.close()
        with self._lock:
            self._records.clear()
            self._live = 0


class _MemorySnapshot(Snapshot):
    """The records as they were under the lock, sorted by hash once, on first use."""

    def __init__(self, items: list[tuple[bytes, Record]]) -> None:
        self._items = items
        self._sorted: list[tuple[int, int]] | None = None
        self._hashes: list[int] = []

    def scan(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        if self._sorted is None:
            self._sorted = sorted((stable_hash(key), record_fingerprint(key, record)) for key, record in self._items)
            self._hashes = [token for token, _ in self._sorted]
        spans = [(start, end)] if start < end else [(start, 1 << 64), (-1, end)]
        for low, high in spans:
            left = bisect.bisect_right(self._hashes, low)
            right = bisect.bisect_right(self._hashes, high)
            yield from self._sorted[left:right]
