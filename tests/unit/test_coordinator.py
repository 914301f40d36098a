"""The coordinator over in-process replicas (the fake transport): routing to
owners, quorum counting, newest-version reads, failures named."""

from __future__ import annotations

import asyncio

import pytest

from app.clock import Version, wall_ms
from app.cluster.coordinator import Coordinator, required_acks
from app.cluster.hedging import TICK_S
from app.errors import ClockOffsetError, InvalidRequestError, QuorumError, WriteNotWonError
from app.storage.base import ApplyResult, Record
from app.transport.fake import InProcessPeerClient
from tests.unit.in_process import InProcessCluster, members
from tests.unit.manual_time import ManualScheduler

NODES = members("a", "b", "c")


async def build_cluster(
    cluster: InProcessCluster,
    *,
    replication_factor: int,
    skew_ms: dict[str, int] | None = None,
    max_offset_ms: int = 500,
    scheduler: ManualScheduler | None = None,
) -> tuple[dict[str, Coordinator], InProcessPeerClient]:
    """Three nodes (skew_ms moves a node's wall clock; `scheduler` drives their
    breakers and hedging); their coordinators, and the peer client to break."""
    for node_id in NODES:
        await cluster.add(
            node_id,
            NODES,
            skew_ms=(skew_ms or {}).get(node_id, 0),
            scheduler=scheduler,
            vnodes="32",
            replication_factor=str(replication_factor),
            max_clock_offset=str(max_offset_ms / 1000),
        )
    await cluster.settle()
    cluster.peer_client.calls.clear()
    return {node_id: node.coordinator for node_id, node in cluster.nodes.items()}, cluster.peer_client


def key_owned_by(coordinator: Coordinator, owner: str) -> bytes:
    return next(
        key for key in (f"k{i}".encode() for i in range(1000)) if coordinator.replicas_for(key)[0].node_id == owner
    )


def test_required_acks() -> None:
    assert [required_acks(c, 3) for c in ("one", "quorum", "all")] == [1, 2, 3]
    assert required_acks("quorum", 1) == 1 and required_acks("quorum", 4) == 3
    with pytest.raises(InvalidRequestError):
        required_acks("most", 3)


async def test_single_owner_routes_to_the_owner_only(cluster: InProcessCluster) -> None:
    nodes, transport = await build_cluster(cluster, replication_factor=1)
    key = key_owned_by(nodes["a"], "b")
    await nodes["a"].put(key, b"v")
    assert nodes["b"].replica.store.get(key).value == b"v"
    assert nodes["a"].replica.store.get(key) is None and nodes["c"].replica.store.get(key) is None
    assert (await nodes["c"].get(key)).value == b"v"
    assert transport.calls == [("b", "write"), ("b", "read")]


async def test_unreachable_owner_is_named_and_marked_down(cluster: InProcessCluster) -> None:
    nodes, transport = await build_cluster(cluster, replication_factor=1)
    key = key_owned_by(nodes["a"], "c")
    transport.unreachable.add("c")
    with pytest.raises(QuorumError, match=r"peer c \(http://c\) unreachable"):
        await nodes["a"].get(key)
    assert not nodes["a"].health.is_up("c")
    assert nodes["a"].metrics.replica_read_failures.labels("c")._value.get() == 1
    transport.unreachable.clear()
    assert await nodes["a"].get(key) is None  # a down owner is still tried when it is the only one
    assert nodes["a"].health.is_up("c")


async def test_quorum_write_survives_one_replica_down_but_not_two(cluster: InProcessCluster) -> None:
    nodes, transport = await build_cluster(cluster, replication_factor=3)
    transport.unreachable.add("c")
    await nodes["a"].put(b"k", b"v1")
    assert (await nodes["b"].get(b"k")).value == b"v1"
    transport.unreachable.add("b")
    with pytest.raises(QuorumError) as caught:
        await nodes["a"].put(b"k", b"v2")
    assert caught.value.required == 2 and caught.value.answered == 1
    assert "1 of 2 required" in str(caught.value)
    # consistency=one still works with a single live replica.
    await nodes["a"].put(b"k", b"v3", consistency="one")
    assert (await nodes["a"].get(b"k", consistency="one")).value == b"v3"


