"""The storage contract (app.storage.base.Store), run against every engine.

Time is a FakeClock: TTL and tombstone grace are crossed by moving it, never by
sleeping. What only the durable engines have (reopen, node identity, fsync
policies) follows the shared part, run on LMDB and RocksDB, still
parametrized so the memory engine states its side.
"""

from __future__ import annotations

import itertools
import random
import threading
from pathlib import Path

import lmdb
import pytest
import rocksdict

from app.config import NodeConfig
from app.errors import ConfigError, NodeIdMismatchError, StorageError
from app.ring import HASH_SPACE, in_arc, stable_hash
from app.storage import (
    LmdbStore,
    MemoryStore,
    Record,
    RocksDbStore,
    Store,
    check_data_dir,
    durable,
    lmdb_store,
    open_store,
    rocksdb_store,
)
from tests.unit.storage.fakes import (
    DURABLE_ENGINES,
    GRACE_S,
    START_MS,
    FakeClock,
    StoreFactory,
    put,
    tombstone,
    version,
)

T = START_MS
KEYS = [f"key-{i}".encode() for i in range(200)]
# For what only a durable engine has (a directory, an owner, fsync threads):
# overrides the engine parametrization to the durable engines.
durable_only = pytest.mark.parametrize("engine", DURABLE_ENGINES)


def whole(store: Store) -> dict[bytes, Record]:
    return dict(store.iter_range(0, 0))


# -- put / get / delete ------------------------------------------------------


def test_get_of_an_unknown_key_is_none(store: Store) -> None:
    assert store.get(b"nope") is None


def test_put_then_get_returns_the_record(store: Store) -> None:
    record = put(b"v1", at=T)
    result = store.apply(b"k", record)
    assert result.applied and result.previous is None
    assert store.get(b"k") == record


def test_binary_and_empty_values_and_keys_round_trip(store: Store) -> None:
    records = {b"": put(b"empty key", at=T), b"\x00\xff": put(b"", at=T), "ключ".encode(): put(bytes(range(256)), at=T)}
    for key, record in records.items():
        store.apply(key, record)
    for key, record in records.items():
        assert store.get(key) == record


def test_a_long_node_id_round_trips(store: Store) -> None:
    record = Record(version=version(T, node="node-" + "x" * 300), value=b"v")
    store.apply(b"k", record)
    assert store.get(b"k") == record


def test_overwrite_returns_the_previous_record(store: Store) -> None:
    first, second = put(b"v1", at=T), put(b"v2", at=T + 1)
    store.apply(b"k", first)
    result = store.apply(b"k", second)
    assert result.applied and result.previous == first
    assert store.get(b"k") == second


def test_delete_leaves_a_tombstone(store: Store) -> None:
    store.apply(b"k", put(b"v1", at=T))
    result = store.apply(b"k", tombstone(at=T + 1))
    assert result.applied and result.previous is not None and result.previous.value == b"v1"
    got = store.get(b"k")
    assert got is not None and got.is_tombstone and not got.live(T)


def test_a_tombstone_for_an_unknown_key_is_stored(store: Store) -> None:
    # A replica may see the delete before the put it deletes.
    assert store.apply(b"k", tombstone(at=T + 5)).applied
    assert not store.apply(b"k", put(b"late", at=T)).applied
    got = store.get(b"k")
    assert got is not None and got.is_tombstone


# -- last writer wins --------------------------------------------------------


