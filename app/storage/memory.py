"""The in-memory engine: a dict behind a lock. For tests and the quick start;
it forgets everything when the process exits."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from app.clock import wall_ms
from app.ring import stable_hash
from app.storage.base import ApplyResult, Record, Store, in_arc


class MemoryStore(Store):
    def __init__(self, *, tombstone_grace_s: float) -> None:
        self._records: dict[bytes, Record] = {}
        self._lock = threading.Lock()
        self._grace_ms = int(tombstone_grace_s * 1000)
        self._live = 0

    def get(self, key: bytes) -> Record | None:
        record = self._records.get(key)
        if record is not None and record.expired(wall_ms()):
            return None
        return record

    def apply(self, key: bytes, record: Record) -> ApplyResult:
        now = wall_ms()
        with self._lock:
            previous = self._records.get(key)
            if previous is not None and previous.expired(now):
                previous = None
            if record.expired(now) or (previous is not None and previous.version >= record.version):
                return ApplyResult(applied=False, previous=previous)
            self._records[key] = record
            self._live += (record.value is not None) - (previous is not None and previous.value is not None)
            return ApplyResult(applied=True, previous=previous)

    def live_count(self) -> int:
        return self._live

    def iter_range(self, start: int, end: int) -> Iterator[tuple[bytes, Record]]:
        now = wall_ms()
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
