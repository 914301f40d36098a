"""Real nodes in one process, for unit tests: Node.open over the in-process
peer client (app.transport.fake), no sockets, no sleeps: time-driven parts
(peer health's breaker, read hedging) run on a ManualScheduler when a test
passes one. The one builder behind test_coordinator and test_replication."""

from __future__ import annotations

import asyncio
import functools

from app.clock import wall_ms
from app.cluster.node import Node
from app.config import NodeConfig
from app.membership.static import StaticMembership
from app.transport.fake import InProcessPeerClient
from app.web.routes_ops import ring_view
from tests.unit.manual_time import ManualScheduler

QUIET = {
    "anti_entropy_interval": "3600",
    "sweep_interval": "3600",
    "sync_deadline": "2",
}  # background work only when a test asks
DIGEST_WAIT_S = 10.0  # an in-memory index builds in milliseconds; this only bounds a hang


def node_config(node_id: str, members: dict[str, str], **options: str) -> NodeConfig:
    peers = ",".join(f"{n}={u}" for n, u in members.items())
    return NodeConfig.from_options({"node_id": node_id, "listen": "127.0.0.1:9", "peers": peers, **QUIET, **options})


def members(*ids: str) -> dict[str, str]:
    return {node_id: f"http://{node_id}" for node_id in ids}


class InProcessCluster:
    def __init__(self) -> None:
        self.peer_client = InProcessPeerClient()
        self.nodes: dict[str, Node] = {}

    async def add(
        self,
        node_id: str,
        members: dict[str, str],
        *,
        skew_ms: int = 0,
        scheduler: ManualScheduler | None = None,
        **options: str,
    ) -> Node:
        """Open a node (its wall clock skew_ms off; its breaker and hedging on
        `scheduler`'s time, if given) and make it reachable to the others."""

        def wall() -> int:
            return wall_ms() + skew_ms

        node = await Node.open(
            node_config(node_id, members, **options),
            peer_client=self.peer_client,
            source=StaticMembership(members),
            wall=wall,
            scheduler=scheduler,
        )
        self.nodes[node_id] = node
        self.peer_client.replicas[node_id] = node.replica
        self.peer_client.walls[node_id] = wall
        self.peer_client.membership_handlers[node_id] = functools.partial(node.apply_membership, propagate=False)
        self.peer_client.shared_digest_handlers[node_id] = node.anti_entropy.answer_shared_digest
        self.peer_client.ring_views[node_id] = functools.partial(ring_view, node)
        return node

    async def start_holding(
        self, ids: list[str], keys: list[bytes], *, value: bytes = b"v", consistency: str = "all"
    ) -> None:
        """Open these nodes as one cluster, settle it, and write every key
        through the first (at consistency all by default: every replica holds it)."""
        listed = members(*ids)
        for node_id in ids:
            await self.add(node_id, listed)
        await self.settle()
        for key in keys:
            await self.nodes[ids[0]].coordinator.put(key, value, consistency=consistency)

    async def settle(self) -> None:
        """Let started background work (the first member list, bootstrap syncs,
        the digest index cut at the current ring) finish."""
        for node in self.nodes.values():
            while not node.members_known:
                await asyncio.sleep(0)
            task = node.handoff._sync_task
            if task is not None:
                await task
            assert await asyncio.to_thread(node.store.wait_digests, DIGEST_WAIT_S)

    def holders(self, key: bytes) -> set[str]:
        return {n for n, node in self.nodes.items() if (r := node.store.get(key)) is not None and r.value is not None}

    async def close(self) -> None:
        for node in self.nodes.values():
            await node.close()
