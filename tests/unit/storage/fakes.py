"""What the storage tests build by hand: a wall clock that moves only when told
(`FakeClock`), versions at a given wall time, put and tombstone records, and
the suite's constants. Used by conftest.py's fixtures and the storage tests."""

from __future__ import annotations

from collections.abc import Callable

from app.clock import LOGICAL_BITS, Version
from app.storage import Record, Store

ENGINES = ("memory", "lmdb", "rocksdb")
DURABLE_ENGINES = ("lmdb", "rocksdb")
START_MS = 1_700_000_000_000  # a plausible wall clock, far from zero
GRACE_S = 60.0  # tombstone grace used by the suite, in seconds


class FakeClock:
    """Wall-clock milliseconds that move only when a test says so."""

    def __init__(self, now_ms: int = START_MS) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, ms: int) -> None:
        self.now_ms += ms


def version(wall_ms: int, *, logical: int = 0, node: str = "n1") -> Version:
    return Version((wall_ms << LOGICAL_BITS) | logical, node)


def put(value: bytes, *, at: int, expires_at_ms: int = 0, node: str = "n1") -> Record:
    return Record(version=version(at, node=node), value=value, expires_at_ms=expires_at_ms)


def tombstone(*, at: int, node: str = "n1") -> Record:
    return Record(version=version(at, node=node), value=None)


StoreFactory = Callable[..., Store]
