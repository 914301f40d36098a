"""Fixtures for the storage conformance suite: every engine, one fake clock
(the clock and the record builders live in fakes.py).

`make_store` opens an engine (memory, or LMDB or RocksDB in tmp_path). Engines judge no
time themselves: the sweep is handed the time, from a clock the test moves by
hand, so TTL and tombstone grace are tested without sleeping. Every store
opened is closed at teardown.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.storage import LmdbStore, MemoryStore, RocksDbStore, Store
from tests.unit.storage.fakes import ENGINES, GRACE_S, FakeClock, StoreFactory


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_store(engine: str, tmp_path: Path) -> Iterator[StoreFactory]:
    """Open a store of the parametrized engine. Durable-engine keyword overrides
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
            durable = {"lmdb": LmdbStore, "rocksdb": RocksDbStore}[engine]
            store = durable(
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
