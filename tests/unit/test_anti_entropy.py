"""Anti-entropy over the maintained digests (app.cluster.anti_entropy): a round in
which nothing differs reads no records on either side, and a round with one
differing key reads only the records of that key's sub-arc (the Merkle level).
Real nodes over the in-process peer client; the stores count their reads."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.cluster.node import Node
from app.cluster.replica import FULL_SCAN_ABOVE_ARCS
from app.config import DIGEST_SUBARCS
from app.errors import RingDiffersError
from app.ring import HASH_SPACE, in_arc, stable_hash
from app.storage.base import Record
from tests.unit.in_process import InProcessCluster, members

KEYS = [f"k{i}".encode() for i in range(600)]


class ReadCounter:
    """Counts every record a store's reads touch (iter_range, get)."""

    def __init__(self, node: Node) -> None:
        self.ranges: list[tuple[int, int]] = []
        self.records = 0
        self.gets = 0
        store = node.store
        iter_range, get = store.iter_range, store.get

        def counted_range(start: int, end: int) -> Iterator[tuple[bytes, Record]]:
            self.ranges.append((start, end))
            for item in iter_range(start, end):
                self.records += 1
                yield item

        def counted_get(key: bytes) -> Record | None:
            self.gets += 1
            return get(key)

        store.iter_range = counted_range
        store.get = counted_get


async def three_nodes_in_sync(cluster: InProcessCluster) -> None:
    await cluster.start_holding(["a", "b", "c"], KEYS)


async def test_a_round_in_which_nothing_differs_reads_no_records(cluster: InProcessCluster) -> None:
    await three_nodes_in_sync(cluster)
    here, there = ReadCounter(cluster.nodes["c"]), ReadCounter(cluster.nodes["a"])
    assert await cluster.nodes["c"].anti_entropy.compare_with("a") == 0
    assert cluster.nodes["c"].metrics.ae_ranges_compared._value.get() > 0  # the arcs were compared
    assert (here.ranges, here.gets, there.ranges, there.gets) == ([], 0, [], 0)


async def test_one_differing_key_moves_only_its_sub_arc(cluster: InProcessCluster) -> None:
    await three_nodes_in_sync(cluster)
    c = cluster.nodes["c"]
    key = KEYS[7]
    c.store.apply(key, Record(version=c.clock.now(), value=b"newer"))  # only c has it
    here, there = ReadCounter(c), ReadCounter(cluster.nodes["a"])

    assert await c.anti_entropy.compare_with("a") == 1  # pushed to a
    assert cluster.nodes["a"].store.get(key).value == b"newer"

    token = stable_hash(key)
    arc = next(arc for arc in c.topology.current.ring.ranges() if in_arc(token, *arc))
    arc_width = (arc[1] - arc[0]) % HASH_SPACE
    for counter in (here, there):
        assert counter.ranges, "the differing sub-arc was read"
        for start, end in counter.ranges:
            assert in_arc(token, start, end)
            assert (end - start) % HASH_SPACE <= arc_width // DIGEST_SUBARCS + 1
    in_sub_arc = sum(in_arc(stable_hash(k), *here.ranges[0]) for k in KEYS)
    assert here.records == in_sub_arc and there.records == in_sub_arc
    assert in_sub_arc < len(KEYS) // 50


async def test_a_peer_still_building_its_index_refuses_a_round_and_stays_up(cluster: InProcessCluster) -> None:
    """A node whose digest index is not built yet (after a crash, at open)
    would have to read its whole store to answer a round's many arcs; it
    refuses instead, reads nothing, and its peers keep it up for clients."""
    await three_nodes_in_sync(cluster)
    a, c = cluster.nodes["a"], cluster.nodes["c"]
    c.store.apply(KEYS[3], Record(version=c.clock.now(), value=b"newer"))  # a round would repair this
    a.store.digests_ready = lambda: False
    there = ReadCounter(a)
    rounds = c.metrics.ae_rounds._value.get()

    assert await c.anti_entropy.compare_with("a") == 0
    assert (there.ranges, there.gets) == ([], 0)
    assert c.metrics.ae_rounds._value.get() == rounds  # skipped, not counted as compared
    assert c.health.is_up("a")
    # A few arcs (a rebalancing or surplus chunk) are still answered, by reading only them.
    arcs = c.anti_entropy.shared_arcs("a")[:FULL_SCAN_ABOVE_ARCS]
    assert a.replica.digests(arcs) == [c.store.digest(*arc) for arc in arcs]

    del a.store.digests_ready  # built: the next round repairs
    assert await c.anti_entropy.compare_with("a") == 1
    assert a.store.get(KEYS[3]).value == b"newer"


class DigestCounter:
    """Counts the arc digests a node's replica computes."""

    def __init__(self, node: Node) -> None:
        self.arcs = 0
        digests = node.replica.digests

        def counted(arcs: list[tuple[int, int]]) -> list[bytes]:
            self.arcs += len(arcs)
            return digests(arcs)

        node.replica.digests = counted


async def test_a_quiet_round_is_one_request_and_an_unchanged_store_computes_nothing(cluster: InProcessCluster) -> None:
    """The Merkle root first: one combined digest per side, kept until the
    store changes; arcs are compared one by one only when the roots differ."""
    await three_nodes_in_sync(cluster)
    a, c = cluster.nodes["a"], cluster.nodes["c"]
    assert await c.anti_entropy.compare_with("a") == 0  # computes and caches both sides' roots
    cluster.peer_client.calls.clear()
    here, there = DigestCounter(c), DigestCounter(a)
    assert await c.anti_entropy.compare_with("a") == 0
    assert cluster.peer_client.calls == [("a", "shared-digest")]
    assert (here.arcs, there.arcs) == (0, 0)  # nothing changed since: both roots came from the cache

    c.store.apply(KEYS[5], Record(version=c.clock.now(), value=b"newer"))  # a change invalidates c's root
    assert await c.anti_entropy.compare_with("a") == 1
    assert a.store.get(KEYS[5]).value == b"newer"
    assert ("a", "digests") in cluster.peer_client.calls  # roots differed: compared arc by arc
    assert here.arcs > 0


async def test_a_peer_on_another_ring_is_compared_arc_by_arc(cluster: InProcessCluster) -> None:
    await three_nodes_in_sync(cluster)
    a, c = cluster.nodes["a"], cluster.nodes["c"]
    with pytest.raises(RingDiffersError):
        await a.anti_entropy.answer_shared_digest("c", "another-ring/3")
    await a.apply_membership(members("a", "b", "c", "d"), propagate=False)  # only a knows d
    await cluster.settle()
    c.store.apply(KEYS[9], Record(version=c.clock.now(), value=b"newer"))
    cluster.peer_client.calls.clear()
    assert await c.anti_entropy.compare_with("a") == 1
    assert cluster.peer_client.calls[0] == ("a", "shared-digest") and ("a", "digests") in cluster.peer_client.calls
    assert a.store.get(KEYS[9]).value == b"newer"