def test_tombstone_ordering(store: Store) -> None:
    store.apply(b"k", put(b"v1", at=T))
    store.apply(b"k", tombstone(at=T + 10))
    older = store.apply(b"k", put(b"stale", at=T + 5))
    assert not older.applied and older.previous is not None and older.previous.is_tombstone
    newer = store.apply(b"k", put(b"v2", at=T + 20))
    assert newer.applied
    assert store.get(b"k") == put(b"v2", at=T + 20)


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_out_of_order_versions_converge_on_the_newest(store: Store, order: tuple[int, ...]) -> None:
    records = [put(f"v{i}".encode(), at=T + i) if i != 2 else tombstone(at=T + i) for i in range(4)]
    newest_so_far = -1
    for i in order:
        result = store.apply(b"k", records[i])
        assert result.applied == (i > newest_so_far)
        newest_so_far = max(newest_so_far, i)
    assert store.get(b"k") == records[3]
    assert store.live_count() == 1


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_apply_many_is_apply_in_order_within_one_batch(store: Store, order: tuple[int, ...]) -> None:
    records = [put(f"v{i}".encode(), at=T + i) if i != 2 else tombstone(at=T + i) for i in range(4)]
    store.apply(b"other", put(b"before", at=T))
    results = store.apply_many([(b"k", records[i]) for i in order] + [(b"other", put(b"after", at=T + 1))])
    newest_so_far = -1
    for i, result in zip(order, results[:-1], strict=True):  # the last result is the other key's
        assert result.applied == (i > newest_so_far)
        newest_so_far = max(newest_so_far, i)
    assert results[-1].applied and results[-1].previous == put(b"before", at=T)
    assert store.get(b"k") == records[3]
    assert store.get(b"other") == put(b"after", at=T + 1)
    assert store.live_count() == 2
    assert store.apply_many([(b"k", records[0])])[0].applied is False  # older than stored: nothing to commit


def test_an_equal_version_is_not_applied(store: Store) -> None:
    first = put(b"v1", at=T)
    store.apply(b"k", first)
    same_version = Record(version=first.version, value=b"other")
    result = store.apply(b"k", same_version)
    assert not result.applied and result.previous == first
    assert store.get(b"k") == first


def test_the_node_id_breaks_ties_between_equal_timestamps(store: Store) -> None:
    store.apply(b"k", put(b"from-b", at=T, node="b"))
    assert not store.apply(b"k", put(b"from-a", at=T, node="a")).applied
    assert store.apply(b"k", put(b"from-c", at=T, node="c")).applied
    assert store.get(b"k") == put(b"from-c", at=T, node="c")


def test_the_logical_counter_orders_writes_in_the_same_millisecond(store: Store) -> None:
    later = Record(version=version(T, logical=2), value=b"later")
    store.apply(b"k", later)
    assert not store.apply(b"k", Record(version=version(T, logical=1), value=b"earlier")).applied
    assert store.get(b"k") == later


# -- TTL: expiry is a version -------------------------------------------------


def test_an_expired_record_stays_a_dead_record_at_its_version(store: Store, clock: FakeClock) -> None:
    record = put(b"v", at=T, expires_at_ms=T + 1000)
    store.apply(b"k", record)
    digest = store.digest(0, 0)
    clock.advance(1000)
    stored = store.get(b"k")
    assert stored == record and not stored.live(clock())  # the reader judges liveness
    assert whole(store) == {b"k": record}
    assert store.digest(0, 0) == digest  # expiring changes no digest: replicas still agree


def test_an_expired_record_still_wins_over_an_older_live_one(store: Store, clock: FakeClock) -> None:
    store.apply(b"k", put(b"ttl", at=T, expires_at_ms=T + 10))
    clock.advance(10)
    # An older value (a replica that missed the TTL write, read repair, a
    # late hint) must not come back once the newer record has expired.
    result = store.apply(b"k", put(b"older", at=T - 5))
    assert not result.applied and result.previous == put(b"ttl", at=T, expires_at_ms=T + 10)
    assert store.sweep(clock()) == 1  # turned into a tombstone at its version
    dead = store.get(b"k")
    assert dead is not None and dead.is_tombstone and dead.version == version(T)
    assert not store.apply(b"k", put(b"older", at=T - 5)).applied
    assert store.apply(b"k", put(b"newer", at=T + 20)).applied


def test_an_already_expired_record_is_stored_as_the_dead_version_it_is(store: Store) -> None:
    older = put(b"old", at=T - 20)
    store.apply(b"k", older)
    expired = put(b"v", at=T - 10, expires_at_ms=T)
    result = store.apply(b"k", expired)
    assert result.applied and result.previous == older
    assert store.get(b"k") == expired
    assert store.live_count() == 1  # counted until the sweep turns it
    assert store.sweep(T) == 1
    assert store.live_count() == 0


