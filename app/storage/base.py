"""The storage interface every engine implements, and the Record it stores.

A record is a versioned value or a tombstone (value None), with an optional
absolute expiry. Engines keep at most one record per key and apply writes
last-writer-wins by Version; they never decide what absence means (the
coordinator does). Expiry is a version too: an expired record is a tombstone
at its version, so an older live value on another replica never wins over it;
the sweep turns it into one and purges it with the tombstones, after the
grace. Pure: imports no web, network or asyncio code.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.clock import Version

if TYPE_CHECKING:
    from app.storage.digests import MaintainedDigests
    from app.storage.flusher import SyncStats

DIGEST_BYTES = 16  # 128 bits: two differing arcs collide with odds no anti-entropy run will meet


@dataclass(frozen=True, slots=True)
class Record:
    version: Version
    value: bytes | None  # None: a tombstone, the trace a delete leaves
    expires_at_ms: int = 0  # 0: never; else wall-clock ms after which the record is gone

    @property
    def is_tombstone(self) -> bool:
        return self.value is None

    def expired(self, now_ms: int) -> bool:
        return 0 < self.expires_at_ms <= now_ms

    def live(self, now_ms: int) -> bool:
        """True when a read should see this record's value."""
        return self.value is not None and not self.expired(now_ms)

    @property
    def dead_since_ms(self) -> int:
        """When a dead record stopped being live: its expiry, or (a delete) its
        version's time. The tombstone grace counts from here."""
        return self.expires_at_ms or self.version.physical_ms


@dataclass(frozen=True, slots=True)
class ApplyResult:
    applied: bool  # the record is now the stored one (it was newer)
    previous: Record | None  # what was stored before, if anything


@dataclass(frozen=True, slots=True)
class StorageUsage:
    """How full an engine is: bytes it uses, and bytes it may use before
    writes are refused (the smaller of its map and what its volume has left)."""

    used_bytes: int
    limit_bytes: int


