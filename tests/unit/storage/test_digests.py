"""The maintained digest index (app.storage.digests) against a full
recomputation: the pure index over random boundaries and records, and both
engines under random histories of applies (losing ones too), deletes, TTLs,
sweeps at advancing times, discards and re-cuts to random rings."""

from __future__ import annotations

import itertools
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import lmdb
import pytest
import rocksdict
from hypothesis import given, settings
from hypothesis import strategies as st

from app.errors import StorageFullError
from app.ring import HASH_SPACE, in_arc, stable_hash
from app.storage import LmdbStore, MemoryStore, Record, RocksDbStore, Store
from app.storage.base import record_fingerprint
from app.storage.digests import DigestIndex, Snapshot, split_arc, subarc_boundaries
from app.storage.durable import data_key_of, encode_record
from tests.unit.storage.fakes import START_MS, FakeClock, put, version

GRACE_S = 0.05  # 50 ms of fake time: histories cross it often
WAIT_S = 10.0  # a build of a few dozen records takes milliseconds; this only bounds a hang

tokens = st.integers(0, HASH_SPACE - 1)


def ring_arcs(points: list[int]) -> list[tuple[int, int]]:
    """The arcs of a ring with these tokens, as HashRing.ranges() cuts them."""
    bounds = sorted(set(points))
    return [(bounds[i - 1], bounds[i]) for i in range(len(bounds))]


def recomputed(store: Store, start: int, end: int) -> int:
    acc = 0
    for key, record in store.iter_range(start, end):
        acc ^= record_fingerprint(key, record)
    return acc


# -- the pure index ------------------------------------------------------------


def brute(pairs: list[tuple[int, int]], start: int, end: int) -> int:
    acc = 0
    for token, fp in pairs:
        if in_arc(token, start, end):
            acc ^= fp
    return acc


@settings(max_examples=200, deadline=None)
@given(
    bounds=st.lists(tokens, min_size=1, max_size=12),
    pairs=st.lists(st.tuples(tokens, st.integers(1, 2**128 - 1)), max_size=30),
    arcs=st.lists(st.tuples(tokens, tokens), max_size=6),
    recut=st.lists(tokens, min_size=1, max_size=12),
)
def test_the_index_answers_any_arc_as_a_full_recomputation(
    bounds: list[int], pairs: list[tuple[int, int]], arcs: list[tuple[int, int]], recut: list[int]
) -> None:
    index = DigestIndex(sorted(set(bounds)))
    index.absorb(pairs)
    # Arcs cut at boundaries (answered without a scan), across them, and arbitrary ones.
    b = index.boundaries
    queries = [*arcs, (b[0], b[-1]), (b[-1], b[0]), (b[0], b[0]), *((b[i - 1], b[i]) for i in range(len(b)))]
    for start, end in queries:
        acc, edges = index.range_digest(start, end)
        for edge in edges:
            acc ^= brute(pairs, *edge)
        assert acc == brute(pairs, start, end)
        if start in b and end in b and start != end:
            assert edges == []  # aligned: nothing to read
    scanned: list[tuple[int, int]] = []

    def scan(start: int, end: int) -> list[tuple[int, int]]:
        scanned.append((start, end))
        return [(t, fp) for t, fp in pairs if in_arc(t, start, end)]

    moved = index.realigned(sorted(set(recut)), scan)
    for i in range(len(moved.boundaries)):
        start, end = moved.boundaries[i - 1], moved.boundaries[i]
        assert moved.range_digest(start, end) == (brute(pairs, start, end), [])
    # Only intervals a new boundary cuts are read.
    assert all(end in b for _, end in scanned) and len(scanned) <= len(set(recut) - set(b))


@given(start=tokens, end=tokens, parts=st.integers(1, 32))
def test_sub_arcs_tile_their_arc(start: int, end: int, parts: int) -> None:
    pieces = split_arc(start, end, parts)
    assert pieces[0][0] == start and pieces[-1][1] == end
    assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))
    width = (end - start) % HASH_SPACE or HASH_SPACE
    assert sum((b - a) % HASH_SPACE or HASH_SPACE for a, b in pieces) == width
    assert len(pieces) == min(parts, width)


