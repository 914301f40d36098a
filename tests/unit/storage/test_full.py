"""LMDB at its limit: a full map refuses the write that does not fit, keeps
everything applied before it, reports how full it is, and takes writes again
once reopened with a larger --map-size."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.clock import LOGICAL_BITS, Version
from app.config import MIN_LMDB_MAP_SIZE
from app.errors import StorageFullError
from app.storage import LmdbStore, MemoryStore, Record, RocksDbStore

TINY_MAP = 256 << 10  # 64 pages: fills after a few dozen 4 KiB values
VALUE = b"v" * 4096
GRACE_S = 60.0  # tombstones are not what these tests are about
START_MS = 1_700_000_000_000  # a fixed wall clock: versions are START_MS + at


def put(value: bytes, *, at: int) -> Record:
    return Record(version=Version((START_MS + at) << LOGICAL_BITS, "n1"), value=value)


def _open(path: Path, map_size: int) -> LmdbStore:
    return LmdbStore(
        path=str(path), node_id="n1", fsync="never", fsync_window_ms=5, tombstone_grace_s=GRACE_S, map_size=map_size
    )


def test_a_full_map_refuses_the_write_and_keeps_every_applied_one(tmp_path: Path) -> None:
    store = _open(tmp_path, TINY_MAP)
    applied: list[bytes] = []
    with pytest.raises(StorageFullError, match=r"map .* is full.*--map-size"):
        for i in range(1000):
            key = f"k{i}".encode()
            store.apply(key, put(VALUE, at=i + 1))
            applied.append(key)
    assert 10 < len(applied) < 1000
    usage = store.usage()
    assert usage.limit_bytes == TINY_MAP
    assert usage.used_bytes > TINY_MAP * 0.9
    for key in applied:
        record = store.get(key)
        assert record is not None and record.value == VALUE
    store.close()

    bigger = _open(tmp_path, TINY_MAP * 8)  # the documented fix: a larger --map-size, same data
    assert all(bigger.get(key) is not None for key in applied)
    bigger.apply(b"after", put(VALUE, at=5000))
    assert bigger.usage().limit_bytes == TINY_MAP * 8
    bigger.close()


def test_usage_is_none_for_the_memory_engine_and_grows_with_lmdb_data(tmp_path: Path) -> None:
    assert MemoryStore(tombstone_grace_s=GRACE_S).usage() is None
    store = _open(tmp_path, MIN_LMDB_MAP_SIZE * 1024)
    before = store.usage().used_bytes
    for i in range(50):
        store.apply(f"k{i}".encode(), put(VALUE, at=i + 1))
    assert store.usage().used_bytes >= before + 50 * len(VALUE)
    store.close()


def test_rocksdb_usage_counts_its_files_against_the_volume(tmp_path: Path) -> None:
    """RocksDB has no map: its limit is what it uses plus what the volume has left
    (a full volume is a refused write, StorageFullError: not reproducible without one)."""
    store = RocksDbStore(path=str(tmp_path), node_id="n1", fsync="never", fsync_window_ms=5, tombstone_grace_s=GRACE_S)
    before = store.usage()
    for i in range(50):
        store.apply(f"k{i}".encode(), put(VALUE, at=i + 1))
    after = store.usage()  # the log holds them before any flush
    assert after.used_bytes >= before.used_bytes + 50 * len(VALUE)
    free = os.statvfs(tmp_path)
    assert abs(after.limit_bytes - (after.used_bytes + free.f_bavail * free.f_frsize)) < 64 << 20
    store.close()