class Store(abc.ABC):
    """One node's local records. Thread-safe; calls may block briefly."""

    @abc.abstractmethod
    def get(self, key: bytes) -> Record | None:
        """The stored record, dead or alive (tombstones and expired records
        included: callers judge liveness); None once purged or never written."""

    @abc.abstractmethod
    def apply(self, key: bytes, record: Record) -> ApplyResult:
        """Store `record` if its version is newer than the stored one's (last
        writer wins), whether either has expired or not."""

    def apply_many(self, writes: list[tuple[bytes, Record]]) -> list[ApplyResult]:
        """apply() each write in order; an engine with transactions does them
        in one (one commit for many writes). One result per write."""
        return [self.apply(key, record) for key, record in writes]

    def discard(self, key: bytes, version: Version) -> bool:
        """Physically remove key if its stored record has exactly this version
        (a newer write in between survives). For records handed off to their
        new owners, and delivered hints. True if something was removed."""
        raise NotImplementedError(f"{type(self).__name__} cannot discard records")

    def discard_many(self, items: list[tuple[bytes, Version]]) -> int:
        """discard() each (key, exact version); an engine with transactions
        does them in one. How many were removed."""
        return sum(self.discard(key, version) for key, version in items)

    @abc.abstractmethod
    def live_count(self) -> int:
        """Keys with a live value (an estimate is fine between sweeps)."""

    @abc.abstractmethod
    def iter_range(self, start: int, end: int) -> Iterator[tuple[bytes, Record]]:
        """Records whose key hash h lies in the ring arc (start, end], dead ones included."""

    @abc.abstractmethod
    def sweep(self, now_ms: int) -> int:
        """Turn expired records into tombstones at their version (dropping the
        value), and purge tombstones dead for longer than the grace; return
        how many records were turned or purged."""

    @abc.abstractmethod
    def high_water(self) -> int:
        """An hlc at or above every version ever applied here (0: none), at
        most a fraction of a second above the largest. Durable engines keep it
        across restarts, so the node's clock can start above every version it
        holds without reading them."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush and release the engine; further calls are errors."""

    # Set by engines that keep their digests current (app.storage.digests);
    # None: every digest is computed by reading the arc.
    _digests: MaintainedDigests | None = None

    def digest(self, start: int, end: int) -> bytes:
        """A fingerprint of the (key, version) pairs in the arc (start, end].

        The XOR of one hash per record, so it depends on which records are
        there and never on the order they were written in; it changes when any
        record's version does. Every engine gives the same digest for the same
        records, so replicas on different engines compare equal. Dead records
        count like live ones: replicas holding the same versions agree whether
        or not their sweeps have run. Answered from the maintained index when
        it is built (only the ends of an arc not cut at its boundaries are read).
        """
        index = self._digests.index() if self._digests is not None else None
        if index is None:
            return self.scan_digest(start, end).to_bytes(DIGEST_BYTES, "big")
        acc, edges = index.range_digest(start, end)
        for edge_start, edge_end in edges:
            acc ^= self.scan_digest(edge_start, edge_end)
        return acc.to_bytes(DIGEST_BYTES, "big")

    def scan_digest(self, start: int, end: int) -> int:
        """The digest of the arc, computed by reading its records."""
        acc = 0
        for key, record in self.iter_range(start, end):
            acc ^= record_fingerprint(key, record)
        return acc

    def align_digests(self, arcs: list[tuple[int, int]]) -> None:
        """Keep the digests of these ring arcs and of their sub-arcs
        (config.DIGEST_SUBARCS) ready to answer without reading; the engine
        builds or re-cuts its index in a thread. A no-op for an engine without one."""
        if self._digests is not None:
            self._digests.align(arcs)

    def wait_digests(self, timeout: float | None = None) -> bool:
        """Block until the index is cut at the arcs of the last align_digests
        call; True if it then answers (False for an engine without one)."""
        return self._digests is not None and self._digests.wait_aligned(timeout)

    def digests_ready(self) -> bool:
        """Whether digests are answered from the maintained index (built)."""
        return self._digests is not None and self._digests.ready()

    def digest_generation(self) -> int | None:
        """A number that changes whenever any digest may have (a write, a
        re-cut); None when digests are not maintained (nothing may be cached).
        Read it before computing a digest to cache: a change racing the
        computation then invalidates it."""
        if self._digests is None or not self._digests.ready():
            return None
        return self._digests.generation

    def usage(self) -> StorageUsage | None:
        """How full the engine is; None for an engine with no limit of its own (memory)."""
        return None

    def sync(self) -> None:  # noqa: B027 - engines without a write-back buffer need nothing
        """Make every applied write durable now (blocking)."""

    def wait_durable(self) -> Future[None] | None:
        """How a caller waits until every write applied so far is on disk.

        None: nothing to wait for under this engine's durability policy (memory,
        or fsync batch/never, where acknowledging precedes the flush). Else a
        future that completes after the next group commit, so many concurrent
        writers share one fsync (--fsync always). The coordinator awaits it
        before acknowledging; the engine never blocks the event loop on disk.
        Whether it answers None is fixed for the store's life (its policy):
        app.coalesce.DurableWaits stops asking after the first None.
        """
        return None

    def sync_stats(self) -> SyncStats | None:
        """What the store's fsyncs did so far (for app.metrics); None for an
        engine that never syncs (memory)."""
        return None


def record_fingerprint(key: bytes, record: Record) -> int:
    return fingerprint(key, record.version.hlc, record.version.node.encode())


def fingerprint(key: bytes, hlc: int, node: bytes) -> int:
    """One record's share of a digest. The key is length-prefixed so that
    (key, node) boundaries cannot shift and collide."""
    material = len(key).to_bytes(4, "big") + key + hlc.to_bytes(8, "big") + node
    return int.from_bytes(hashlib.blake2b(material, digest_size=DIGEST_BYTES).digest(), "big")
