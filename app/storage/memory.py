"""The in-memory engine: a dict behind a lock. For tests and the quick start;
it forgets everything when the process exits. Same contract as the durable
engine (the conformance suite in tests/unit/storage runs both)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from app.clock import Version, wall_ms
from app.ring import stable_hash
from app.storage.base import ApplyResult, Record, Store, in_arc


class MemoryStore(Store):
    def __init__(self, *, tombstone_grace_s: float, clock: Callable[[], int] = wall_ms) -> None:
        self._records: dict[bytes, Record] = {}
        self._lock = threading.Lock()
        self._grace_ms = int(tombstone_grace_s * 1000)
        self._clock = clock  # wall ms; tests inject one to expire records without sleeping
        # Stored records with a value, expired-but-unswept ones included: the
        # sweep is what takes them out, as in the durable engine.
        self._live = 0

    def get(self, key: bytes) -> Record | None:
        record = self._records.get(key)
        if record is not None and record.expired(self._clock()):
            return None
        return record

    def apply(self, key: bytes, record: Record) -> ApplyResult:
        now = self._clock()
        with self._lock:
            stored = self._records.get(key)
            previous = None if stored is None or stored.expired(now) else stored
            if record.expired(now) or (previous is not None and previous.version >= record.version):
                return ApplyResult(applied=False, previous=previous)
            self._records[key] = record
            # Count against what was stored, not what a read saw: replacing an
            # expired value removes it from the count just as a sweep would.
            self._live += (record.value is not None) - (stored is not None and stored.value is not None)
            return ApplyResult(applied=True, previous=previous)

    def discard(self, key: bytes, version: Version) -> bool:
        with self._lock:
            record = self._records.get(key)
            if record is None or record.version != version:
                return False  # a newer write arrived since the caller read it: keep it
            del self._records[key]
            self._live -= record.value is not None
            return True

    def live_count(self) -> int:
        return self._live

    def iter_range(self, start: int, end: int) -> Iterator[tuple[bytes, Record]]:
        now = self._clock()
        for key, record in list(self._records.items()):
            if not record.expired(now) and in_arc(stable_hash(key), start, end):
                yield key, record

    def sweep(self, now_ms: int) -> int:
        with self._lock:
            doomed = [
                key
                for key, record in self._records.items()
                if record.expired(now_ms)
                or (record.value is None and record.version.wall_ms + self._grace_ms <= now_ms)
            ]
            for key in doomed:
                record = self._records.pop(key)
                if record.value is not None:
                    self._live -= 1
            return len(doomed)

    def close(self) -> None:
        with self._lock:
            self._records.clear()
            self._live = 0
