"""Storage engines behind one interface (base.Store); open_store picks one."""

from __future__ import annotations

from app.config import NodeConfig
from app.storage.base import ApplyResult, Record, Store, in_arc
from app.storage.memory import MemoryStore

__all__ = ["ApplyResult", "MemoryStore", "Record", "Store", "in_arc", "open_store"]


def open_store(config: NodeConfig) -> Store:
    """The engine the config names, opened and ready."""
    if config.storage == "memory":
        return MemoryStore(tombstone_grace_s=config.tombstone_grace)
    raise NotImplementedError(f"storage engine {config.storage!r} is not built yet")
