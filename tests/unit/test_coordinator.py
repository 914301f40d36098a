"""The coordinator over in-process replicas (the fake transport): routing to
owners, quorum counting, newest-version reads, failures named."""

from __future__ import annotations

import pytest

from app.clock import HybridClock
from app.cluster.coordinator import Coordinator, required_acks
from app.cluster.health import PeerHealth
from app.cluster.membership import MembershipView
from app.cluster.replica import Replica
from app.errors import InvalidRequestError, QuorumError
from app.metrics import NodeMetrics
from app.storage.hints import HintStore
from app.storage.memory import MemoryStore
from app.transport.fake import InProcessPeerClient

NODES = {"a": "http://a", "b": "http://b", "c": "http://c"}


def build_cluster(replication_factor: int) -> tuple[dict[str, Coordinator], InProcessPeerClient]:
    transport = InProcessPeerClient()
    coordinators = {}
    for node_id in NODES:
        coordinators[node_id] = Coordinator(
            membership=MembershipView(self_id=node_id, members=NODES, vnodes=32),
            replica=Replica(store=MemoryStore(tombstone_grace_s=60), hints=HintStore(MemoryStore(tombstone_grace_s=60)), clock=(clock := HybridClock(node_id))),
            clock=clock,
            transport=transport,
            health=PeerHealth(),
            metrics=NodeMetrics(),
            replication_factor=replication_factor,
        )
    transport.replicas.update({node_id: c.replica for node_id, c in coordinators.items()})
    return coordinators, transport


def key_owned_by(coordinator: Coordinator, owner: str) -> bytes:
    return next(
        key for key in (f"k{i}".encode() for i in range(1000))
        if coordinator.replicas_for(key)[0].node_id == owner
    )


def test_required_acks() -> None:
    assert [required_acks(c, 3) for c in ("one", "quorum", "all")] == [1, 2, 3]
    assert required_acks("quorum", 1) == 1 and required_acks("quorum", 4) == 3
    with pytest.raises(InvalidRequestError):
        required_acks("most", 3)


async def test_single_owner_routes_to_the_owner_only() -> None:
    nodes, transport = build_cluster(replication_factor=1)
    key = key_owned_by(nodes["a"], "b")
    await nodes["a"].put(key, b"v")
    assert nodes["b"].replica.store.get(key).value == b"v"  # type: ignore[union-attr]
    assert nodes["a"].replica.store.get(key) is None and nodes["c"].replica.store.get(key) is None
    assert (await nodes["c"].get(key)).value == b"v"  # type: ignore[union-attr]
    assert transport.calls == [("b", "write"), ("b", "read")]


async def test_unreachable_owner_is_named_and_marked_down() -> None:
    nodes, transport = build_cluster(replication_factor=1)
    key = key_owned_by(nodes["a"], "c")
    transport.unreachable.add("c")
    with pytest.raises(QuorumError, match=r"peer c \(http://c\) unreachable"):
        await nodes["a"].get(key)
    assert not nodes["a"].health.is_up("c")
    transport.unreachable.clear()
    assert await nodes["a"].get(key) is None  # a down owner is still tried when it is the only one
    assert nodes["a"].health.is_up("c")


async def test_quorum_write_survives_one_replica_down_but_not_two() -> None:
    nodes, transport = build_cluster(replication_factor=3)
    transport.unreachable.add("c")
    await nodes["a"].put(b"k", b"v1")
    assert (await nodes["b"].get(b"k")).value == b"v1"  # type: ignore[union-attr]
    transport.unreachable.add("b")
    with pytest.raises(QuorumError) as caught:
        await nodes["a"].put(b"k", b"v2")
    assert caught.value.required == 2 and caught.value.answered == 1
    assert "1 of 2 required" in str(caught.value)
    # consistency=one still works with a single live replica.
    await nodes["a"].put(b"k", b"v3", consistency="one")
    assert (await nodes["a"].get(b"k", consistency="one")).value == b"v3"  # type: ignore[union-attr]


async def test_read_returns_the_newest_version_among_replicas() -> None:
    nodes, transport = build_cluster(replication_factor=3)
    await nodes["a"].put(b"k", b"old")
    transport.unreachable.add("c")
    await nodes["a"].put(b"k", b"new")  # c misses this one
    transport.unreachable.clear()
    assert nodes["c"].replica.store.get(b"k").value == b"old"  # type: ignore[union-attr]
    for reader in nodes.values():
        assert (await reader.get(b"k", consistency="all")).value == b"new"  # type: ignore[union-attr]


async def test_delete_reports_whether_the_key_existed_and_hides_it() -> None:
    nodes, _ = build_cluster(replication_factor=3)
    assert await nodes["a"].delete(b"k") is False
    await nodes["b"].put(b"k", b"v")
    assert await nodes["c"].delete(b"k") is True
    assert await nodes["a"].get(b"k", consistency="all") is None
    assert nodes["a"].replica.store.get(b"k").is_tombstone  # type: ignore[union-attr]


async def test_replicas_observe_the_coordinators_clock() -> None:
    nodes, _ = build_cluster(replication_factor=3)
    version = await nodes["a"].put(b"k", b"v")
    assert nodes["b"].clock.now() > version
