"""The server side of backup and restore (app.cluster.backup, app.cluster.restore)
over in-process nodes: replicas that disagree are merged newest-first,
tombstones and expiries included; a down replica is replaced by another;
too few replicas fail; restore keeps newer versions and counts what it applied."""

from __future__ import annotations

import pytest

from app.clock import Version
from app.cluster.backup import BackupSource
from app.cluster.node import Node
from app.cluster.restore import RestoreWriter
from app.errors import FutureVersionError, InvalidRequestError, QuorumError
from app.storage.base import Record
from app.web.routes_backup import context_of
from tests.unit.in_process import InProcessCluster, members


async def three(cluster: InProcessCluster) -> dict[str, Node]:
    ids = members("a", "b", "c")
    for node_id in ids:
        await cluster.add(node_id, ids, vnodes="32")  # fewer arcs than the default: a fast unit test
    await cluster.settle()
    return cluster.nodes


async def read_all(node: Node, *, pace: float = 1.0) -> dict[bytes, Record]:
    source = BackupSource(context_of(node))
    records: dict[bytes, Record] = {}
    async for batch in source.batches(source.plan(), pace=pace):
        for key, record in batch:
            assert key not in records, f"{key!r} twice"
            records[key] = record
    return records


async def test_a_backup_holds_each_key_once_at_its_newest_version(cluster: InProcessCluster) -> None:
    nodes = await three(cluster)
    for i in range(200):
        await nodes["a"].coordinator.put(f"k{i}".encode(), b"v1")
    await nodes["a"].coordinator.delete(b"k7")
    await nodes["a"].coordinator.put(b"ttl", b"t", ttl_s=600)
    # Replicas that disagree. A write held by W = 2 of the 3 (as an acknowledged
    # one is) must be in the backup, whichever N - W + 1 = 2 replicas it reads;
    # one held by a single replica (never acknowledged) may or may not be.
    newer = Record(Version(nodes["a"].clock.now().hlc + 10, "b"), b"newest")
    gone = Record(Version(nodes["a"].clock.now().hlc + 20, "c"), None)
    lone = Record(Version(nodes["a"].clock.now().hlc + 30, "c"), b"lone")
    for holder in ("b", "c"):
        nodes[holder].replica.store.apply(b"k1", newer)
    for holder in ("a", "c"):
        nodes[holder].replica.store.apply(b"k2", gone)
    nodes["c"].replica.store.apply(b"k3", lone)
    for _ in range(5):  # the replicas read vary with the load ranking
        records = await read_all(nodes["a"])
        assert len(records) == 201
        assert records[b"k1"] == newer
        assert records[b"k2"] == gone
        assert records[b"k3"] in (lone, nodes["a"].replica.store.get(b"k3"))
    assert records[b"k7"].value is None
    assert records[b"ttl"].expires_at_ms == nodes["b"].replica.store.get(b"ttl").expires_at_ms > 0
    assert records[b"k100"].value == b"v1"


async def test_a_down_replica_is_replaced_and_two_down_fail(cluster: InProcessCluster) -> None:
    nodes = await three(cluster)
    for i in range(50):
        await nodes["a"].coordinator.put(f"k{i}".encode(), b"v")
    cluster.peer_client.unreachable.add("b")
    assert len(await read_all(nodes["a"])) == 50
    cluster.peer_client.unreachable.add("c")
    with pytest.raises(QuorumError, match="1 of 3 replicas"):
        await read_all(nodes["a"])
    nodes["a"].health.mark_down("b", "test")
    nodes["a"].health.mark_down("c", "test")
    with pytest.raises(QuorumError, match="N - W \\+ 1"):
        BackupSource(context_of(nodes["a"])).plan()


async def test_a_membership_change_during_a_backup_fails_it(cluster: InProcessCluster) -> None:
    nodes = await three(cluster)
    await nodes["a"].coordinator.put(b"k", b"v")
    source = BackupSource(context_of(nodes["a"]))
    plan = source.plan()
    nodes["a"].topology.update(members("a", "b"))
    with pytest.raises(QuorumError, match="membership changed"):
        async for _ in source.batches(plan):
            pass


async def test_pace_must_be_a_share(cluster: InProcessCluster) -> None:
    nodes = await three(cluster)
    source = BackupSource(context_of(nodes["a"]))
    with pytest.raises(InvalidRequestError, match="pace"):
        async for _ in source.batches(source.plan(), pace=0):
            pass


async def test_restore_keeps_newer_versions_and_counts_what_it_applied(cluster: InProcessCluster) -> None:
    nodes = await three(cluster)
    writer = RestoreWriter(context_of(nodes["a"]))
    base = (nodes["a"].clock.reading_ms() - 60_000) << 16  # a backup's versions: older than the clocks
    records = [(f"r{i}".encode(), Record(Version(base + i, "x"), b"old", expires_at_ms=0)) for i in range(30)]
    await nodes["b"].coordinator.put(b"r3", b"live-and-newer")
    first = await writer.restore(records)
    assert (first.records, first.applied, first.unchanged) == (30, 29, 1)
    assert first.replica_writes_applied == 29 * 3
    again = await writer.restore(records)
    assert (again.applied, again.replica_writes_applied, again.unchanged) == (0, 0, 30)
    assert (await nodes["c"].coordinator.get(b"r3")).value == b"live-and-newer"
    assert (await nodes["c"].coordinator.get(b"r4")).value == b"old"


async def test_restore_needs_w_replicas_and_refuses_versions_from_the_future(cluster: InProcessCluster) -> None:
    nodes = await three(cluster)
    writer = RestoreWriter(context_of(nodes["a"]))
    record = Record(Version(nodes["a"].clock.now().hlc, "x"), b"v")
    cluster.peer_client.unreachable.update({"b", "c"})
    with pytest.raises(QuorumError, match="1 of 3 replicas took a batch"):
        await writer.restore([(b"k", record)])
    cluster.peer_client.unreachable.clear()
    future = Record(Version((nodes["a"].clock.reading_ms() + 3_600_000) << 16, "x"), b"v")
    with pytest.raises(FutureVersionError):
        await writer.restore([(b"k2", record), (b"k3", future)])
    assert nodes["a"].replica.store.get(b"k2") is None, "nothing written when any version is refused"
