"""Differential test: random histories of writes, deletes, TTLs, clock moves and
sweeps leave the memory, LMDB and RocksDB engines in the same observable
state, and all match a plain last-writer-wins model in which expiry is a version: an
expired record wins like any other until the sweep turns it into a tombstone
and, after the grace, purges it."""

from __future__ import annotations

import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.storage import LmdbStore, MemoryStore, Record, RocksDbStore
from tests.unit.storage.fakes import START_MS, FakeClock, version

GRACE_S = 0.05  # 50 ms of fake time: histories cross it often

keys = st.sampled_from([b"a", b"b", b"c", b"d"])
writes = st.tuples(
    st.just("apply"),
    keys,
    st.integers(0, 200),  # version wall offset, ms
    st.sampled_from(["x", "y"]),  # node id
    st.one_of(st.none(), st.binary(max_size=8)),  # None: a tombstone
    st.one_of(st.just(0), st.integers(-20, 200)),  # TTL offset from now, 0: none
)
moves = st.tuples(st.just("advance"), st.integers(1, 80))
sweeps = st.tuples(st.just("sweep"))
histories = st.lists(st.one_of(writes, writes, moves, sweeps), max_size=40)


@pytest.mark.parametrize("engine", [LmdbStore, RocksDbStore], ids=["lmdb", "rocksdb"])
@settings(max_examples=60, deadline=None)
@given(history=histories)
def test_memory_and_a_durable_engine_agree(engine: type[LmdbStore] | type[RocksDbStore], history: list[tuple]) -> None:
    clock = FakeClock(START_MS)
    with tempfile.TemporaryDirectory() as path:
        memory = MemoryStore(tombstone_grace_s=GRACE_S)
        durable = engine(path=path, node_id="x", fsync="never", fsync_window_ms=5, tombstone_grace_s=GRACE_S)
        model: dict[bytes, Record] = {}
        try:
            for step in history:
                if step[0] == "apply":
                    _, key, offset, node, value, ttl = step
                    expires = max(0, clock() + ttl) if ttl else 0
                    record = Record(version=version(START_MS + offset, node=node), value=value, expires_at_ms=expires)
                    a, b = memory.apply(key, record), durable.apply(key, record)
                    assert a == b
                    current = model.get(key)
                    expect = current is None or record.version > current.version
                    assert a.applied == expect and a.previous == current
                    if expect:
                        model[key] = record
                elif step[0] == "advance":
                    clock.advance(step[1])
                else:
                    changed = memory.sweep(clock())
                    assert durable.sweep(clock()) == changed
                    turned = [k for k, r in model.items() if r.value is not None and r.expired(clock())]
                    for k in turned:
                        model[k] = Record(version=model[k].version, value=None, expires_at_ms=model[k].expires_at_ms)
                    grace_ms = int(GRACE_S * 1000)
                    doomed = [k for k, r in model.items() if r.value is None and r.dead_since_ms + grace_ms <= clock()]
                    assert len(turned) + len(doomed) == changed
                    for k in doomed:
                        del model[k]
                for key in (b"a", b"b", b"c", b"d"):
                    assert memory.get(key) == durable.get(key) == model.get(key)
                assert dict(durable.iter_range(0, 0)) == model
                assert dict(memory.iter_range(0, 0)) == model
                assert memory.live_count() == durable.live_count()
                assert memory.digest(0, 0) == durable.digest(0, 0)
                assert memory.high_water() <= durable.high_water()  # the durable engines keep a ceiling a step above
        finally:
            durable.close()
