"""The log-structured durable engine: records in RocksDB (through rocksdict), one node's data directory.

The same contract and the same bytes as app.storage.lmdb_store (records and
keys are encoded by app.storage.durable): data keys are 8-byte big-endian
ring hash + key in the default column family, so one ring arc is one iterator
range; column families "expiry" (expires_at u64 + data key) and "tombstones"
(dead-since u64 + data key) let the sweep visit only what it turns or purges;
"meta" keeps the owner, the on-disk format (FORMAT, refused when newer,
migrated when older), the release that last opened it, the high-water ceiling
(stepped as in LMDB), the live-record count, and the digest index saved at a
clean close with the sequence number of the write that saved it (restored
only if no write came after). Every apply_many, discard_many and sweep batch
is ONE WriteBatch (the records, their index entries and the meta they change),
so a crash keeps all of a batch or none of it.

A commit appends to the write-ahead log without fsync (WriteOptions sync off):
the log lives in the page cache, which outlives a killed process, so a process
crash loses nothing; durability against power loss is the --fsync policy that
app.storage.flusher runs (`always` group-commits waiters into one WAL fsync,
`batch` syncs every window). A full volume surfaces as a failed write
(RocksDB reports ENOSPC): it is refused with StorageFullError.
Called by app.cluster (event-loop thread and executor threads); no asyncio here.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator

from rocksdict import (
    AccessType,
    BlockBasedOptions,
    Cache,
    DBCompactionStyle,
    Options,
    Rdict,
    ReadOptions,
    WriteBatch,
    WriteOptions,
)
from rocksdict import Snapshot as RocksSnapshot

from app import __version__
from app.clock import LOGICAL_BITS, Version
from app.config import (
    DIGEST_SUBARCS,
    FSYNC_POLICIES,
    ROCKSDB_BACKGROUND_JOBS,
    ROCKSDB_BLOCK_CACHE_BYTES,
    ROCKSDB_BLOOM_BITS_PER_KEY,
    ROCKSDB_INDEX_WRITE_BUFFER_BYTES,
    ROCKSDB_MAX_WRITE_BUFFERS,
    ROCKSDB_SCAN_CHUNK,
    ROCKSDB_SWEEP_BATCH,
    ROCKSDB_WRITE_BUFFER_BYTES,
)
from app.errors import StorageError, StorageFullError
from app.ring import stable_hash
from app.storage.base import ApplyResult, Record, StorageUsage, fingerprint, record_fingerprint
from app.storage.digests import DigestIndex, MaintainedDigests, Snapshot
from app.storage.durable import (
    HEADER,
    HIGH_WATER_STEP_MS,
    LOCK_FILE,
    MAX_HASH,
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

# The on-disk format of a RocksDB data dir, as LMDB's (kept in meta as ASCII
# digits; refused when newer, migrated step by step when older). Its own
# number line: the engines' files are never opened by each other.
FORMAT = 1
MIGRATIONS: dict[int, Callable[[Rdict, WriteBatch], None]] = {}

MARKER = "CURRENT"  # the file every RocksDB directory has (it names the live MANIFEST)
_EXPIRY, _TOMBSTONES, _META = "expiry", "tombstones", "meta"
_META_LIVE = b"live_count"  # u64: records with a value, kept in the batch that changes it (live_count is O(1))
_UNCOUNTED = {LOCK_FILE}


def _db_options() -> Options:
    """The default column family's (the records) and the database's options; each knob's reason is
    in app.config next to its value."""
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    options.create_missing_column_families(True)
    options.set_max_background_jobs(ROCKSDB_BACKGROUND_JOBS)
    options.set_compaction_style(DBCompactionStyle.level())
    options.set_level_compaction_dynamic_level_bytes(True)  # ~1.1x space amplification once compaction settles
    options.set_bytes_per_sync(1 << 20)  # SST writes reach the disk as they go, not in one burst at the end
    options.set_keep_log_file_num(2)  # RocksDB's own info LOG files in the data dir
    options.set_max_log_file_size(1 << 20)
    options.set_write_buffer_size(ROCKSDB_WRITE_BUFFER_BYTES)
    options.set_max_write_buffer_number(ROCKSDB_MAX_WRITE_BUFFERS)
    # The WALs are kept until every column family's memtable in them is flushed:
    # past this, the quiet ones (meta, the indexes) are flushed too, so the log stays small.
    options.set_max_total_wal_size(4 * ROCKSDB_WRITE_BUFFER_BYTES)
    table = BlockBasedOptions()
    table.set_block_cache(Cache(ROCKSDB_BLOCK_CACHE_BYTES))
    table.set_bloom_filter(ROCKSDB_BLOOM_BITS_PER_KEY, False)  # full (not block-based) filters
    options.set_block_based_table_factory(table)
    return options


def _index_options() -> Options:
    """The expiry, tombstone and meta column families: only iterated or read by a few keys: no filter."""
    options = Options(raw_mode=True)
    options.set_write_buffer_size(ROCKSDB_INDEX_WRITE_BUFFER_BYTES)
    options.set_level_compaction_dynamic_level_bytes(True)
    return options


def _column_families() -> dict[str, Options]:
    return {_EXPIRY: _index_options(), _TOMBSTONES: _index_options(), _META: _index_options()}


def holds_rocksdb(path: str) -> bool:
    return os.path.exists(os.path.join(path, MARKER))


def check_format(path: str) -> None:
    """Refuse, before a node starts serving, a data dir of a format this build
    cannot read (the composition root calls it; RocksDbStore checks again at
    open). Opens read-only; a dir without a store passes."""
    if not holds_rocksdb(path):
        return
    try:
        families = Rdict.list_cf(path, Options(raw_mode=True))
        if _META not in families:
            return  # not written by kvstore yet: the open creates what it needs
        db = Rdict(
            path,
            Options(raw_mode=True),
            column_families={name: _index_options() for name in families if name != "default"},
            access_type=AccessType.read_only(False),
        )
        try:
            meta = db.get_column_family(_META)
            owner, layout, release = meta.get(META_NODE_ID), meta.get(META_FORMAT), meta.get(META_RELEASE)
            del meta
        finally:
            db.close()
    except Exception as exc:  # rocksdict raises plain Exception for every RocksDB status
        raise StorageError(f"storage: cannot read the meta of RocksDB in {path}: {exc}") from exc
    refused = claim_refusal(path, None, owner, layout, release, newest=FORMAT)
    if refused is not None:
        raise refused


class RocksDbStore(DurableStore):
    """One RocksDB database in `path`, owned by `node_id`."""

    def __init__(
        self,
        *,
        path: str,
        node_id: str,
        fsync: str,
        fsync_window_ms: int,
        tombstone_grace_s: float,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}")
        self._path = path
        self._fsync = fsync
        self._grace_ms = int(tombstone_grace_s * 1000)
        self._lock_file = lock_directory(path)
        self._closing = False
        try:
            # Read-only first: a read-write open replays and flushes the log,
            # and a store this build must refuse is left exactly as it was.
            check_format(path)
        except StorageError:
            self._lock_file.close()
            raise
        # Commits append to the WAL (a write() into the page cache) and never
        # fsync: the flusher's policy does (flush_wal(True)).
        self._write_options = WriteOptions()
        self._write_options.sync = False
        try:
            self._db = Rdict(path, _db_options(), column_families=_column_families())
            self._data_cf = self._db.get_column_family_handle("default")
            self._expiry_cf = self._db.get_column_family_handle(_EXPIRY)
            self._tombs_cf = self._db.get_column_family_handle(_TOMBSTONES)
            self._meta_cf = self._db.get_column_family_handle(_META)
            self._expiry = self._db.get_column_family(_EXPIRY)
            self._tombs = self._db.get_column_family(_TOMBSTONES)
            self._meta = self._db.get_column_family(_META)
            saved_digests = self._saved_digests()
            self._claim(node_id)
            self._high_water = self._read_high_water()
            self._live = self._read_live_count()
        except StorageError:
            self._release()
            raise
        except Exception as exc:  # rocksdict raises plain Exception for every RocksDB status
            self._release()
            raise StorageError(f"storage: cannot open RocksDB in {path}: {exc}") from exc

        # Held around every write batch and the digest change it makes once
        # written, so the digest index's snapshot sees exactly the writes
        # whose changes it did not record; it also makes each batch's
        # read-compare-write atomic against other writers.
        self._write_lock = threading.Lock()
        self._digests: MaintainedDigests = MaintainedDigests(
            lock=self._write_lock, snapshot=self._snapshot, parts=DIGEST_SUBARCS, name="rocksdb"
        )
        if saved_digests is not None:
            self._digests.restore(saved_digests)
        self._flusher = Flusher(policy=fsync, window_ms=fsync_window_ms, sync=self._wal_sync, name="rocksdb")

    def _release(self) -> None:
        """Drop every handle (RocksDB stays open while any lives), close, unlock.
        The closed Rdict stays: its calls raise, which the methods turn into StorageError."""
        db = getattr(self, "_db", None)
        for name in ("_data_cf", "_expiry_cf", "_tombs_cf", "_meta_cf", "_expiry", "_tombs", "_meta"):
            if hasattr(self, name):
                delattr(self, name)
        try:
            if db is not None:
                db.close()
        except Exception as exc:  # noqa: BLE001 - a write error before (a full volume) fails the close too; logged
            log.warning("storage: closing RocksDB in %s: %s", self._path, exc)
        finally:
            self._lock_file.close()

    def _claim(self, node_id: str) -> None:
        """Record the owning node id and the format in a new directory; refuse
        someone else's, or one of a format this build cannot read (before
        writing anything); migrate an older format; note this release."""
        owner = self._meta.get(META_NODE_ID)
        layout = self._meta.get(META_FORMAT)
        release = self._meta.get(META_RELEASE)
        refused = claim_refusal(self._path, node_id, owner, layout, release, newest=FORMAT)
        if refused is not None:
            raise refused
        last_release = written_by(release)
        batch = WriteBatch(raw_mode=True)
        if owner is None:
            batch.put(META_NODE_ID, node_id.encode(), self._meta_cf)
            batch.put(META_FORMAT, str(FORMAT).encode(), self._meta_cf)
            batch.put(_META_LIVE, U64.pack(0), self._meta_cf)
        else:
            self._migrate(batch, format_number(layout) or FORMAT, last_release)
        if release != __version__.encode():
            batch.put(META_RELEASE, __version__.encode(), self._meta_cf)
        if len(batch):
            self._db.write(batch, self._write_options)
        if owner is None:
            self._db.flush_wal(True)
        elif last_release != __version__:
            log.warning(
                "storage: %s (RocksDB, on-disk format %d) was last opened by kvstore %s; now %s",
                self._path,
                FORMAT,
                last_release,
                __version__,
            )

    def _migrate(self, batch: WriteBatch, layout: int, written_by: str | None) -> None:
        """Bring an older format up to FORMAT in the open batch, one step at a time."""
        for step in range(layout, FORMAT):
            log.warning(
                "storage: migrating %s (RocksDB) from on-disk format %d to %d (written by kvstore %s); "
                "older releases cannot open it afterwards",
                self._path,
                step,
                step + 1,
                written_by,
            )
            MIGRATIONS[step](self._db, batch)
        if layout != FORMAT:
            batch.put(META_FORMAT, str(FORMAT).encode(), self._meta_cf)

    def _saved_digests(self) -> DigestIndex | None:
        """The digest index saved at the last clean close, if nothing was written since."""
        raw = self._meta.get(META_DIGESTS)
        last = self._db.latest_sequence_number()
        return saved_digest_index(raw, last)

    def _save_digests(self) -> None:
        """At close, under the write lock: keep the digest index for the next open.
        A one-put batch takes the next sequence number, so that is what it records."""
        index = self._digests.saved()
        batch = WriteBatch(raw_mode=True)
        if index is None:
            batch.delete(META_DIGESTS, self._meta_cf)
        else:
            seq = self._db.latest_sequence_number() + 1
            batch.put(META_DIGESTS, digest_index_record(seq, index), self._meta_cf)
        try:
            self._db.write(batch, self._write_options)
        except Exception as exc:  # noqa: BLE001 - a full volume, say: the next open rebuilds the index instead
            log.warning("storage: could not save the digest index (%s); it is rebuilt at the next start", exc)

    def _read_high_water(self) -> int:
        raw = self._meta.get(META_HIGH_WATER)
        if raw is not None:
            return int(U64.unpack(raw)[0])
        highest = self._scanned_high_water()
        return highest

    def _read_live_count(self) -> int:
        """The kept count; a store that has none (damaged meta) is counted once."""
        raw = self._meta.get(_META_LIVE)
        if raw is not None:
            return int(U64.unpack(raw)[0])
        live = sum(1 for _, raw_record in self._scan(0, 0) if not HEADER.unpack_from(raw_record)[2] & 0x01)
        batch = WriteBatch(raw_mode=True)
        batch.put(_META_LIVE, U64.pack(live), self._meta_cf)
        self._db.write(batch, self._write_options)
        return live

    def high_water(self) -> int:
        return self._high_water

    def _check_open(self, what: str) -> None:
        if self._closing:
            raise StorageError(f"storage: {what} failed: the store is closed")

    def _write(self, batch: WriteBatch, what: str) -> None:
        """Write one batch; a full volume is StorageFullError (nothing of the batch is stored)."""
        try:
            self._db.write(batch, self._write_options)
        except Exception as exc:  # rocksdict raises plain Exception for every RocksDB status
            if "No space left" in str(exc) or "ENOSPC" in str(exc):
                raise StorageFullError(
                    f"storage: the volume of RocksDB in {self._path} is full ({exc}); writes are refused, reads "
                    "still served: grow the volume, then restart the node (README: Storage limits)"
                ) from exc
            raise StorageError(f"storage: {what} failed: {exc}") from exc

    def usage(self) -> StorageUsage:
        """Used: the database's files (SSTs, logs, manifest). Limit: that plus what the volume has left."""
        used = 0
        try:
            with os.scandir(self._path) as entries:
                for entry in entries:
                    if entry.is_file(follow_symlinks=False) and entry.name not in _UNCOUNTED:
                        used += entry.stat(follow_symlinks=False).st_size
            volume = os.statvfs(self._path)
        except OSError as exc:
            raise StorageError(f"storage: usage failed: {exc}") from exc
        return StorageUsage(used_bytes=used, limit_bytes=used + volume.f_bavail * volume.f_frsize)

    # -- reads ----------------------------------------------------------------

    def get(self, key: bytes) -> Record | None:
        try:
            raw = self._db.get(data_key_of(key))
        except Exception as exc:  # rocksdict raises plain Exception for every RocksDB status
            raise StorageError(f"storage: get failed: {exc}") from exc
        return None if raw is None else decode_record(raw)

    def live_count(self) -> int:
        self._check_open("live_count")
        return self._live

    def _scan(self, start: int, end: int) -> Iterator[tuple[bytes, bytes]]:
        """Raw (data key, value) pairs in the arc, read ROCKSDB_SCAN_CHUNK at a
        time, each chunk from its own iterator (none pins files for long)."""
        for low, high in arc_spans(start, end):
            upper = int.from_bytes(high, "big") + 1
            position = low
            while True:
                chunk: list[tuple[bytes, bytes]] = []
                try:
                    options = ReadOptions()
                    if upper <= MAX_HASH:
                        options.set_iterate_upper_bound(U64.pack(upper))
                    items = self._db.items(from_key=position, read_opt=options)
                    for item in items:
                        chunk.append(item)  # type: ignore[arg-type] # raw mode: keys and values are bytes
                        if len(chunk) == ROCKSDB_SCAN_CHUNK:
                            break
                    del items
                except Exception as exc:  # rocksdict raises plain Exception for every RocksDB status
                    raise StorageError(f"storage: range scan failed: {exc}") from exc
                yield from chunk
                if len(chunk) < ROCKSDB_SCAN_CHUNK:
                    break
                position = chunk[-1][0] + b"\x00"  # the smallest key after the last one read

    def _snapshot(self) -> _RocksSnapshot:
        """A RocksDB snapshot taken under the write lock (see MaintainedDigests)."""
        try:
            return _RocksSnapshot(self._db.snapshot())
        except Exception as exc:  # rocksdict raises plain Exception for every RocksDB status
            raise StorageError(f"storage: digest snapshot failed: {exc}") from exc

    # -- writes ---------------------------------------------------------------

    def apply(self, key: bytes, record: Record) -> ApplyResult:
        return self.apply_many([(key, record)])[0]

    def apply_many(self, writes: list[tuple[bytes, Record]]) -> list[ApplyResult]:
        """Every write in one WriteBatch: one WAL append for all of them.
        Each compares against the stored record, or an earlier write of the
        same key in this batch."""
        results: list[ApplyResult] = []
        with self._write_lock:
            self._check_open("apply")
            highest = self._high_water
            live = self._live
            tracking = self._digests.tracking
            deltas: list[tuple[int, int]] = []  # (key hash, fingerprint change), applied once written
            pending: dict[bytes, Record] = {}  # this batch's writes, by data key
            batch = WriteBatch(raw_mode=True)
            try:
                for key, record in writes:
                    token = stable_hash(key)
                    data_key = U64.pack(token) + key
                    stored = pending.get(data_key)
                    if stored is None:
                        raw = self._db.get(data_key)
                        stored = None if raw is None else decode_record(raw)
                    if stored is not None and stored.version >= record.version:
                        results.append(ApplyResult(False, stored))  # positional: cheaper, as in lmdb_store
                        continue
                    if stored is not None:
                        self._unindex(batch, data_key, stored)
                        live -= stored.value is not None
                    batch.put(data_key, encode_record(record), self._data_cf)
                    self._index(batch, data_key, record)
                    pending[data_key] = record
                    live += record.value is not None
                    results.append(ApplyResult(True, stored))
                    highest = max(highest, record.version.hlc)
                    if tracking:
                        old = 0 if stored is None else record_fingerprint(key, stored)
                        deltas.append((token, old ^ record_fingerprint(key, record)))
            except Exception as exc:  # rocksdict raises plain Exception for every RocksDB status
                raise StorageError(f"storage: apply failed: {exc}") from exc
            if not pending:
                return results
            if highest > self._high_water:
                highest = highest + (HIGH_WATER_STEP_MS << LOGICAL_BITS)
                batch.put(META_HIGH_WATER, U64.pack(highest), self._meta_cf)
            if live != self._live:
                batch.put(_META_LIVE, U64.pack(live), self._meta_cf)
            self._write(batch, "apply")
            self._live = live
            self._high_water = highest
            for token, delta in deltas:
                self._digests.changed(token, delta)
        self._flusher.applied(sum(result.applied for result in results))
        return results

    def discard(self, key: bytes, version: Version) -> bool:
        return self.discard_many([(key, version)]) == 1

    def discard_many(self, items: list[tuple[bytes, Version]]) -> int:
        """Every discard in one WriteBatch."""
        gone: dict[bytes, tuple[bytes, Record]] = {}  # data key -> (key, record)
        with self._write_lock:
            self._check_open("discard")
            live = self._live
            batch = WriteBatch(raw_mode=True)
            try:
                for key, version in items:
                    data_key = data_key_of(key)
                    if data_key in gone:
                        continue
                    raw = self._db.get(data_key)
                    if raw is None:
                        continue
                    stored = decode_record(raw)
                    if stored.version != version:
                        continue  # a newer write arrived since the caller read it: keep it
                    self._unindex(batch, data_key, stored)
                    batch.delete(data_key, self._data_cf)
                    live -= stored.value is not None
                    gone[data_key] = (key, stored)
            except Exception as exc:  # rocksdict raises plain Exception for every RocksDB status
                raise StorageError(f"storage: discard failed: {exc}") from exc
            if not gone:
                return 0
            if live != self._live:
                batch.put(_META_LIVE, U64.pack(live), self._meta_cf)
            self._write(batch, "discard")
            self._live = live
            if self._digests.tracking:  # only once the batch is written
                for key, stored in gone.values():
                    self._digests.changed(stable_hash(key), record_fingerprint(key, stored))
        self._flusher.applied(len(gone))
        return len(gone)

    def _index(self, batch: WriteBatch, data_key: bytes, record: Record) -> None:
        if record.value is None:
            batch.put(U64.pack(record.dead_since_ms) + data_key, b"", self._tombs_cf)
        elif record.expires_at_ms:
            batch.put(U64.pack(record.expires_at_ms) + data_key, b"", self._expiry_cf)

    def _unindex(self, batch: WriteBatch, data_key: bytes, record: Record) -> None:
        if record.value is None:
            batch.delete(U64.pack(record.dead_since_ms) + data_key, self._tombs_cf)
        elif record.expires_at_ms:
            batch.delete(U64.pack(record.expires_at_ms) + data_key, self._expiry_cf)

    def sweep(self, now_ms: int) -> int:
        """Turn expired values into tombstones at their version, then purge
        tombstones past their grace, walking only the index entries due (never
        a full scan), ROCKSDB_SWEEP_BATCH records per batch."""
        self._check_open("sweep")
        changed = self._sweep_index(self._expiry, limit=now_ms, purge=False)
        changed += self._sweep_index(self._tombs, limit=now_ms - self._grace_ms, purge=True)
        if changed:
            self._flusher.applied(changed)
        return changed

    def _sweep_index(self, index: Rdict, *, limit: int, purge: bool) -> int:
        """Every record whose index time is <= limit is purged, or (purge
        False) kept as a tombstone at the same version; returns how many."""
        if limit < 0:
            return 0
        bound = U64.pack(limit + 1) if limit < MAX_HASH else None  # index keys below it are due
        swept = 0
        # Each batch reads on from where the last one stopped: the index entries
        # it deleted are tombstones until a compaction, and an LSM iterator would
        # step over all of them again from the start (the queue pattern).
        position = b""
        while True:
            with self._write_lock:
                self._check_open("sweep")
                deltas: list[tuple[int, int]] = []  # purged records leave the digests once written
                live = self._live
                batch = WriteBatch(raw_mode=True)
                try:
                    options = ReadOptions()
                    if bound is not None:
                        options.set_iterate_upper_bound(bound)
                    due: list[bytes] = []
                    keys = index.keys(from_key=position, read_opt=options)
                    for index_key in keys:
                        due.append(index_key)  # type: ignore[arg-type] # raw mode: keys are bytes
                        if len(due) == ROCKSDB_SWEEP_BATCH:
                            break
                    del keys
                    if due:
                        position = due[-1] + b"\x00"  # the smallest key after the last one read
                    for index_key in due:
                        data_key = index_key[8:]
                        raw = self._db.get(data_key)
                        if raw is None:  # cannot happen while the indexes are kept in step
                            batch.delete(index_key, self._expiry_cf if not purge else self._tombs_cf)
                            continue
                        record = decode_record(raw)
                        self._unindex(batch, data_key, record)
                        live -= record.value is not None
                        if purge:
                            batch.delete(data_key, self._data_cf)
                            deltas.append((U64.unpack_from(data_key)[0], record_fingerprint(data_key[8:], record)))
                        else:  # the same version: the digests do not change
                            dead = Record(version=record.version, value=None, expires_at_ms=record.expires_at_ms)
                            batch.put(data_key, encode_record(dead), self._data_cf)
                            self._index(batch, data_key, dead)
                        swept += 1
                except Exception as exc:  # rocksdict raises plain Exception for every RocksDB status
                    raise StorageError(f"storage: sweep failed: {exc}") from exc
                if due:
                    if live != self._live:
                        batch.put(_META_LIVE, U64.pack(live), self._meta_cf)
                    self._write(batch, "sweep")
                    self._live = live
                    if self._digests.tracking:
                        for token, delta in deltas:
                            self._digests.changed(token, delta)
            if len(due) < ROCKSDB_SWEEP_BATCH:
                return swept

    # -- durability (the policy thread lives in app.storage.flusher) ---------------

    def _wal_sync(self) -> None:
        try:
            self._db.flush_wal(True)
        except Exception as exc:  # rocksdict raises plain Exception for every RocksDB status
            raise StorageError(f"storage: sync failed: {exc}") from exc

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._digests.close()
        self._flusher.close()
        # The write lock is held until the database is closed, so no write
        # can land after the digest index was saved.
        with self._write_lock:
            try:
                self._save_digests()
                self._db.flush_wal(True)
                # Every column family's memtable goes to an SST now, so the next
                # start replays no log (a log is kept until all of them are flushed).
                for family in (self._db, self._expiry, self._tombs, self._meta):
                    family.flush(True)
            except Exception as exc:  # noqa: BLE001 - rocksdict raises plain Exception for every RocksDB status
                log.warning("storage: closing RocksDB in %s: %s", self._path, exc)
            finally:
                self._release()