async def test_read_returns_the_newest_version_among_replicas(cluster: InProcessCluster) -> None:
    nodes, transport = await build_cluster(cluster, replication_factor=3)
    await nodes["a"].put(b"k", b"old")
    transport.unreachable.add("c")
    await nodes["a"].put(b"k", b"new")  # c misses this one
    transport.unreachable.clear()
    assert nodes["c"].replica.store.get(b"k").value == b"old"
    for reader in nodes.values():
        assert (await reader.get(b"k", consistency="all")).value == b"new"


async def test_delete_reports_whether_the_key_existed_and_hides_it(cluster: InProcessCluster) -> None:
    nodes, _ = await build_cluster(cluster, replication_factor=3)
    assert await nodes["a"].delete(b"k") is False
    await nodes["b"].put(b"k", b"v")
    assert await nodes["c"].delete(b"k") is True
    assert await nodes["a"].get(b"k", consistency="all") is None
    assert nodes["a"].replica.store.get(b"k").is_tombstone


async def test_replicas_observe_the_coordinators_clock(cluster: InProcessCluster) -> None:
    nodes, _ = await build_cluster(cluster, replication_factor=3)
    version = await nodes["a"].put(b"k", b"v")
    assert nodes["b"].clock.now() > version


# -- a write is acknowledged only if it won --------------------------------------


async def test_a_write_from_a_clock_behind_is_restamped_above_the_newer_version_and_wins(
    cluster: InProcessCluster,
) -> None:
    nodes, transport = await build_cluster(
        cluster, replication_factor=3, skew_ms={"a": 30_000, "c": -30_000}, max_offset_ms=120_000
    )
    transport.unreachable.add("c")
    first = await nodes["a"].put(b"k", b"v1")  # stamped 30 s ahead; c misses it, so its clock never saw it
    transport.unreachable.clear()
    second = await nodes["c"].put(b"k", b"v2")  # c's wall clock is 60 s behind that version
    assert second > first
    assert nodes["c"].metrics.write_restamps._value.get() >= 1
    for reader in nodes.values():
        assert (await reader.get(b"k", consistency="all")).value == b"v2"


async def test_a_replica_s_newer_version_from_beyond_the_bound_fails_the_write_with_503_instead_of_winning(
    cluster: InProcessCluster,
) -> None:
    nodes, _ = await build_cluster(cluster, replication_factor=3, max_offset_ms=500)
    far = Version((wall_ms() + 30_000) << 16, "rogue")
    for node in nodes.values():
        node.replica.store.apply(b"k", Record(version=far, value=b"from a clock 30 s fast"))
    with pytest.raises(WriteNotWonError, match=r"from node rogue is \d+ ms ahead .* beyond --max-clock-offset"):
        await nodes["a"].put(b"k", b"v")
    assert nodes["a"].clock.now().physical_ms < far.physical_ms  # the clock did not jump to follow it


