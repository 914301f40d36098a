"""What the durable engines share (app.storage.lmdb_store, app.storage.rocksdb_store):
the on-disk record encoding, the data-key layout that makes a ring arc one
key range, the on-disk format check and the owner check at open, the lock that
keeps a data dir to one process, and the base class both engines build on
(durability through the Flusher, an arc's records and digest over the
engine's raw scan). One copy, so the engines' files hold byte-identical records and a
record moves between them (backup, hand-off) without re-encoding rules of its own.
Pure: no engine library, no asyncio.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Iterator
from concurrent.futures import Future
from typing import TextIO

from app import __version__
from app.clock import Version
from app.errors import NodeIdMismatchError, StorageError
from app.ring import HASH_SPACE, stable_hash
from app.storage.base import Record, Store, fingerprint
from app.storage.digests import DigestIndex
from app.storage.flusher import Flusher, SyncStats

U64 = struct.Struct(">Q")  # big-endian, so byte order is numeric order in either engine's memcmp
# hlc, expires_at_ms, flags, len(node id); then the node id, then the value.
HEADER = struct.Struct(">QQBH")
TOMBSTONE = 0x01
MAX_HASH = HASH_SPACE - 1

LOCK_FILE = "kvstore.lock"  # beside the engine's own files; holds the owning pid

# Meta keys, the same in both engines' meta (an LMDB sub-database, a RocksDB column family).
META_NODE_ID = b"node_id"
META_FORMAT = b"format"
META_RELEASE = b"release"  # the release that last opened the store (0.1.0 wrote none, and ignores it)
META_HIGH_WATER = b"high_water"  # u64: an hlc at or above every version ever applied
# The digest index as of a clean close, with the id of the transaction (LMDB)
# or the sequence number (RocksDB) that wrote it: valid only while that is
# still the last write (any later write, even by a build that does not know
# the key, makes it stale).
META_DIGESTS = b"digest_index"
# How far the stored ceiling runs ahead of the newest version: a commit that
# passes it writes one more meta record (measured on LMDB's PUT path when every
# commit did), and a restarted node's clock may start up to this far ahead of
# its last write, well inside the default 500 ms --max-clock-offset.
HIGH_WATER_STEP_MS = 100


def encode_record(record: Record) -> bytes:
    node = record.version.node.encode()
    flags = TOMBSTONE if record.value is None else 0
    header = HEADER.pack(record.version.hlc, record.expires_at_ms, flags, len(node))
    return header + node + (record.value or b"")


def decode_record(raw: bytes) -> Record:
    hlc, expires_at, flags, node_len = HEADER.unpack_from(raw)
    body = HEADER.size + node_len
    node = raw[HEADER.size : body].decode()
    value = None if flags & TOMBSTONE else raw[body:]
    return Record(Version(hlc, node), value, expires_at)  # positional: keywords cost ~0.3 us per read


def data_key_of(key: bytes) -> bytes:
    """The stored key: 8-byte big-endian ring hash, then the key (one arc is one key range)."""
    return U64.pack(stable_hash(key)) + key


def arc_spans(start: int, end: int) -> list[tuple[bytes, bytes]]:
    """The arc (start, end] as inclusive [low, high] hash spans (8-byte keys).
    A wrapping arc (start >= end; equal means the whole circle) is two spans."""
    if start < end:
        return [(U64.pack(start + 1), U64.pack(end))]
    spans = [(U64.pack(start + 1), U64.pack(MAX_HASH))] if start < MAX_HASH else []
    return [*spans, (U64.pack(0), U64.pack(end))]


def format_number(layout: bytes | None) -> int | None:
    return int(layout) if layout is not None and layout.isdigit() else None


def format_problem(path: str, layout: bytes | None, written_by: str | None, *, newest: int) -> str | None:
    """Why this build, which reads formats 1 to `newest`, cannot open a store of this format, or None."""
    by = f"kvstore {written_by}" if written_by else "kvstore 0.1.0 or a release that records none"
    number = format_number(layout)
    if number is None or number < 1:
        return (
            f"storage: data dir {path} has no on-disk format this build knows ({layout!r}); it is not a kvstore "
            "data dir, or a damaged one: nothing in it was changed"
        )
    if number > newest:
        return (
            f"storage: data dir {path} has on-disk format {number}, written by {by}; this build (kvstore "
            f"{__version__}) reads formats 1 to {newest}: run {by.removeprefix('kvstore ')} or newer on it "
            "(a finalised upgrade cannot be rolled back); nothing in it was changed"
        )
    return None


def written_by(release: bytes | None) -> str | None:
    """The release a store's meta says last opened it (0.1.0 wrote none)."""
    return release.decode("utf-8", "replace") if release is not None else None


