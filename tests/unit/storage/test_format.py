"""The durable stores' on-disk format version (LMDB and RocksDB, each its own
number line): a new store records it and the release; a store of an older
release opens (and is migrated when the format moved); a store of a newer
format is refused, before the node serves and at open, with nothing in it changed."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest
import rocksdict

from app import __version__
from app.errors import StorageError
from app.storage import LmdbStore, RocksDbStore, Store, check_data_dir
from app.storage import lmdb_store as lmdb_module
from app.storage import rocksdb_store as rocksdb_module
from tests.unit.nodes import single_node_config
from tests.unit.storage.fakes import DURABLE_ENGINES, START_MS, put

META_FIELDS = (b"node_id", b"format", b"release")
MODULES = {"lmdb": lmdb_module, "rocksdb": rocksdb_module}


@pytest.fixture(params=DURABLE_ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _rocks(path: Path, *, read_only: bool) -> rocksdict.Rdict:
    families = {cf: rocksdict.Options(raw_mode=True) for cf in ("expiry", "tombstones", "meta")}
    access = rocksdict.AccessType.read_only(False) if read_only else rocksdict.AccessType.read_write()
    return rocksdict.Rdict(str(path), rocksdict.Options(raw_mode=True), column_families=families, access_type=access)


class Dir:
    """A data dir of one engine, read and rewritten with that engine's own library."""

    def __init__(self, engine: str, path: Path) -> None:
        self.engine, self.path = engine, path

    def open(self) -> Store:
        kind = LmdbStore if self.engine == "lmdb" else RocksDbStore
        return kind(path=str(self.path), node_id="n1", fsync="never", fsync_window_ms=5, tombstone_grace_s=60)

    def meta(self) -> dict[bytes, bytes]:
        if self.engine == "lmdb":
            env = lmdb.open(str(self.path), max_dbs=4, readonly=True, lock=False)
            try:
                db = env.open_db(b"meta", create=False)
                with env.begin(db=db) as txn:
                    return {key: value for key, value in txn.cursor() if key in META_FIELDS}
            finally:
                env.close()
        rocks = _rocks(self.path, read_only=True)
        meta = rocks.get_column_family("meta")
        found = {name: meta.get(name) for name in META_FIELDS}
        del meta
        rocks.close()
        return {name: value for name, value in found.items() if value is not None}

    def set_meta(self, **fields: bytes | None) -> None:
        """Rewrite meta fields as another release would have left them (None: absent)."""
        if self.engine == "lmdb":
            env = lmdb.open(str(self.path), max_dbs=4)
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
            return
        rocks = _rocks(self.path, read_only=False)
        meta = rocks.get_column_family("meta")
        for name, value in fields.items():
            if value is None:
                meta.delete(name.encode())
            else:
                meta.put(name.encode(), value)
        del meta
        rocks.flush(True)
        rocks.close()

    def fingerprint(self) -> str:
        """LMDB: its data file. RocksDB: its table, manifest and log files (its info LOG aside)."""
        names = (
            ["data.mdb"]
            if self.engine == "lmdb"
            else sorted(p.name for p in self.path.iterdir() if p.is_file() and not p.name.startswith("LOG"))
        )
        digest = hashlib.sha256()
        for name in names:
            digest.update(name.encode() + (self.path / name).read_bytes())
        return digest.hexdigest()


@pytest.fixture
def data(tmp_path: Path, engine: str) -> Iterator[Dir]:
    store_dir = Dir(engine, tmp_path / "data")
    store = store_dir.open()
    store.apply(b"k", put(b"v", at=START_MS))
    store.close()
    yield store_dir


def test_a_new_store_records_its_format_and_release(data: Dir) -> None:
    assert data.meta() == {b"node_id": b"n1", b"format": b"1", b"release": __version__.encode()}


def test_a_store_of_0_1_0_opens_and_keeps_its_format(data: Dir, engine: str, caplog: pytest.LogCaptureFixture) -> None:
    data.set_meta(release=None)  # as 0.1.0 left it: format b"1", no release (0.1.0 had no RocksDB: as if it had)
    with caplog.at_level(logging.WARNING, logger=MODULES[engine].__name__):
        store = data.open()
    try:
        assert store.get(b"k") is not None
    finally:
        store.close()
    assert "last opened by kvstore" in caplog.text
    # Still format 1, which 0.1.0 checks for exactly: a rollback can open it.
    assert data.meta()[b"format"] == b"1"
    assert data.meta()[b"release"] == __version__.encode()


def test_a_store_of_a_newer_format_is_refused_and_left_unchanged(data: Dir, engine: str) -> None:
    data.set_meta(format=b"2", release=b"0.3.0")
    before = data.fingerprint()
    config = single_node_config(data_dir=str(data.path), storage=engine)
    with pytest.raises(StorageError, match=r"on-disk format 2, written by kvstore 0.3.0; .* reads formats 1 to 1: "):
        check_data_dir(config)  # at start, before the node serves
    with pytest.raises(StorageError, match="nothing in it was changed"):
        data.open()  # and at open
    assert data.fingerprint() == before
    assert data.meta() == {b"node_id": b"n1", b"format": b"2", b"release": b"0.3.0"}


def test_a_store_without_a_readable_format_is_refused(data: Dir) -> None:
    data.set_meta(format=b"x1")
    with pytest.raises(StorageError, match="no on-disk format this build knows"):
        data.open()


def test_an_older_format_is_migrated_and_the_log_says_so(
    data: Dir, engine: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build whose FORMAT moved to 2 opens a format-1 store through its migration."""
    migrated: list[int] = []
    module = MODULES[engine]
    monkeypatch.setattr(module, "FORMAT", 2)
    monkeypatch.setattr(module, "MIGRATIONS", {1: lambda *_: migrated.append(1)})
    with caplog.at_level(logging.WARNING, logger=module.__name__):
        store = data.open()
    try:
        assert store.get(b"k") is not None
    finally:
        store.close()
    assert migrated == [1]
    assert "migrating" in caplog.text and "from on-disk format 1 to 2" in caplog.text
    assert data.meta()[b"format"] == b"2"
    monkeypatch.setattr(module, "FORMAT", 1)  # the release before it refuses the migrated store
    with pytest.raises(StorageError, match="on-disk format 2"):
        data.open()


def test_a_fresh_data_dir_passes_the_start_check(tmp_path: Path, engine: str) -> None:
    check_data_dir(single_node_config(data_dir=str(tmp_path / "new"), storage=engine))