class _RocksSnapshot(Snapshot):
    """One RocksDB snapshot: the database as of the moment it was taken."""

    def __init__(self, snapshot: RocksSnapshot) -> None:
        self._snapshot: RocksSnapshot | None = snapshot

    def scan(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        assert self._snapshot is not None
        try:
            for low, high in arc_spans(start, end):
                upper = int.from_bytes(high, "big") + 1
                options = ReadOptions()
                if upper <= MAX_HASH:
                    options.set_iterate_upper_bound(U64.pack(upper))
                for data_key, raw in self._snapshot.items(from_key=low, read_opt=options):
                    assert isinstance(data_key, bytes) and isinstance(raw, bytes)
                    hlc, _, _, node_len = HEADER.unpack_from(raw)
                    node = raw[HEADER.size : HEADER.size + node_len]
                    yield U64.unpack_from(data_key)[0], fingerprint(data_key[8:], hlc, node)
        except Exception as exc:  # rocksdict raises plain Exception for every RocksDB status
            raise StorageError(f"storage: digest scan failed: {exc}") from exc

    def __exit__(self, *exc: object) -> None:
        self._snapshot = None  # released: RocksDB keeps the database open while a snapshot lives


__all__ = ["FORMAT", "MARKER", "MIGRATIONS", "RocksDbStore", "check_format", "holds_rocksdb"]
