"""Fixtures for the storage conformance suite: every engine, one fake clock.

`make_store` opens an engine (memory, or LMDB in tmp_path). Engines judge no
time themselves: the sweep is handed the time, from a clock the test moves by
hand, so TTL and tombstone grace are tested without sleeping. Every store
opened is closed at teardown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app.clock import LOGICAL_BITS, Version
from app.storage import LmdbStore, MemoryStore, Record, Store

ENGINES = ("memory", "lmdb")
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


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_store(engine: str, tmp_path: Path) -> Iterator[StoreFactory]:
    """Open a store of the parametrized engine. LMDB keyword overrides
    (node_id, fsync, path) let a test reopen or re-own the same directory."""
    opened: list[Store] = []

    def factory(
        *,
        grace_s: float = GRACE_S,
        node_id: str = "n1",
        fsync: str = "never",
        path: Path | None = None,
    ) -> Store:
        store: Store
        if engine == "memory":
            store = MemoryStore(tombstone_grace_s=grace_s)
        else:
            store = LmdbStore(
                path=str(path or tmp_path / "data"),
                node_id=node_id,
                fsync=fsync,
                fsync_window_ms=5,
                tombstone_grace_s=grace_s,
            )
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


@pytest.fixture
def store(make_store: StoreFactory) -> Store:
    return make_store()
