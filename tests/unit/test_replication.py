"""Replication machinery over in-process nodes (real Node objects, the fake
transport, no sockets): sloppy quorum and hints, read repair, anti-entropy,
rebalancing after a membership change, hand-off of foreign records."""

from __future__ import annotations

import asyncio

import pytest

from app.clock import HybridClock
from app.cluster.replica import Replica
from app.errors import QuorumError
from app.ring import ArcSet, HashRing
from app.storage.base import Record
from app.storage.hints import HintStore
from app.storage.memory import MemoryStore
from tests.unit.in_process import InProcessCluster, members


async def test_a_down_replica_s_write_goes_to_a_spare_as_a_hint_and_is_delivered(cluster: InProcessCluster) -> None:
    ids = members("a", "b", "c", "d")
    for node_id in ids:
        await cluster.add(node_id, ids)
    await cluster.settle()
    ring = HashRing(ids)
    key = b"hinted"
    owners = ring.owners(key, 3)
    spare = ring.owners(key, 4)[3]
    down = owners[1]
    cluster.peer_client.unreachable.add(down)
    coordinator = cluster.nodes[owners[0]].coordinator
    await coordinator.put(key, b"v", consistency="all")
    assert cluster.nodes[spare].replica.hints.pending() == 1
    assert down not in cluster.holders(key)
    cluster.peer_client.unreachable.clear()
    cluster.nodes[spare].health.mark_up(down)
    await cluster.nodes[spare].handoff.deliver_hints()
    assert cluster.holders(key) == set(owners)
    assert cluster.nodes[spare].replica.hints.pending() == 0


async def test_with_no_spare_the_coordinator_keeps_an_uncounted_hint(cluster: InProcessCluster) -> None:
    ids = members("a", "b", "c")
    for node_id in ids:
        await cluster.add(node_id, ids)
    await cluster.settle()
    cluster.peer_client.unreachable.add("c")
    await cluster.nodes["a"].coordinator.put(b"k", b"v")
    with pytest.raises(QuorumError, match="2 of 3"):
        await cluster.nodes["a"].coordinator.put(b"k", b"v2", consistency="all")
    assert cluster.nodes["a"].replica.hints.pending() == 1
    assert cluster.nodes["c"].replica.store.get(b"k") is None
    cluster.peer_client.unreachable.clear()
    cluster.nodes["a"].health.mark_up("c")  # what the probe loop does once c answers
    await cluster.nodes["a"].handoff.deliver_hints()
    assert cluster.nodes["c"].replica.store.get(b"k").value == b"v2"


async def test_read_repair_updates_a_stale_replica(cluster: InProcessCluster) -> None:
    ids = members("a", "b", "c")
    for node_id in ids:
        await cluster.add(node_id, ids)
    await cluster.settle()
    await cluster.nodes["a"].coordinator.put(b"k", b"old")
    cluster.peer_client.unreachable.add("c")
    await cluster.nodes["a"].coordinator.put(b"k", b"new")
    cluster.nodes["a"].replica.hints.close()  # lose the hint: only read repair can fix c now
    cluster.peer_client.unreachable.clear()
    cluster.nodes["c"].health.mark_up("a")
    cluster.nodes["c"].health.mark_up("b")
    # c coordinates: it reads itself (stale) and one other (fresh).
    assert (await cluster.nodes["c"].coordinator.get(b"k")).value == b"new"
    for _ in range(3):  # read repair runs in the background: let it
        await asyncio.sleep(0)
    assert cluster.nodes["c"].replica.store.get(b"k").value == b"new"