def test_overwriting_with_a_ttl_and_without_one(store: Store, clock: FakeClock) -> None:
    store.apply(b"k", put(b"v1", at=T, expires_at_ms=T + 10))
    store.apply(b"k", put(b"v2", at=T + 1))  # the newer write has no TTL: it stays
    clock.advance(100)
    assert store.get(b"k") == put(b"v2", at=T + 1)
    assert store.sweep(clock()) == 0
    store.apply(b"k", put(b"v3", at=T + 2, expires_at_ms=T + 200))
    clock.advance(100)
    assert store.sweep(clock()) == 1
    dead = store.get(b"k")
    assert dead is not None and dead.is_tombstone and dead.version == version(T + 2)


# -- sweep -------------------------------------------------------------------


def test_sweep_turns_expired_records_into_tombstones_then_purges_them_after_the_grace(
    store: Store, clock: FakeClock
) -> None:
    grace_ms = int(GRACE_S * 1000)
    for i in range(10):
        store.apply(KEYS[i], put(b"v", at=T, expires_at_ms=T + 100 * (i + 1)))
    store.apply(b"forever", put(b"v", at=T))
    assert store.sweep(T + 450) == 4
    assert store.sweep(T + 450) == 0
    assert len(whole(store)) == 11
    assert sum(r.is_tombstone for r in whole(store).values()) == 4
    assert store.live_count() == 7
    assert store.sweep(T + 10_000) == 6
    # The grace counts from each record's expiry, not from its write.
    assert store.sweep(T + 400 + grace_ms) == 4
    assert store.sweep(T + 1000 + grace_ms) == 6
    assert whole(store) == {b"forever": put(b"v", at=T)}


def test_sweep_purges_tombstones_only_after_their_grace(store: Store, clock: FakeClock) -> None:
    grace_ms = int(GRACE_S * 1000)
    store.apply(b"old", tombstone(at=T))
    store.apply(b"young", tombstone(at=T + 1000))
    store.apply(b"value", put(b"v", at=T))
    assert store.sweep(T + grace_ms - 1) == 0
    assert store.sweep(T + grace_ms) == 1
    clock.advance(grace_ms)
    assert store.get(b"old") is None
    young = store.get(b"young")
    assert young is not None and young.is_tombstone
    assert store.sweep(T + grace_ms + 1000) == 1
    assert set(whole(store)) == {b"value"}


def test_a_purged_tombstone_lets_any_write_in_again(store: Store) -> None:
    store.apply(b"k", tombstone(at=T))
    store.sweep(T + int(GRACE_S * 1000))
    assert store.apply(b"k", put(b"v", at=T - 1)).applied


def test_sweep_in_many_batches(make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lmdb_store, "LMDB_SWEEP_BATCH", 7)
    monkeypatch.setattr(rocksdb_store, "ROCKSDB_SWEEP_BATCH", 7)
    store = make_store()
    for key in KEYS[:50]:
        store.apply(key, put(b"v", at=T, expires_at_ms=T + 5))
    for key in KEYS[50:80]:
        store.apply(key, tombstone(at=T))
    assert store.sweep(T + int(GRACE_S * 1000)) == 80  # 50 expired values turned, 30 tombstones purged
    assert store.live_count() == 0 and len(whole(store)) == 50
    assert store.sweep(T + 5 + int(GRACE_S * 1000)) == 50
    assert whole(store) == {}


# -- iteration by ring arc ---------------------------------------------------


def _fill(store: Store, keys: list[bytes]) -> dict[bytes, Record]:
    records = {key: put(key + b"-value", at=T) for key in keys}
    for key, record in records.items():
        store.apply(key, record)
    return records