async def test_a_write_that_keeps_losing_fails_after_the_bounded_rounds(
    cluster: InProcessCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    nodes, _ = await build_cluster(cluster, replication_factor=1)
    key = key_owned_by(nodes["a"], "a")
    store = nodes["a"].replica.store
    original = store.apply

    def always_newer(k: bytes, record: Record) -> ApplyResult:
        original(k, Record(version=Version(record.version.hlc + 1, "racer"), value=b"racer"))
        return original(k, record)

    monkeypatch.setattr(store, "apply", always_newer)
    with pytest.raises(WriteNotWonError, match="after 3 rounds"):
        await nodes["a"].put(key, b"mine")


async def test_a_node_whose_clock_is_off_from_most_peers_refuses_to_coordinate_writes(
    cluster: InProcessCluster,
) -> None:
    nodes, _ = await build_cluster(cluster, replication_factor=3)
    nodes["c"].offsets.record("a", sent_wall_ms=0, round_trip_ms=2, peer_wall_ms=-5_000)
    nodes["c"].offsets.record("b", sent_wall_ms=0, round_trip_ms=2, peer_wall_ms=-5_000)
    with pytest.raises(ClockOffsetError, match="off from 2 of 2 peers"):
        await nodes["c"].put(b"k", b"v")
    with pytest.raises(ClockOffsetError):
        await nodes["c"].delete(b"k")
    await nodes["a"].put(b"k", b"v")  # the others still coordinate
    assert (await nodes["c"].get(b"k")).value == b"v"


async def test_reads_advance_the_coordinators_clock(cluster: InProcessCluster) -> None:
    nodes, transport = await build_cluster(cluster, replication_factor=3, skew_ms={"a": 20_000}, max_offset_ms=60_000)
    transport.unreachable.add("c")
    written = await nodes["a"].put(b"k", b"v")
    nodes["b"].replica.store.discard(b"k", written)  # so only a read can show c the version
    transport.unreachable.clear()
    assert nodes["c"].clock.now() < written
    await nodes["c"].get(b"k", consistency="all")
    assert nodes["c"].clock.now() > written


# -- expiry is a version -------------------------------------------------------


async def test_an_expired_value_hides_an_older_live_one_on_a_replica_that_missed_it(
    cluster: InProcessCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    nodes, transport = await build_cluster(cluster, replication_factor=3)
    now = [wall_ms()]  # the coordinators' wall clock for expiry, moved by hand below
    monkeypatch.setattr("app.cluster.coordinator.wall_ms", lambda: now[0])
    await nodes["a"].put(b"k", b"old")
    transport.unreachable.add("c")
    await nodes["a"].put(b"k", b"short-lived", ttl_s=0.001)
    transport.unreachable.clear()
    now[0] += 10  # past its expiry
    assert nodes["c"].replica.store.get(b"k").value == b"old"
    for reader in nodes.values():
        assert await reader.get(b"k", consistency="all") is None
    await asyncio.sleep(0)  # one loop turn: the read repair the reads started has run; c now holds the dead version too
    dead = nodes["c"].replica.store.get(b"k")
    assert dead is not None and dead.value == b"short-lived" and not dead.live(now[0])


# -- gray failures: a replica that accepts and never answers ---------------------


async def test_a_read_hedges_past_a_hung_replica_and_the_breaker_marks_it_down(cluster: InProcessCluster) -> None:
    clock = ManualScheduler()  # the nodes' breakers and hedging run on it: time moves only below
    nodes, transport = await build_cluster(cluster, replication_factor=3, scheduler=clock)
    health = nodes["a"].health
    await nodes["a"].put(b"k", b"v")
    transport.hung.add("c")
    for _ in range(12):
        health.state("b").latency_s = 10.0  # so that c, the hung one, looks best and is asked first
        read = asyncio.ensure_future(nodes["a"].get(b"k"))
        await asyncio.sleep(0)  # one loop turn: the read has asked c and waits
        clock.advance(health.hedge_delay("c") - TICK_S / 2)
        assert not read.done()  # no hedge before c's hedge delay
        clock.advance(1.5 * TICK_S)  # past the first tick after the deadline: the hedge asks b
        answer = await asyncio.wait_for(read, timeout=2.0)  # only bounds a hang: a broken hedge never returns
        assert answer is not None and answer.value == b"v"
    for _ in range(4):
        await nodes["a"].put(b"k", b"v2")  # writes go to every replica: the hung one owes answers
    assert health.trip_silent() == [] and health.is_up("c")  # silent for ~0.13 s: under its suspect delay
    clock.advance(health.suspect_after("c"))
    assert health.trip_silent() == ["c"]  # what the node's peer watch runs four times a second
    assert not health.is_up("c")
    assert "no answer for" in health.state("c").last_error
    assert nodes["a"].metrics.hedged_reads._value.get() == 12