async def test_anti_entropy_converges_replicas_that_missed_writes(cluster: InProcessCluster) -> None:
    ids = members("a", "b", "c")
    for node_id in ids:
        await cluster.add(node_id, ids)
    await cluster.settle()
    cluster.peer_client.unreachable.add("c")
    for i in range(200):
        await cluster.nodes["a"].coordinator.put(f"k{i}".encode(), f"v{i}".encode())
    await cluster.nodes["a"].coordinator.delete(b"k0")
    cluster.peer_client.unreachable.clear()
    repaired = await cluster.nodes["c"].anti_entropy.compare_with("a")
    assert repaired == 200  # 199 values and a tombstone
    assert cluster.nodes["c"].replica.store.get(b"k5").value == b"v5"
    assert cluster.nodes["c"].replica.store.get(b"k0").is_tombstone
    # In sync now: nothing differs, nothing moves.
    assert await cluster.nodes["c"].anti_entropy.compare_with("a") == 0


async def test_join_pulls_ranges_and_old_replicas_hand_off_foreign_records(cluster: InProcessCluster) -> None:
    three = members("a", "b", "c")
    for node_id in three:
        await cluster.add(node_id, three)
    await cluster.settle()
    keys = [f"k{i}".encode() for i in range(300)]
    for key in keys:
        await cluster.nodes["a"].coordinator.put(key, b"v")
    four = members("a", "b", "c", "d")
    d = await cluster.add("d", four)
    await cluster.settle()
    assert d.handoff.status.keys_streamed > 0
    await cluster.nodes["a"].apply_membership(four, propagate=True)
    await cluster.settle()
    for node in cluster.nodes.values():
        await node.handoff.handoff_foreign()
    ring = HashRing(four)
    for key in keys:
        assert cluster.holders(key) == set(ring.owners(key, 3)), key
    assert all(node.handoff.status.foreign_keys == 0 for node in cluster.nodes.values())


async def test_a_syncing_replica_is_not_counted_toward_the_read_quorum(cluster: InProcessCluster) -> None:
    ids = members("a", "b", "c")
    for node_id in ids:
        await cluster.add(node_id, ids)
    await cluster.settle()
    await cluster.nodes["a"].coordinator.put(b"k", b"v")
    cluster.nodes["b"].replica.syncing = ArcSet([(0, 0)])
    cluster.peer_client.unreachable.add("c")
    with pytest.raises(QuorumError, match="1 of 2"):
        await cluster.nodes["a"].coordinator.get(b"k")


class CountingStore(MemoryStore):
    """Counts the storage transactions (apply_many calls) it is asked for."""

    def __init__(self) -> None:
        super().__init__(tombstone_grace_s=60)
        self.transactions: list[int] = []

    def apply_many(self, writes):
        self.transactions.append(len(writes))
        return super().apply_many(writes)


async def test_local_writes_arriving_together_share_one_storage_transaction() -> None:
    store = CountingStore()
    replica = Replica(store=store, hints=HintStore(MemoryStore(tombstone_grace_s=60)), clock=HybridClock("n1"))
    clock = HybridClock("writer")
    records = [Record(clock.now(), f"v{i}".encode()) for i in range(10)]
    acks = await asyncio.gather(*(replica.write(f"k{i % 7}".encode(), record) for i, record in enumerate(records)))
    assert store.transactions == [10]
    assert [ack.applied for ack in acks] == [True] * 10  # versions rise, so each overwrite wins
    assert [ack.existed for ack in acks] == [False] * 7 + [True] * 3
    assert store.get(b"k0").value == b"v7" and store.get(b"k6").value == b"v6"
    await replica.write(b"alone", Record(clock.now(), b"x"))
    assert store.transactions == [10, 1]


async def test_no_foreign_record_scan_when_every_member_replicates_everything(cluster: InProcessCluster) -> None:
    three = members("a", "b", "c")
    for node_id in three:
        await cluster.add(node_id, three)
    await cluster.settle()
    node = cluster.nodes["a"]

    def no_full_scan(start: int, end: int):
        raise AssertionError("scanned the whole store although no key can be foreign at N=3 on 3 nodes")

    node.replica.store.iter_range = no_full_scan
    assert node.handoff.foreign_dirty
    await node.handoff.handoff_foreign()
    assert not node.handoff.foreign_dirty
