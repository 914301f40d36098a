"""The durable engine: records in LMDB, one node's data directory.

Chosen over SQLite-WAL by measurement (bench/storage_engines.py, BENCHMARKS.md).
Keys are stored as 8-byte big-endian ring hash + key, so one ring arc is one
cursor range (the record encoding, shared with rocksdb_store, is in durable.py).
Two index sub-databases (expiry time -> key for live values,
dead-since time -> key for tombstones) let the sweep visit only what it turns
or purges, and persist with the data. The meta sub-database keeps the owner,
the on-disk format (FORMAT: refused when newer, migrated when older), the
release that last opened it, and a high-water ceiling: an hlc at or above every version
applied, written in the same transaction as the record that first passes the
previous ceiling, so it is as durable as they are. It steps HIGH_WATER_STEP_MS
ahead of that record, so it is rewritten a few times a second under load,
not in every commit.
The digest index (app.storage.digests) is updated under a write lock once
each transaction has committed, and saved in meta at a clean close with the
id of the transaction that saved it: the next open restores it only if no
transaction came after (a crash, or a write by a build unaware of it, means
one full scan in a thread instead: ~1.6 s of CPU per 1M records, measured).
Commits never fsync; durability is a policy (--fsync) that app.storage.flusher
runs in a thread: `always` group-commits waiters into one env.sync, `batch`
syncs every window.
Called by app.cluster (event-loop thread and executor threads); no asyncio here.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import cast

import lmdb

from app import __version__
from app.clock import LOGICAL_BITS, Version
from app.config import (
    DEFAULT_LMDB_MAP_SIZE,
    DIGEST_SUBARCS,
    FSYNC_POLICIES,
    LMDB_SCAN_CHUNK,
    LMDB_SWEEP_BATCH,
    LMDB_WRITEMAP,
)
from app.errors import StorageError, StorageFullError
from app.ring import stable_hash
from app.storage.base import ApplyResult, Record, StorageUsage, fingerprint, record_fingerprint
from app.storage.digests import DigestIndex, MaintainedDigests, Snapshot
from app.storage.durable import (
    HEADER,
    HIGH_WATER_STEP_MS,
    META_DIGESTS,
    META_FORMAT,
    META_HIGH_WATER,
    META_NODE_ID,
    META_RELEASE,
    U64,
    DurableStore,
    arc_spans,
    claim_refusal,
    data_key_of,
    decode_record,
    digest_index_record,
    encode_record,
    format_number,
    lock_directory,
    saved_digest_index,
    written_by,
)
from app.storage.flusher import Flusher

log = logging.getLogger(__name__)

# The on-disk format, kept in meta as ASCII digits (0.1.0 wrote b"1" and
# refuses any other value). A build reads every format from 1 to FORMAT and
# migrates an older one up, step by step (MIGRATIONS: format n -> n + 1),
# saying so in the log; a store of a newer format is refused at open, before
# anything in it is changed. Bump FORMAT only with a migration, and only
# after an operator can finalise the upgrade: an older release cannot open a
# migrated store, so a bump ends the rollback window (README: Upgrade and
# rollback). 0.2.0 changed nothing on disk.
FORMAT = 1
MIGRATIONS: dict[int, Callable[[lmdb.Transaction], None]] = {}

__all__ = ["FORMAT", "HIGH_WATER_STEP_MS", "MIGRATIONS", "LmdbStore", "check_format"]


def check_format(path: str) -> None:
    """Refuse, before a node starts serving, a data dir of a format this build
    cannot read (the composition root calls it; LmdbStore checks again at open).
    Reads the meta only, read-only; a dir without a store passes."""
    if not os.path.exists(os.path.join(path, "data.mdb")):
        return
    try:
        env = lmdb.open(path, readonly=True, lock=False, max_dbs=4)
    except lmdb.Error as exc:
        raise StorageError(f"storage: cannot read LMDB in {path}: {exc}") from exc
    try:
        with env.begin() as txn:
            if txn.get(b"meta") is None:
                return  # not written by kvstore yet: the open creates what it needs
        meta = env.open_db(b"meta", create=False)
        with env.begin(db=meta) as txn:
            owner, layout, release = txn.get(META_NODE_ID), txn.get(META_FORMAT), txn.get(META_RELEASE)
    except lmdb.Error as exc:
        raise StorageError(f"storage: cannot read the meta of LMDB in {path}: {exc}") from exc
    finally:
        env.close()
    refused = claim_refusal(path, None, owner, layout, release, newest=FORMAT)
    if refused is not None:
        raise refused


class LmdbStore(DurableStore):
    """One LMDB environment in `path`, owned by `node_id`."""

    def __init__(
        self,
        *,
        path: str,
        node_id: str,
        fsync: str,
        fsync_window_ms: int,
        tombstone_grace_s: float,
        map_size: int = DEFAULT_LMDB_MAP_SIZE,
        writemap: bool = LMDB_WRITEMAP,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}")
        self._path = path
        self._fsync = fsync
        self._grace_ms = int(tombstone_grace_s * 1000)
        self._lock_file = lock_directory(path)
        try:
            # sync/metasync off: a commit only touches the page cache, so
            # apply() on the event loop never waits for the disk; the policy
            # threads below decide when env.sync makes it durable. writemap
            # stays off (LMDB_WRITEMAP says why): it halves a put's cost, but
            # unsynced commits could then corrupt the file on a power loss.
            self._env = lmdb.open(
                path,
                map_size=map_size,
                max_dbs=4,
                sync=False,
                metasync=False,
                writemap=writemap,
                readahead=False,  # ring-hash keys are read at random: readahead only inflates RSS
            )
            # A killed predecessor leaves reader slots behind; freeing them lets
            # LMDB reuse the pages they pinned instead of growing the file.
            self._env.reader_check()
            self._data = self._env.open_db(b"data")
            self._expiry = self._env.open_db(b"expiry")  # expires_at u64 + data key -> b""
            self._tombs = self._env.open_db(b"tombstones")  # version wall ms u64 + data key -> b""
            self._meta = self._env.open_db(b"meta")
            saved_digests = self._saved_digests()
            self._claim(node_id)
            self._high_water = self._read_high_water()
        except lmdb.Error as exc:
            self._lock_file.close()
            raise StorageError(f"storage: cannot open LMDB in {path}: {exc}") from exc
        except StorageError:
            self._lock_file.close()
            raise

        self._closing = False
        # Held around every write transaction and the digest change it makes
        # once committed, so the digest index's snapshot sees exactly the
        # commits whose changes it did not record (LMDB serializes writers
        # anyway: this lock costs no parallelism).
        self._write_lock = threading.Lock()
        self._digests: MaintainedDigests = MaintainedDigests(
            lock=self._write_lock, snapshot=self._snapshot, parts=DIGEST_SUBARCS, name="lmdb"
        )
        if saved_digests is not None:
            self._digests.restore(saved_digests)
        self._flusher = Flusher(policy=fsync, window_ms=fsync_window_ms, sync=self._env_sync, name="lmdb")

    def _claim(self, node_id: str) -> None:
        """Record the owning node id and the format in a new directory; refuse
        someone else's, or one of a format this build cannot read (before
        writing anything); migrate an older format; note this release."""
        with self._env.begin(db=self._meta) as txn:
            owner = txn.get(META_NODE_ID)
            layout = txn.get(META_FORMAT)
            release = txn.get(META_RELEASE)
        refused = claim_refusal(self._path, node_id, owner, layout, release, newest=FORMAT)
        if refused is not None:
            self._env.close()
            raise refused
        last_release = written_by(release)
        with self._env.begin(write=True, db=self._meta) as txn:
            if owner is None:
                txn.put(META_NODE_ID, node_id.encode())
                txn.put(META_FORMAT, str(FORMAT).encode())
            else:
                self._migrate(txn, format_number(layout) or FORMAT, last_release)
            if release != __version__.encode():
                txn.put(META_RELEASE, __version__.encode())
        if owner is None:
            self._env.sync(True)
        elif last_release != __version__:
            log.warning(
                "storage: %s (on-disk format %d) was last opened by kvstore %s; now %s",
                self._path,
                FORMAT,
                last_release or "0.1.0 (which records no release)",
                __version__,
            )

    def _migrate(self, txn: lmdb.Transaction, layout: int, written_by: str | None) -> None:
        """Bring an older format up to FORMAT in the open transaction, one step at a time."""
        for step in range(layout, FORMAT):
            log.warning(
                "storage: migrating %s from on-disk format %d to %d (written by kvstore %s); "
                "older releases cannot open it afterwards",
                self._path,
                step,
                step + 1,
                written_by or "0.1.0",
            )
            MIGRATIONS[step](txn)
        if layout != FORMAT:
            txn.put(META_FORMAT, str(FORMAT).encode(), db=self._meta)

    def _saved_digests(self) -> DigestIndex | None:
        """The digest index saved at the last clean close, if nothing was written since."""
        with self._env.begin(db=self._meta) as txn:
            raw = txn.get(META_DIGESTS)
            last = txn.id()
        return saved_digest_index(raw, last)

    def _save_digests(self) -> None:
        """At close, under the write lock: keep the digest index for the next open."""
        index = self._digests.saved()
        try:
            with self._env.begin(write=True, db=self._meta) as txn:
                if index is None:
                    txn.delete(META_DIGESTS)
                else:
                    txn.put(META_DIGESTS, digest_index_record(txn.id(), index))
        except lmdb.Error as exc:  # a full map, say: the next open rebuilds the index instead
            log.warning("storage: could not save the digest index (%s); it is rebuilt at the next start", exc)

    def _read_high_water(self) -> int:
        """The stored high-water ceiling. A directory written before it was
        kept has none: one scan of the headers finds it, once, and stores it."""
        with self._env.begin(db=self._meta) as txn:
            raw = txn.get(META_HIGH_WATER)
        if raw is not None:
            return int(U64.unpack(raw)[0])
        highest = self._scanned_high_water()
        with self._env.begin(write=True, db=self._meta) as txn:
            txn.put(META_HIGH_WATER, U64.pack(highest))
        self._env.sync(True)
        return highest

    def high_water(self) -> int:
        return self._high_water

    def _full_error(self, exc: lmdb.Error) -> StorageFullError:
        """The refusal of a write that found no room: the transaction was
        aborted, so nothing of it is stored and everything before it is."""
        where = "map" if isinstance(exc, lmdb.MapFullError) else "volume"
        return StorageFullError(
            f"storage: the LMDB {where} in {self._path} is full ({exc}); writes are refused, reads still served: "
            "grow the volume, then raise --map-size (README: Storage limits)"
        )

    def usage(self) -> StorageUsage:
        """Used: the pages LMDB has ever handed out (its file's high-water
        mark; freed pages inside it are reused before the file grows). Limit:
        the map size, or less when the volume has less room left for the file."""
        try:
            info = self._env.info()
            page = self._env.stat()["psize"]
        except lmdb.Error as exc:
            raise StorageError(f"storage: usage failed: {exc}") from exc
        used = (info["last_pgno"] + 1) * page
        try:
            volume = os.statvfs(self._path)
            file_size = os.path.getsize(os.path.join(self._path, "data.mdb"))
        except OSError:
            return StorageUsage(used_bytes=used, limit_bytes=info["map_size"])
        room = file_size + volume.f_bavail * volume.f_frsize
        return StorageUsage(used_bytes=used, limit_bytes=min(info["map_size"], room))

    # -- reads ----------------------------------------------------------------

    def get(self, key: bytes) -> Record | None:
        try:
            with self._env.begin(db=self._data) as txn:
                raw = txn.get(data_key_of(key))
        except lmdb.Error as exc:
            raise StorageError(f"storage: get failed: {exc}") from exc
        return None if raw is None else decode_record(raw)

    def live_count(self) -> int:
        # O(1): LMDB keeps entry counts per sub-database, and exactly the
        # tombstones are indexed, so no counter has to be kept or rebuilt.
        try:
            with self._env.begin() as txn:
                return txn.stat(self._data)["entries"] - txn.stat(self._tombs)["entries"]
        except lmdb.Error as exc:
            raise StorageError(f"storage: live_count failed: {exc}") from exc

    def _scan(self, start: int, end: int) -> Iterator[tuple[bytes, bytes]]:
        """Raw (data key, value) pairs in the arc, read LMDB_SCAN_CHUNK at a time,
        each chunk in its own short read transaction."""
        for low, high in arc_spans(start, end):
            position = low
            while True:
                chunk: list[tuple[bytes, bytes]] = []
                try:
                    with self._env.begin(db=self._data) as txn:
                        cursor = txn.cursor()
                        if cursor.set_range(position):
                            for data_key, raw in cursor:
                                if data_key[:8] > high:
                                    break
                                chunk.append((data_key, raw))
                                if len(chunk) == LMDB_SCAN_CHUNK:
                                    break
                except lmdb.Error as exc:
                    raise StorageError(f"storage: range scan failed: {exc}") from exc
                yield from chunk
                if len(chunk) < LMDB_SCAN_CHUNK:
                    break
                position = chunk[-1][0] + b"\x00"  # the smallest key after the last one read

    def _snapshot(self) -> _LmdbSnapshot:
        """A read transaction begun under the write lock (see MaintainedDigests)."""
        try:
            return _LmdbSnapshot(self._env.begin(db=self._data))
        except lmdb.Error as exc:
            raise StorageError(f"storage: digest snapshot failed: {exc}") from exc

    # -- writes ---------------------------------------------------------------

    def apply(self, key: bytes, record: Record) -> ApplyResult:
        return self.apply_many([(key, record)])[0]

    def apply_many(self, writes: list[tuple[bytes, Record]]) -> list[ApplyResult]:
        """Every write in one transaction: one commit (page writes, meta page)
        for all of them, which is most of what a single put costs."""
        results: list[ApplyResult] = []
        with self._write_lock:
            highest = self._high_water
            changed = False
            tracking = self._digests.tracking
            deltas: list[tuple[int, int]] = []  # (key hash, fingerprint change), applied once committed
            try:
                txn = self._env.begin(write=True)
                try:
                    for key, record in writes:
                        token = stable_hash(key)
                        data_key = U64.pack(token) + key
                        raw = txn.get(data_key, db=self._data)
                        stored = None if raw is None else decode_record(raw)
                        if stored is not None and stored.version >= record.version:
                            results.append(ApplyResult(False, stored))
                            continue
                        if stored is not None:
                            self._unindex(txn, data_key, stored)
                        txn.put(data_key, encode_record(record), db=self._data)
                        self._index(txn, data_key, record)
                        results.append(ApplyResult(True, stored))
                        highest = max(highest, record.version.hlc)
                        changed = True
                        if tracking:
                            old = 0 if stored is None else record_fingerprint(key, stored)
                            deltas.append((token, old ^ record_fingerprint(key, record)))
                    if changed:
                        if highest > self._high_water:
                            highest = highest + (HIGH_WATER_STEP_MS << LOGICAL_BITS)
                            txn.put(META_HIGH_WATER, U64.pack(highest), db=self._meta)
                        txn.commit()
                    else:
                        txn.abort()
                except BaseException:
                    txn.abort()
                    raise
            except (lmdb.MapFullError, lmdb.DiskError) as exc:
                raise self._full_error(exc) from exc
            except lmdb.Error as exc:
                raise StorageError(f"storage: apply failed: {exc}") from exc
            for token, delta in deltas:
                self._digests.changed(token, delta)
        if changed:
            self._high_water = highest
            self._flusher.applied(sum(result.applied for result in results))
        return results

    def discard(self, key: bytes, version: Version) -> bool:
        return self.discard_many([(key, version)]) == 1

    def discard_many(self, items: list[tuple[bytes, Version]]) -> int:
        """Every discard in one transaction: a hand-off drops a whole arc's
        records at once, and one commit per record would cost ~20x more."""
        gone: list[tuple[bytes, Record]] = []
        with self._write_lock:
            try:
                with self._env.begin(write=True) as txn:
                    for key, version in items:
                        data_key = data_key_of(key)
                        raw = txn.get(data_key, db=self._data)
                        if raw is None:
                            continue
                        stored = decode_record(raw)
                        if stored.version != version:
                            continue  # a newer write arrived since the caller read it: keep it
                        self._unindex(txn, data_key, stored)
                        txn.delete(data_key, db=self._data)
                        gone.append((key, stored))
            except lmdb.Error as exc:
                raise StorageError(f"storage: discard failed: {exc}") from exc
            if self._digests.tracking:  # only once the transaction committed
                for key, stored in gone:
                    self._digests.changed(stable_hash(key), record_fingerprint(key, stored))
        if gone:
            self._flusher.applied(len(gone))
        return len(gone)

    def _index(self, txn: lmdb.Transaction, data_key: bytes, record: Record) -> None:
        if record.value is None:
            txn.put(U64.pack(record.dead_since_ms) + data_key, b"", db=self._tombs)
        elif record.expires_at_ms:
            txn.put(U64.pack(record.expires_at_ms) + data_key, b"", db=self._expiry)

    def _unindex(self, txn: lmdb.Transaction, data_key: bytes, record: Record) -> None:
        if record.value is None:
            txn.delete(U64.pack(record.dead_since_ms) + data_key, db=self._tombs)
        elif record.expires_at_ms:
            txn.delete(U64.pack(record.expires_at_ms) + data_key, db=self._expiry)

    def sweep(self, now_ms: int) -> int:
        """Turn expired values into tombstones at their version, then purge
        tombstones past their grace, walking only the index entries due (never
        a full scan), in short transactions."""
        changed = self._sweep_index(self._expiry, limit=now_ms, purge=False)
        changed += self._sweep_index(self._tombs, limit=now_ms - self._grace_ms, purge=True)
        if changed:
            self._flusher.applied(changed)
        return changed

    def _sweep_index(self, index: lmdb._Database, *, limit: int, purge: bool) -> int:
        """Every record whose index time is <= limit is purged, or (purge
        False) kept as a tombstone at the same version; returns how many."""
        if limit < 0:
            return 0
        bound = U64.pack(limit)
        swept = 0  # purged, or (purge False) expired into tombstones
        while True:
            batch = 0
            with self._write_lock:
                deltas: list[tuple[int, int]] = []  # purged records leave the digests once committed
                try:
                    with self._env.begin(write=True) as txn:
                        cursor = txn.cursor(db=index)
                        due: list[bytes] = []
                        for index_key in cursor.iternext(values=False):
                            if index_key[:8] > bound or len(due) == LMDB_SWEEP_BATCH:
                                break
                            due.append(index_key)
                        for index_key in due:
                            data_key = index_key[8:]
                            raw = txn.get(data_key, db=self._data)
                            if raw is None:  # cannot happen while the indexes are kept in step
                                txn.delete(index_key, db=index)
                                continue
                            record = decode_record(raw)
                            self._unindex(txn, data_key, record)
                            if purge:
                                txn.delete(data_key, db=self._data)
                                deltas.append((U64.unpack_from(data_key)[0], record_fingerprint(data_key[8:], record)))
                            else:  # the same version: the digests do not change
                                dead = Record(version=record.version, value=None, expires_at_ms=record.expires_at_ms)
                                txn.put(data_key, encode_record(dead), db=self._data)
                                self._index(txn, data_key, dead)
                            swept += 1
                        batch = len(due)
                except lmdb.Error as exc:
                    raise StorageError(f"storage: sweep failed: {exc}") from exc
                if self._digests.tracking:
                    for token, delta in deltas:
                        self._digests.changed(token, delta)
            if batch < LMDB_SWEEP_BATCH:
                return swept

    # -- durability (the policy thread lives in app.storage.flusher) ---------------

    def _env_sync(self) -> None:
        try:
            self._env.sync(True)
        except lmdb.Error as exc:
            raise StorageError(f"storage: sync failed: {exc}") from exc

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._digests.close()
        self._flusher.close()
        # The write lock is held until the environment is closed, so no write
        # can land after the digest index was saved.
        with self._write_lock:
            try:
                self._save_digests()
                self._env.sync(True)
            finally:
                self._env.close()
                self._lock_file.close()


class _LmdbSnapshot(Snapshot):
    """One read transaction: LMDB's MVCC view as of the moment it began."""

    def __init__(self, txn: lmdb.Transaction) -> None:
        self._txn = txn

    def scan(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        cursor = self._txn.cursor()
        try:
            for low, high in arc_spans(start, end):
                if not cursor.set_range(low):
                    continue
                for data_key, raw in cast("Iterator[tuple[bytes, bytes]]", cursor):  # buffers=False: bytes
                    if data_key[:8] > high:
                        break
                    hlc, _, _, node_len = HEADER.unpack_from(raw)
                    node = raw[HEADER.size : HEADER.size + node_len]
                    yield U64.unpack_from(data_key)[0], fingerprint(data_key[8:], hlc, node)
        except lmdb.Error as exc:
            raise StorageError(f"storage: digest scan failed: {exc}") from exc

    def __exit__(self, *exc: object) -> None:
        self._txn.abort()
