"""Storage engines behind one interface (base.Store); open_store picks one.

`memory` forgets on exit (tests, quick start); `lmdb` is the durable engine
(lmdb_store.py). Called by app.cluster.node, off the event loop. Beside the
engines: the maintained digests (digests.py), the hints (hints.py) and the
backup file format (backup_format.py), all pure of any network library."""

from __future__ import annotations

import dataclasses
import os

from app.config import NodeConfig
from app.errors import ConfigError
from app.storage.base import ApplyResult, Record, StorageUsage, Store
from app.storage.hints import HintStore
from app.storage.lmdb_store import LmdbStore, check_format
from app.storage.memory import MemoryStore

__all__ = [
    "ApplyResult",
    "HintStore",
    "LmdbStore",
    "MemoryStore",
    "Record",
    "StorageUsage",
    "Store",
    "check_data_dir",
    "open_hint_store",
    "open_store",
]

HINTS_SUBDIR = "hints"  # hints live in their own engine beside the data, never mixed with replica records


def open_store(config: NodeConfig) -> Store:
    """The engine the config names, opened and ready."""
    if config.storage == "memory":
        return MemoryStore(tombstone_grace_s=config.tombstone_grace)
    if config.storage == "lmdb":
        if not config.data_dir:
            raise ConfigError("config: --storage lmdb needs --data-dir")
        return LmdbStore(
            path=config.data_dir,
            node_id=config.node_id,
            fsync=config.fsync,
            fsync_window_ms=config.fsync_window_ms,
            tombstone_grace_s=config.tombstone_grace,
            map_size=config.map_size,
        )
    raise NotImplementedError(f"storage engine {config.storage!r} is not built yet")


def open_hint_store(config: NodeConfig) -> HintStore:
    """The hint store, on the same engine as the data, in its own directory."""
    if config.data_dir is None:
        return HintStore(open_store(config))
    return HintStore(open_store(dataclasses.replace(config, data_dir=os.path.join(config.data_dir, HINTS_SUBDIR))))


def check_data_dir(config: NodeConfig) -> None:
    """Refuse to start, in one line, when the data dir cannot be written by
    this process (the usual cause in Kubernetes is a volume owned by root that
    the pod's non-root user cannot write: no fsGroup), or holds a store of an
    on-disk format this build cannot read (a newer release's). Called by the
    composition root before the server starts, so the failure is not a
    lifespan traceback."""
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
    if config.storage == "lmdb":  # a store of a format this build cannot read: refused before serving
        check_format(config.data_dir)
        check_format(os.path.join(config.data_dir, HINTS_SUBDIR))