def claim_refusal(
    path: str, node_id: str | None, owner: bytes | None, layout: bytes | None, release: bytes | None, *, newest: int
) -> StorageError | None:
    """Why node_id may not open the store whose meta holds owner, layout and
    release (another node's, or a format newer than `newest`), or None.
    node_id None: any owner will do (the check before a node starts)."""
    if owner is None:
        return None
    if node_id is not None and owner.decode() != node_id:
        return NodeIdMismatchError(
            f"storage: data dir {path} belongs to node {owner.decode()!r}, not {node_id!r}; "
            f"give each node its own --data-dir, or start it as --node-id {owner.decode()}"
        )
    problem = format_problem(path, layout, written_by(release), newest=newest)
    return None if problem is None else StorageError(problem)


def saved_digest_index(raw: bytes | None, last_write: int) -> DigestIndex | None:
    """The digest index a clean close saved in meta (see META_DIGESTS), if
    `last_write` (the engine's last transaction id or sequence number) is
    still the one that saved it; else None: build it again."""
    if raw is None or len(raw) < 8 or int.from_bytes(raw[:8], "big") != last_write:
        return None
    return DigestIndex.from_bytes(raw[8:])


def digest_index_record(saving_write: int, index: DigestIndex) -> bytes:
    """What META_DIGESTS holds: the id of the write that saves it, then the index."""
    return saving_write.to_bytes(8, "big") + index.to_bytes()


class DurableStore(Store):
    """What the durable engines do the same way over their own primitives:
    durability is the Flusher's (set up by the engine as self._flusher), and
    reads of an arc come from the engine's raw scan (`_scan`: data keys and
    encoded records, in key order)."""

    _flusher: Flusher

    def _scan(self, start: int, end: int) -> Iterator[tuple[bytes, bytes]]:
        raise NotImplementedError

    def _scanned_high_water(self) -> int:
        """The highest hlc among the stored records, by reading every header
        (a store written before the ceiling was kept has none in meta)."""
        return max((HEADER.unpack_from(raw)[0] for _, raw in self._scan(0, 0)), default=0)

    def iter_range(self, start: int, end: int) -> Iterator[tuple[bytes, Record]]:
        for data_key, raw in self._scan(start, end):
            yield data_key[8:], decode_record(raw)

    def scan_digest(self, start: int, end: int) -> int:
        # Same value as Store.scan_digest, straight from the raw bytes: no value is decoded.
        acc = 0
        for data_key, raw in self._scan(start, end):
            hlc, _, _, node_len = HEADER.unpack_from(raw)
            acc ^= fingerprint(data_key[8:], hlc, raw[HEADER.size : HEADER.size + node_len])
        return acc

    def sync(self) -> None:
        self._flusher.sync()

    def wait_durable(self) -> Future[None] | None:
        return self._flusher.wait_durable()

    def sync_stats(self) -> SyncStats:
        return self._flusher.stats()


def lock_directory(path: str) -> TextIO:
    """Hold an exclusive lock on the directory while open. LMDB lets several
    processes share an environment, and RocksDB's own LOCK names no holder;
    two nodes must never share one (say, two pods given one volume by
    mistake). The kernel drops the lock if we die."""
    try:
        os.makedirs(path, exist_ok=True)
        lock_file = open(os.path.join(path, LOCK_FILE), "a+")  # noqa: SIM115 - held until the engine closes
    except OSError as exc:
        raise StorageError(f"storage: cannot use data dir {path}: {exc}") from exc
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "unknown"
        lock_file.close()
        raise StorageError(f"storage: data dir {path} is in use by another process (pid {holder})") from None
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(f"{os.getpid()}\n")
    lock_file.flush()
    return lock_file