def test_boundaries_of_an_empty_ring_are_the_whole_circle() -> None:
    assert subarc_boundaries([], 16) == [0]


# -- the engines ---------------------------------------------------------------

keys = st.sampled_from([b"a", b"b", b"c", b"d", b"e", b"f"])
applies = st.tuples(
    st.just("apply"),
    keys,
    st.integers(0, 60),  # version wall offset, ms: older ones lose
    st.sampled_from(["x", "y"]),
    st.one_of(st.none(), st.binary(max_size=8)),  # None: a tombstone
    st.one_of(st.just(0), st.integers(-20, 100)),  # TTL offset from now, 0: none
)
steps = st.one_of(
    applies,
    applies,
    st.tuples(st.just("advance"), st.integers(1, 100)),
    st.tuples(st.just("sweep"), st.integers(0, 150)),  # after moving the clock: expiries, and purges past the grace
    st.tuples(st.just("discard"), keys),
    st.tuples(st.just("realign"), st.lists(tokens, min_size=1, max_size=6), st.integers(1, 4)),
    st.tuples(st.just("check"), tokens, tokens),
    st.tuples(st.just("reopen")),  # LMDB: closed (the index saved) and opened again (the index restored)
)


def run_history(store: Store, history: list[tuple], reopen: Callable[[Store], Store] | None = None) -> Store:
    """Play the history; returns the store (a new one if it was reopened)."""
    clock = FakeClock(START_MS)
    # Each re-cut is waited for, so that the writes after it are counted by
    # the maintained index, not by its build (test_writes_during_a_build_...
    # covers writes that race a build).
    store.align_digests(ring_arcs([0]))
    assert store.wait_digests(WAIT_S)
    for step in history:
        if step[0] == "apply":
            _, key, offset, node, value, ttl = step
            expires = max(0, clock() + ttl) if ttl else 0
            store.apply(key, Record(version=version(START_MS + offset, node=node), value=value, expires_at_ms=expires))
        elif step[0] == "advance":
            clock.advance(step[1])
        elif step[0] == "sweep":
            clock.advance(step[1])
            store.sweep(clock())
        elif step[0] == "discard":
            stored = store.get(step[1])
            if stored is not None:
                assert store.discard(step[1], stored.version)
        elif step[0] == "realign":
            _, points, parts = step
            store.align_digests([arc for arc in ring_arcs(points) for arc in split_arc(*arc, parts)])
            assert store.wait_digests(WAIT_S)
        elif step[0] == "reopen":
            if reopen is not None:
                store = reopen(store)
                assert store.digests_ready()  # restored, not rebuilt
        else:
            assert store.wait_digests(WAIT_S)
            _, start, end = step
            assert store.digest(start, end) == recomputed(store, start, end).to_bytes(16, "big")
    assert store.wait_digests(WAIT_S)
    index = store._digests.index()  # every interval of the index itself, not just sampled arcs
    assert index is not None
    for i, end in enumerate(index.boundaries):
        start = index.boundaries[i - 1]
        assert store.digest(start, end) == recomputed(store, start, end).to_bytes(16, "big")
    for key in (b"a", b"b", b"c", b"d", b"e", b"f"):
        token = stable_hash(key)
        assert store.digest(token - 1, token) == recomputed(store, token - 1, token).to_bytes(16, "big")
    return store


@settings(max_examples=40, deadline=None)
@given(st.lists(steps, max_size=40))
def test_memory_digests_stay_equal_to_a_full_recomputation(history: list[tuple]) -> None:
    store = MemoryStore(tombstone_grace_s=GRACE_S)
    try:
        run_history(store, history)
    finally:
        store.close()


DURABLE = {"lmdb": LmdbStore, "rocksdb": RocksDbStore}


