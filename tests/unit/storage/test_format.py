"""The LMDB store's on-disk format version: a new store records it and the
release; a store of an older release opens (and is migrated when the format
moved); a store of a newer format is refused, before the node serves and at
open, with nothing in it changed."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from app import __version__
from app.errors import StorageError
from app.storage import LmdbStore, check_data_dir
from app.storage import lmdb_store as lmdb_module
from tests.unit.nodes import single_node_config
from tests.unit.storage.fakes import START_MS, put


def open_store(path: Path) -> LmdbStore:
    return LmdbStore(path=str(path), node_id="n1", fsync="never", fsync_window_ms=5, tombstone_grace_s=60)


def meta(path: Path) -> dict[bytes, bytes]:
    env = lmdb.open(str(path), max_dbs=4, readonly=True, lock=False)
    try:
        db = env.open_db(b"meta", create=False)
        with env.begin(db=db) as txn:
            return {key: value for key, value in txn.cursor() if key in (b"node_id", b"format", b"release")}
    finally:
        env.close()


def set_meta(path: Path, **fields: bytes | None) -> None:
    """Rewrite meta fields as another release would have left them (None: absent)."""
    env = lmdb.open(str(path), max_dbs=4)
    try:
        db = env.open_db(b"meta")
        with env.begin(write=True, db=db) as txn:
            for name, value in fields.items():
                if value is None:
                    txn.delete(name.encode())
                else:
                    txn.put(name.encode(), value)
    finally:
        env.close()


def fingerprint(path: Path) -> str:
    return hashlib.sha256((path / "data.mdb").read_bytes()).hexdigest()


@pytest.fixture
def store_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "data"
    store = open_store(path)
    store.apply(b"k", put(b"v", at=START_MS))
    store.close()
    yield path


def test_a_new_store_records_its_format_and_release(store_dir: Path) -> None:
    assert meta(store_dir) == {b"node_id": b"n1", b"format": b"1", b"release": __version__.encode()}


def test_a_store_of_0_1_0_opens_and_keeps_its_format(store_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    set_meta(store_dir, release=None)  # as 0.1.0 left it: format b"1", no release
    with caplog.at_level(logging.WARNING, logger="app.storage.lmdb_store"):
        store = open_store(store_dir)
    try:
        assert store.get(b"k") is not None
    finally:
        store.close()
    assert "last opened by kvstore 0.1.0" in caplog.text
    # Still format 1, which 0.1.0 checks for exactly: a rollback can open it.
    assert meta(store_dir)[b"format"] == b"1"
    assert meta(store_dir)[b"release"] == __version__.encode()


def test_a_store_of_a_newer_format_is_refused_and_left_unchanged(store_dir: Path) -> None:
    set_meta(store_dir, format=b"2", release=b"0.3.0")
    before = fingerprint(store_dir)
    config = single_node_config(data_dir=str(store_dir), storage="lmdb")
    with pytest.raises(StorageError, match=r"on-disk format 2, written by kvstore 0.3.0; .* reads formats 1 to 1: "):
        check_data_dir(config)  # at start, before the node serves
    with pytest.raises(StorageError, match="nothing in it was changed"):
        open_store(store_dir)  # and at open
    assert fingerprint(store_dir) == before
    assert meta(store_dir) == {b"node_id": b"n1", b"format": b"2", b"release": b"0.3.0"}


def test_a_store_without_a_readable_format_is_refused(store_dir: Path) -> None:
    set_meta(store_dir, format=b"x1")
    with pytest.raises(StorageError, match="no on-disk format this build knows"):
        open_store(store_dir)


def test_an_older_format_is_migrated_and_the_log_says_so(
    store_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build whose FORMAT moved to 2 opens a format-1 store through its migration."""
    migrated: list[int] = []
    monkeypatch.setattr(lmdb_module, "FORMAT", 2)
    monkeypatch.setattr(lmdb_module, "MIGRATIONS", {1: lambda txn: migrated.append(1)})
    with caplog.at_level(logging.WARNING, logger="app.storage.lmdb_store"):
        store = open_store(store_dir)
    try:
        assert store.get(b"k") is not None
    finally:
        store.close()
    assert migrated == [1]
    assert "migrating" in caplog.text and "from on-disk format 1 to 2" in caplog.text
    assert meta(store_dir)[b"format"] == b"2"
    monkeypatch.setattr(lmdb_module, "FORMAT", 1)  # the release before it refuses the migrated store
    with pytest.raises(StorageError, match="on-disk format 2"):
        open_store(store_dir)


def test_a_fresh_data_dir_passes_the_start_check(tmp_path: Path) -> None:
    check_data_dir(single_node_config(data_dir=str(tmp_path / "new"), storage="lmdb"))