def _arcs(keys: list[bytes]) -> list[tuple[int, int]]:
    hashes = sorted(stable_hash(key) for key in keys)
    lo, mid, hi = hashes[10], hashes[len(hashes) // 2], hashes[-10]
    return [
        (lo, hi),  # plain
        (lo - 1, lo),  # just the key at lo: the end is inclusive
        (lo, lo + 1),  # empty: the start is exclusive
        (hi, lo),  # wraps past zero
        (mid, mid),  # the whole circle, cut at mid
        (0, 0),
        (HASH_SPACE - 1, HASH_SPACE - 1),
        (HASH_SPACE - 1, 0),  # only hash 0
        (HASH_SPACE - 2, HASH_SPACE - 1),
        (0, HASH_SPACE - 1),  # everything but hash 0
    ]


def test_iter_range_returns_exactly_the_keys_on_the_arc(store: Store) -> None:
    records = _fill(store, KEYS)
    for start, end in _arcs(KEYS):
        expected = {key: record for key, record in records.items() if in_arc(stable_hash(key), start, end)}
        assert dict(store.iter_range(start, end)) == expected, (start, end)


def test_iter_range_includes_tombstones_and_expired_records(store: Store) -> None:
    store.apply(b"gone", tombstone(at=T))
    store.apply(b"dead", put(b"v", at=T - 10, expires_at_ms=T))
    store.apply(b"ttl", put(b"v", at=T - 10, expires_at_ms=T + 1))
    assert set(whole(store)) == {b"gone", b"dead", b"ttl"}


def test_iter_range_crosses_scan_chunks(make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lmdb_store, "LMDB_SCAN_CHUNK", 3)
    monkeypatch.setattr(rocksdb_store, "ROCKSDB_SCAN_CHUNK", 3)
    store = make_store()
    records = _fill(store, KEYS)
    assert whole(store) == records
    for start, end in _arcs(KEYS):
        assert {key for key, _ in store.iter_range(start, end)} == {
            key for key in records if in_arc(stable_hash(key), start, end)
        }


def test_iter_range_survives_writes_while_iterating(store: Store) -> None:
    _fill(store, KEYS)
    seen = 0
    for i, _ in enumerate(store.iter_range(0, 0)):
        store.apply(f"new-{i}".encode(), put(b"v", at=T))
        seen += 1
    assert seen >= len(KEYS)


# -- digest ------------------------------------------------------------------


def test_digest_is_independent_of_write_order(make_store: StoreFactory, tmp_path: Path) -> None:
    a, b = make_store(path=tmp_path / "a"), make_store(path=tmp_path / "b")
    records = [(key, put(key, at=T + i)) for i, key in enumerate(KEYS)]
    for key, record in records:
        a.apply(key, record)
    shuffled = records[:]
    random.Random(7).shuffle(shuffled)
    for key, record in shuffled:
        b.apply(key, record)
    for start, end in _arcs(KEYS):
        assert a.digest(start, end) == b.digest(start, end)
    assert a.digest(0, 0) == a.digest(0, 0)  # stable on repeat


def test_digest_changes_with_any_version(store: Store) -> None:
    _fill(store, KEYS)
    before = store.digest(0, 0)
    key = KEYS[17]
    store.apply(key, put(key + b"-value", at=T + 1))  # same value, newer version
    after_put = store.digest(0, 0)
    store.apply(key, tombstone(at=T + 2))
    after_delete = store.digest(0, 0)
    store.apply(b"brand-new", put(b"v", at=T))
    after_insert = store.digest(0, 0)
    assert len({before, after_put, after_delete, after_insert}) == 4


def test_digest_only_covers_its_arc(store: Store) -> None:
    _fill(store, KEYS)
    hashes = sorted(stable_hash(key) for key in KEYS)
    inside, outside = hashes[50], hashes[150]
    arc = (hashes[40], hashes[60])
    before = store.digest(*arc)
    store.apply(next(k for k in KEYS if stable_hash(k) == outside), tombstone(at=T + 1))
    assert store.digest(*arc) == before
    store.apply(next(k for k in KEYS if stable_hash(k) == inside), tombstone(at=T + 1))
    assert store.digest(*arc) != before


def test_digests_of_adjacent_arcs_combine(store: Store) -> None:
    _fill(store, KEYS)
    cut = sorted(stable_hash(key) for key in KEYS)[100]
    left, right = store.digest(0, cut), store.digest(cut, 0)
    combined = bytes(x ^ y for x, y in zip(left, right, strict=True))
    assert combined == store.digest(0, 0)
    assert store.digest(cut, cut) == store.digest(0, 0)


def test_every_engine_computes_the_same_digest(tmp_path: Path) -> None:
    memory = MemoryStore(tombstone_grace_s=GRACE_S)
    stores: list[Store] = [
        kind(
            path=str(tmp_path / kind.__name__),
            node_id="n1",
            fsync="never",
            fsync_window_ms=5,
            tombstone_grace_s=GRACE_S,
        )
        for kind in (LmdbStore, RocksDbStore)
    ]
    try:
        for i, key in enumerate(KEYS):
            record = tombstone(at=T + i) if i % 5 == 0 else put(key, at=T + i, node=f"n{i % 3}")
            for store in (memory, *stores):
                store.apply(key, record)
        for start, end in _arcs(KEYS):
            assert memory.digest(start, end) == stores[0].digest(start, end) == stores[1].digest(start, end)
        assert memory.digest(0, 0) != bytes(16)
    finally:
        for store in stores:
            store.close()


# -- the high-water mark --------------------------------------------------------


def ceiling_over(store: Store, wall_ms: int) -> None:
    """The store's high water is at or above the version at wall_ms, and within the step of it."""
    assert version(wall_ms).hlc <= store.high_water() <= version(wall_ms + durable.HIGH_WATER_STEP_MS).hlc


def test_high_water_is_at_or_just_above_the_largest_version_ever_applied(store: Store) -> None:
    assert store.high_water() == 0
    store.apply(b"a", put(b"v", at=T + 5))
    store.apply_many([(b"b", put(b"v", at=T + 9)), (b"c", tombstone(at=T + 7))])
    ceiling_over(store, T + 9)
    mark = store.high_water()
    store.apply(b"b", put(b"stale", at=T + 1))  # not applied: no new high
    store.apply(b"d", put(b"v", at=T + 2))  # applied, but lower
    store.discard(b"b", version(T + 9))  # forgetting a record does not lower it
    store.sweep(T + 10**9)
    assert store.high_water() == mark
    store.apply(b"e", put(b"v", at=T + 5000))
    ceiling_over(store, T + 5000)


@durable_only
def test_high_water_survives_a_reopen(make_store: StoreFactory, engine: str) -> None:
    store = make_store(fsync="batch")
    store.apply(b"k", put(b"v", at=T + 42))
    mark = store.high_water()
    store.close()
    again = make_store(fsync="batch")
    assert again.high_water() == mark
    ceiling_over(again, T + 42)


@durable_only
def test_a_data_dir_without_a_high_water_mark_gets_one_from_its_records(
    make_store: StoreFactory, engine: str, tmp_path: Path
) -> None:
    store = make_store(fsync="batch")
    _fill(store, KEYS[:50])
    store.apply(b"newest", tombstone(at=T + 77))
    store.close()
    forget_meta(engine, tmp_path / "data", b"high_water")  # as a build before the mark wrote it
    assert make_store(fsync="batch").high_water() == version(T + 77).hlc


def forget_meta(engine: str, path: Path, name: bytes) -> None:
    """Delete a meta entry of a closed durable store, under the engine's own library."""
    if engine == "lmdb":
        env = lmdb.open(str(path), max_dbs=4)
        with env.begin(write=True, db=env.open_db(b"meta")) as txn:
            assert txn.delete(name)
        env.close()
        return
    families = {cf: rocksdict.Options(raw_mode=True) for cf in ("expiry", "tombstones", "meta")}
    db = rocksdict.Rdict(str(path), rocksdict.Options(raw_mode=True), column_families=families)
    meta = db.get_column_family("meta")
    assert meta.get(name) is not None
    meta.delete(name)
    del meta
    db.close()


@pytest.mark.parametrize("engine", ["rocksdb"])
def test_a_live_count_lost_from_meta_is_counted_again(make_store: StoreFactory, engine: str, tmp_path: Path) -> None:
    store = make_store()
    _fill(store, KEYS[:30])
    store.apply(KEYS[0], tombstone(at=T + 1))
    store.close()
    forget_meta(engine, tmp_path / "data", b"live_count")
    assert make_store().live_count() == 29


# -- live_count --------------------------------------------------------------


def test_live_count_follows_puts_overwrites_deletes_and_expiry(store: Store, clock: FakeClock) -> None:
    assert store.live_count() == 0
    for key in KEYS[:5]:
        store.apply(key, put(b"v", at=T))
    assert store.live_count() == 5
    store.apply(KEYS[0], put(b"v2", at=T + 1))  # overwrite
    store.apply(KEYS[1], put(b"stale", at=T - 1))  # rejected
    assert store.live_count() == 5
    store.apply(KEYS[2], tombstone(at=T + 1))  # delete
    store.apply(KEYS[3], tombstone(at=T + 1))
    store.apply(b"never-written", tombstone(at=T + 1))
    assert store.live_count() == 3
    store.apply(KEYS[2], put(b"back", at=T + 2))  # re-put after delete
    assert store.live_count() == 4
    store.apply(b"ttl-1", put(b"v", at=T, expires_at_ms=T + 10))
    store.apply(b"ttl-2", put(b"v", at=T, expires_at_ms=T + 10))
    assert store.live_count() == 6
    clock.advance(10)
    store.apply(b"ttl-2", put(b"fresh", at=T + 3))  # replaces an expired, unswept value
    store.sweep(clock())
    assert store.live_count() == 5
    assert store.live_count() == sum(1 for _, r in store.iter_range(0, 0) if r.live(clock()))


# -- durability policy -------------------------------------------------------


@pytest.mark.parametrize("fsync", ["always", "batch", "never"])
def test_wait_durable_per_fsync_policy(make_store: StoreFactory, engine: str, fsync: str) -> None:
    store = make_store(fsync=fsync)
    store.apply(b"k", put(b"v", at=T))
    waiter = store.wait_durable()
    if engine != "memory" and fsync == "always":
        assert waiter is not None
        assert waiter.result(timeout=10) is None
        # Nothing written since: the next wait is already done.
        already = store.wait_durable()
        assert already is not None and already.done()
    else:
        assert waiter is None
    store.sync()


def test_sync_stats_count_each_sync_and_the_records_it_made_durable(make_store: StoreFactory, engine: str) -> None:
    store = make_store(fsync="never")  # no thread: only the explicit syncs below
    if engine == "memory":
        assert store.sync_stats() is None  # nothing is ever synced
        return
    store.apply_many([(KEYS[0], put(b"v", at=T)), (KEYS[1], put(b"v", at=T)), (KEYS[2], put(b"v", at=T))])
    store.apply(KEYS[0], put(b"old", at=T - 1))  # not applied: nothing to make durable
    store.sync()
    stats = store.sync_stats()
    assert stats is not None and (stats.syncs, stats.synced_writes) == (1, 3)
    store.apply(KEYS[0], tombstone(at=T + 1))
    store.sync()
    stats = store.sync_stats()
    assert stats is not None and (stats.syncs, stats.synced_writes) == (2, 4) and stats.sync_seconds > 0


@durable_only
def test_a_waiter_that_gives_up_does_not_break_group_commit(make_store: StoreFactory, engine: str) -> None:
    store = make_store(fsync="always")
    store.apply(b"a", put(b"v", at=T))
    abandoned = store.wait_durable()
    assert abandoned is not None
    assert not abandoned.cancel()  # what asyncio.wrap_future does when its task is cancelled
    store.apply(b"b", put(b"v", at=T))
    later = store.wait_durable()
    assert later is not None and later.result(timeout=10) is None
    assert abandoned.result(timeout=10) is None


async def test_wait_durable_under_asyncio_wrap_future(make_store: StoreFactory, engine: str) -> None:
    import asyncio  # the coordinator's side of the contract; storage itself never imports it

    store = make_store(fsync="always")

    async def write(i: int) -> None:
        store.apply(f"k{i}".encode(), put(b"v", at=T))
        waiter = store.wait_durable()
        if waiter is not None:
            await asyncio.wrap_future(waiter)

    await asyncio.gather(*(write(i) for i in range(32)))
    assert store.live_count() == 32


def test_group_commit_serves_many_concurrent_writers(make_store: StoreFactory, engine: str) -> None:
    store = make_store(fsync="always")
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(20):
                store.apply(f"w{n}-{i}".encode(), put(b"v", at=T + i))
                waiter = store.wait_durable()
                if waiter is not None:
                    waiter.result(timeout=10)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert store.live_count() == 160


# -- LMDB: restarts and identity ---------------------------------------------


@durable_only
def test_everything_survives_a_reopen(make_store: StoreFactory, engine: str, clock: FakeClock) -> None:
    store = make_store(fsync="batch")
    records = _fill(store, KEYS[:100])
    store.apply(KEYS[0], tombstone(at=T + 1))
    store.apply(b"ttl", put(b"v", at=T, expires_at_ms=T + 100))
    digest = store.digest(0, 0)
    store.close()

    again = make_store(fsync="batch")
    assert again.live_count() == 100
    assert again.get(KEYS[5]) == records[KEYS[5]]
    old = again.get(KEYS[0])
    assert old is not None and old.is_tombstone
    assert again.digest(0, 0) == digest
    assert not again.apply(KEYS[0], put(b"stale", at=T)).applied
    # The expiry and tombstone indexes came back too: the sweep still finds them.
    clock.advance(int(GRACE_S * 1000) + 1)
    assert again.sweep(clock()) == 2
    assert again.live_count() == 99


@durable_only
def test_a_data_dir_refuses_another_node_id(make_store: StoreFactory, engine: str, tmp_path: Path) -> None:
    make_store(node_id="n1").close()
    with pytest.raises(NodeIdMismatchError, match="belongs to node 'n1', not 'n2'"):
        make_store(node_id="n2")
    assert make_store(node_id="n1").get(b"k") is None  # the owner still opens it


@durable_only
def test_a_data_dir_is_used_by_one_open_store_at_a_time(make_store: StoreFactory, engine: str) -> None:
    first = make_store()
    with pytest.raises(StorageError, match=r"in use by another process \(pid \d+\)"):
        make_store()
    first.close()
    make_store().apply(b"k", put(b"v", at=T))


@durable_only
def test_a_closed_store_raises_storage_errors(make_store: StoreFactory, engine: str) -> None:
    store = make_store()
    store.close()
    with pytest.raises(StorageError):
        store.get(b"k")
    with pytest.raises(StorageError):
        store.apply(b"k", put(b"v", at=T))
    store.close()  # idempotent


def test_open_store_picks_the_engine(tmp_path: Path) -> None:
    memory = open_store(NodeConfig.from_options({"node_id": "n1"}))
    assert isinstance(memory, MemoryStore)
    memory.close()
    default = open_store(NodeConfig.from_options({"node_id": "n1", "data_dir": str(tmp_path), "fsync": "always"}))
    try:
        assert isinstance(default, LmdbStore)
        assert default.wait_durable() is not None
    finally:
        default.close()
    rocks_dir = str(tmp_path / "rocks")
    rocks = open_store(NodeConfig.from_options({"node_id": "n1", "data_dir": rocks_dir, "storage": "rocksdb"}))
    assert isinstance(rocks, RocksDbStore)
    rocks.close()
    # Without --storage, an existing data dir opens with the engine that wrote it.
    again = open_store(NodeConfig.from_options({"node_id": "n1", "data_dir": rocks_dir}))
    assert isinstance(again, RocksDbStore)
    again.close()


@pytest.mark.parametrize(("written", "asked"), [("lmdb", "rocksdb"), ("rocksdb", "lmdb")])
def test_a_data_dir_is_never_opened_by_the_other_engine(tmp_path: Path, written: str, asked: str) -> None:
    path = str(tmp_path / "data")
    open_store(NodeConfig.from_options({"node_id": "n1", "data_dir": path, "storage": written})).close()
    before = sorted(p.name for p in (tmp_path / "data").iterdir())
    config = NodeConfig.from_options({"node_id": "n1", "data_dir": path, "storage": asked})
    message = rf"holds a {written} store, not {asked}: start the node with --storage {written}"
    with pytest.raises(ConfigError, match=message):
        check_data_dir(config)
    with pytest.raises(ConfigError, match=message):
        open_store(config)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == before