@pytest.mark.parametrize("engine", DURABLE)
@settings(max_examples=40, deadline=None)
@given(history=st.lists(steps, max_size=40))
def test_durable_digests_stay_equal_to_a_full_recomputation(engine: str, history: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as path:
        current: Store

        def opened() -> Store:
            return DURABLE[engine](path=path, node_id="x", fsync="never", fsync_window_ms=5, tombstone_grace_s=GRACE_S)

        def reopen(store: Store) -> Store:
            nonlocal current
            store.close()
            current = opened()
            return current

        current = opened()
        try:
            run_history(current, history, reopen)
        finally:
            current.close()


class _HeldSnapshot(Snapshot):
    """A snapshot whose scan waits until the test has written more."""

    def __init__(self, inner: Snapshot, release: threading.Event, started: threading.Event) -> None:
        self._inner, self._release, self._started = inner, release, started

    def scan(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        self._started.set()
        assert self._release.wait(WAIT_S)
        yield from self._inner.scan(start, end)


def test_writes_during_a_build_are_counted_once() -> None:
    store = MemoryStore(tombstone_grace_s=60)
    release, started = threading.Event(), threading.Event()
    inner = store._snapshot  # the seam the index builds from
    store._digests._snapshot = lambda: _HeldSnapshot(inner(), release, started)
    for i in range(20):
        store.apply(f"k{i}".encode(), put(b"old", at=START_MS + i))
    try:
        store.align_digests(ring_arcs([1 << 62, 1 << 63]))
        assert started.wait(WAIT_S)
        for i in range(10, 30):  # over-writes of snapshotted records, and new ones
            store.apply(f"k{i}".encode(), put(b"new", at=START_MS + 100 + i))
        stored = store.get(b"k0")
        assert stored is not None and store.discard(b"k0", stored.version)
        release.set()
        assert store.wait_digests(WAIT_S)
        assert store.digest(0, 0) == recomputed(store, 0, 0).to_bytes(16, "big")
        assert store.digest(1 << 62, 1 << 63) == recomputed(store, 1 << 62, 1 << 63).to_bytes(16, "big")
    finally:
        release.set()
        store.close()


def test_a_refused_lmdb_commit_leaves_the_digests_alone(tmp_path: Path) -> None:
    if True:
        store = LmdbStore(
            path=str(tmp_path), node_id="n1", fsync="never", fsync_window_ms=5, tombstone_grace_s=60, map_size=256 << 10
        )
        try:
            store.align_digests(ring_arcs([0]))
            assert store.wait_digests(WAIT_S)
            refused = False
            for i in range(1000):
                try:
                    store.apply_many([(f"k{i}-{j}".encode(), put(b"v" * 4096, at=START_MS + i)) for j in range(3)])
                except StorageFullError:
                    refused = True
                    break
            assert refused
            assert store.digest(0, 0) == recomputed(store, 0, 0).to_bytes(16, "big")
            assert store.digest(0, 0) != bytes(16)
        finally:
            store.close()


def write_behind_its_back(engine: str, path: Path, key: bytes, record: Record) -> None:
    """A write by another build of the program (one that knows nothing of the saved index)."""
    if engine == "lmdb":
        env = lmdb.open(str(path), max_dbs=4)
        with env.begin(write=True, db=env.open_db(b"data")) as txn:
            txn.put(data_key_of(key), encode_record(record))
        env.close()
        return
    families = {cf: rocksdict.Options(raw_mode=True) for cf in ("expiry", "tombstones", "meta")}
    db = rocksdict.Rdict(str(path), rocksdict.Options(raw_mode=True), column_families=families)
    db.put(data_key_of(key), encode_record(record))
    db.close()


@pytest.mark.parametrize("engine", DURABLE)
def test_a_saved_index_is_dropped_once_anything_wrote_after_it(tmp_path: Path, engine: str) -> None:
    def opened() -> Store:
        return DURABLE[engine](path=str(tmp_path), node_id="n1", fsync="never", fsync_window_ms=5, tombstone_grace_s=60)

    store = opened()
    store.align_digests(ring_arcs([0, 1 << 63]))
    assert store.wait_digests(WAIT_S)
    store.apply(b"a", put(b"1", at=START_MS))
    store.close()
    reopened = opened()
    assert reopened.digests_ready()  # nothing wrote after it: restored, no scan
    reopened.close()
    write_behind_its_back(engine, tmp_path, b"b", put(b"2", at=START_MS + 1))
    store = opened()
    try:
        assert not store.digests_ready()  # stale: rebuilt from the records instead
        store.align_digests(ring_arcs([0, 1 << 63]))
        assert store.wait_digests(WAIT_S)
        assert store.digest(0, 0) == recomputed(store, 0, 0).to_bytes(16, "big")
    finally:
        store.close()
