"""Storage engines behind one interface (base.Store); open_store picks one.

`memory` forgets on exit (tests, quick start); `lmdb` (lmdb_store.py) and
`rocksdb` (rocksdb_store.py) are the durable engines, sharing their on-disk
record encoding (durable.py). A data dir is only ever opened by the engine
that wrote it (resolve_engine). Called by app.cluster.node, off the event
loop. Beside the engines: the maintained digests (digests.py), the hints
(hints.py) and the backup file format (backup_format.py), all pure of any
network library."""

from __future__ import annotations

import dataclasses
import os

from app.config import Engine, NodeConfig
from app.errors import ConfigError
from app.storage import lmdb_store, rocksdb_store
from app.storage.base import ApplyResult, Record, StorageUsage, Store
from app.storage.hints import HintStore
from app.storage.lmdb_store import LmdbStore
from app.storage.memory import MemoryStore
from app.storage.rocksdb_store import RocksDbStore

__all__ = [
    "ApplyResult",
    "HintStore",
    "LmdbStore",
    "MemoryStore",
    "Record",
    "RocksDbStore",
    "StorageUsage",
    "Store",
    "check_data_dir",
    "engine_in",
    "open_hint_store",
    "open_store",
    "resolve_engine",
]

HINTS_SUBDIR = "hints"  # hints live in their own engine beside the data, never mixed with replica records
LMDB_MARKER = "data.mdb"  # LMDB's data file; RocksDB's is rocksdb_store.MARKER


def engine_in(path: str) -> Engine | None:
    """The durable engine whose files are in `path`, or None (no store yet)."""
    found = [
        engine
        for engine, marker in ((Engine.LMDB, LMDB_MARKER), (Engine.ROCKSDB, rocksdb_store.MARKER))
        if os.path.exists(os.path.join(path, marker))
    ]
    if len(found) > 1:
        raise ConfigError(
            f"config: data dir {path} holds both LMDB ({LMDB_MARKER}) and RocksDB ({rocksdb_store.MARKER}) files; "
            "it is damaged or was shared by mistake: give the node a dir of its own"
        )
    return found[0] if found else None


def resolve_engine(config: NodeConfig) -> NodeConfig:
    """The config with the engine its data dir holds. Without --storage, an
    existing store opens with the engine that wrote it (a new dir: lmdb); with
    --storage naming another engine, the start is refused: one engine's files
    are never opened, let alone converted, by the other."""
    if config.storage == Engine.MEMORY or config.data_dir is None:
        return config
    found = engine_in(config.data_dir)
    if found is None or found == config.storage:
        return config
    if config.storage_chosen:
        raise ConfigError(
            f"config: data dir {config.data_dir} holds a {found} store, not {config.storage}: start the node with "
            f"--storage {found} (or without --storage), or give --storage {config.storage} an empty --data-dir"
        )
    return dataclasses.replace(config, storage=found)


def open_store(config: NodeConfig) -> Store:
    """The engine the config names (or its data dir holds), opened and ready."""
    if config.storage == Engine.MEMORY:
        return MemoryStore(tombstone_grace_s=config.tombstone_grace)
    if not config.data_dir:
        raise ConfigError(f"config: --storage {config.storage} needs --data-dir")
    config = resolve_engine(config)
    assert config.data_dir is not None
    if config.storage == Engine.LMDB:
        return LmdbStore(
            path=config.data_dir,
            node_id=config.node_id,
            fsync=config.fsync,
            fsync_window_ms=config.fsync_window_ms,
            tombstone_grace_s=config.tombstone_grace,
            map_size=config.map_size,
        )
    if config.storage == Engine.ROCKSDB:
        return RocksDbStore(
            path=config.data_dir,
            node_id=config.node_id,
            fsync=config.fsync,
            fsync_window_ms=config.fsync_window_ms,
            tombstone_grace_s=config.tombstone_grace,
        )
    raise NotImplementedError(f"storage engine {config.storage!r} is not built yet")


def open_hint_store(config: NodeConfig) -> HintStore:
    """The hint store, on the same engine as the data, in its own directory."""
    if config.data_dir is None:
        return HintStore(open_store(config))
    config = resolve_engine(config)  # the data's engine: the hints dir must hold the same
    assert config.data_dir is not None
    hints = dataclasses.replace(config, data_dir=os.path.join(config.data_dir, HINTS_SUBDIR), storage_chosen=True)
    return HintStore(open_store(hints))


def check_data_dir(config: NodeConfig) -> None:
    """Refuse to start, in one line, when the data dir cannot be written by
    this process (the usual cause in Kubernetes is a volume owned by root that
    the pod's non-root user cannot write: no fsGroup), holds another engine's
    store than --storage names, or holds a store of an on-disk format this
    build cannot read (a newer release's). Called by the composition root
    before the server starts, so the failure is not a lifespan traceback."""
    if config.data_dir is None:
        return
    probe = os.path.join(config.data_dir, f".kvstore-write-check-{os.getpid()}")
    try:
        os.makedirs(config.data_dir, exist_ok=True)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(
            f"config: data dir {config.data_dir} (--data-dir, KVSTORE_DATA_DIR) is not writable by uid {os.getuid()} "
            f"gid {os.getgid()} ({exc.strerror}): give the pod securityContext.fsGroup {os.getgid()} "
            "(chart: podSecurityContext.fsGroup), or make the volume owned by that uid"
        ) from exc
    config = resolve_engine(config)
    hints_dir = os.path.join(config.data_dir or "", HINTS_SUBDIR)
    resolve_engine(dataclasses.replace(config, data_dir=hints_dir, storage_chosen=True))
    # A store of a format this build cannot read: refused before serving.
    checks = {Engine.LMDB: lmdb_store.check_format, Engine.ROCKSDB: rocksdb_store.check_format}
    check_format = checks.get(config.storage)
    if check_format is not None:
        check_format(config.data_dir or "")
        check_format(hints_dir)
