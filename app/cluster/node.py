"""A node: the store, the membership view, peer health and the coordinator,
plus the background loops that keep them fresh (peer probes, TTL sweeps).

Built by the composition root (app.web.app), which hands it the peer client;
it never imports a web or network library itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from app.clock import HybridClock, wall_ms
from app.cluster.coordinator import Coordinator
from app.cluster.health import PeerHealth
from app.cluster.membership import Membership, MembershipView
from app.config import NodeConfig
from app.metrics import NodeMetrics
from app.storage import Store, open_store
from app.transport.base import PeerClient

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 1.0  # how soon a peer that came back is routed to again
MAX_LOOP_BACKOFF_S = 30.0  # a failing background loop retries at most this far apart


class Node:
    def __init__(self, config: NodeConfig, *, metrics: NodeMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or NodeMetrics()
        self.clock = HybridClock(config.node_id)
        self.membership = MembershipView(self_id=config.node_id, members=config.peers, vnodes=config.vnodes)
        self.health = PeerHealth(on_flip=self._on_peer_flip)
        self.store: Store | None = None
        self.coordinator: Coordinator | None = None
        self.started_at = time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []
        self.membership.on_change(self._on_membership_change)
        self._on_membership_change(self.membership.current, self.membership.current)

    async def start(self, transport: PeerClient) -> None:
        """Open the store (off the event loop: a big LMDB may take a moment) and
        start the background loops."""
        self.store = await asyncio.to_thread(open_store, self.config)
        self.metrics.track_keys(self.store.live_count)
        self.coordinator = Coordinator(
            membership=self.membership,
            store=self.store,
            clock=self.clock,
            transport=transport,
            health=self.health,
            metrics=self.metrics,
            replication_factor=self.config.replication_factor,
        )
        self._tasks = [
            asyncio.create_task(self._forever("peer probe", PROBE_INTERVAL_S, self._probe_down_peers)),
            asyncio.create_task(self._forever("sweep", self.config.sweep_interval, self._sweep)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.coordinator is not None:
            await self.coordinator.transport.close()
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
            self.store = None

    def not_ready_reason(self) -> str | None:
        """None when the node can serve: ring known, store open."""
        if self.store is None or self.coordinator is None:
            return "store is not open yet"
        if self.config.node_id not in self.membership.current.ring:
            return "this node is not a member of its own ring"
        return None

    async def _forever(self, name: str, interval: float, step: Callable[[], Awaitable[None]]) -> None:
        """Run step every interval; never die silently: log and back off on errors."""
        delay = interval
        while True:
            await asyncio.sleep(delay)
            try:
                await step()
                delay = interval
            except Exception:
                log.exception("%s loop failed; retrying", name)
                delay = min(delay * 2, MAX_LOOP_BACKOFF_S)

    async def _probe_down_peers(self) -> None:
        assert self.coordinator is not None
        view = self.membership.current
        down = [view.peers[node_id] for node_id in self.health.down_peers() if node_id in view.peers]
        results = await asyncio.gather(*(self.coordinator.transport.probe(peer) for peer in down))
        for peer, answered in zip(down, results):
            if answered:
                self.health.mark_up(peer.node_id)

    async def _sweep(self) -> None:
        store = self.store
        if store is not None:
            await asyncio.to_thread(store.sweep, wall_ms())

    def _on_peer_flip(self, node_id: str, up: bool) -> None:
        self.metrics.peer_up.labels(node_id).set(1 if up else 0)

    def _on_membership_change(self, old: Membership, new: Membership) -> None:
        self.metrics.ring_members.set(len(new.peers))
        for node_id in new.peers:
            if node_id != self.config.node_id:
                self.metrics.peer_up.labels(node_id).set(1 if self.health.is_up(node_id) else 0)
        for node_id in set(old.peers) - set(new.peers):
            self.health.forget(node_id)
            self.metrics.peer_up.remove(node_id)
