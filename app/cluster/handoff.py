"""Moving records to the nodes that should hold them: hinted handoff (hints
delivered once their replica is back), and after a membership change the two
halves of rebalancing: pulling the arcs this node newly replicates
(app.cluster.rebalance: one source per arc, the others checked by digest) and
handing off, then dropping, the surplus copies of arcs it no longer
replicates (app.cluster.surplus_drop). Their progress is one RebalanceStatus.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict

from app.cluster.context import ClusterContext, ClusterWorker
from app.cluster.rebalance import Rebalance, RebalanceStatus
from app.cluster.surplus_drop import SURPLUS_POLL_S, SurplusDrop
from app.cluster.topology import Topology
from app.errors import PeerError
from app.ring import HashRing
from app.storage.base import Record
from app.transport.base import Peer

log = logging.getLogger(__name__)

HINT_BATCH = 500  # hints delivered per request: bounded memory, few round trips

__all__ = ["Handoff", "RebalanceStatus"]


class Handoff(ClusterWorker):
    def __init__(self, context: ClusterContext, *, write_quorum: int, sync_deadline_s: float) -> None:
        super().__init__(context)
        self.write_quorum = write_quorum
        self.sync_deadline_s = sync_deadline_s
        self.status = RebalanceStatus()
        self.pull = Rebalance(context, write_quorum=write_quorum, status=self.status)
        self.surplus = SurplusDrop(context, status=self.status)
        status = self.status
        self.metrics.track_rebalance(
            pulled=lambda: status.records_pulled,
            needed=lambda: status.records_needed,
            surplus=lambda: status.surplus_keys,
        )
        self.bootstrapping = False  # the start-up pull of an empty node: gates readiness
        self._sync_task: asyncio.Task[None] | None = None
        self._base_ring: HashRing | None = None  # while a sync runs: the last ring whose arcs this node fully held

    # -- hinted handoff ---------------------------------------------------------

    async def deliver_hints(self) -> None:
        hints = self.replica.hints
        view = self.topology.current
        for target in hints.targets():
            batch = await asyncio.to_thread(hints.for_target, target, HINT_BATCH)
            if not batch:
                continue
            if target == self.node_id:
                await self.replica.write_batch(batch)
            elif target in view.peers:
                if not self.health.is_up(target):
                    continue
                try:
                    await self.peer_client.write_batch(view.peers[target], batch)
                except PeerError as exc:
                    self.health.call_failed(target, exc)
                    continue
            elif not await self._push_to_owners(view, batch):
                continue  # the target left the ring: its keys' current owners take the hints
            for key, record in batch:
                hints.remove(target, key, record.version)
            self.metrics.hints_delivered.inc(len(batch))
        self.metrics.hints_pending.set(hints.pending())

    async def _push_to_owners(self, view: Topology, records: list[tuple[bytes, Record]]) -> bool:
        """Write records to each key's current replicas; True when all of them took them."""
        by_owner: dict[str, list[tuple[bytes, Record]]] = defaultdict(list)
        for key, record in records:
            for owner in view.ring.owners(key, self.replication_factor):
                by_owner[owner].append((key, record))
        ok = True
        for owner, batch in by_owner.items():
            try:
                if owner == self.node_id:
                    await self.replica.write_batch(batch)
                else:
                    await self.peer_client.write_batch(view.peers[owner], batch)
                    self.metrics.rebalance_keys_streamed.labels("out").inc(len(batch))
            except PeerError as exc:
                self.health.call_failed(owner, exc)
                ok = False
        return ok

    # -- rebalancing --------------------------------------------------------------

    def on_membership_change(self, old: Topology, new: Topology) -> None:
        if self.bootstrapping:
            # Still holds nothing it can vouch for: pull everything it
            # replicates on the new ring from that ring's other members.
            self.bootstrap()
        else:
            # A sync the change interrupts left arcs unpulled: compare against
            # the last ring whose arcs this node fully held, not the one it
            # was still syncing towards (arcs already pulled then cost a digest).
            base = self._base_ring if self._base_ring is not None else old.ring
            self.start_sync(base, new, urls=old.peers | new.peers)
        self.surplus.start()

    def on_start(self) -> None:
        """The ring is known for the first time: hand off whatever surplus a
        previous life left here (only arcs this node does not replicate are
        read, and an empty one costs a cursor seek; no full scan)."""
        self.surplus.start()

    def bootstrap(self) -> None:
        """A node starting with an empty store pulls everything it replicates
        from the nodes that held those ranges without it (a join, or a node
        that lost its disk). A node with data relies on anti-entropy instead.
        Not ready from here until the pull ends, even before it has counted
        the arcs it will pull (seen racing: a test read the node in that gap)."""
        view = self.topology.current
        without_self = HashRing([m for m in view.ring.members if m != self.node_id], vnodes=view.ring.vnodes)
        self.bootstrapping = True
        self.start_sync(without_self, view, urls=view.peers)

    def start_sync(self, old_ring: HashRing, new: Topology, *, urls: dict[str, Peer]) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()  # superseded: its finally leaves the state to the new one
        self._base_ring = old_ring
        self._sync_task = asyncio.ensure_future(self._sync(old_ring, new, urls))

    async def _sync(self, old_ring: HashRing, new: Topology, urls: dict[str, Peer]) -> None:
        deadline = time.monotonic() + self.sync_deadline_s
        try:
            await self.pull.sync(old_ring, new, urls, deadline)
        finally:
            if self._sync_task is asyncio.current_task():
                self.pull.release_all()
                self.bootstrapping = False
                self._base_ring = None

    async def check_surplus(self) -> None:
        """From the anti-entropy loop: a stray write (from a node that had not
        yet seen the change) can land in a surplus arc after the poll ended."""
        if not self.surplus.running():
            await self.surplus.drop_once(recount=True)

    async def drain(self, deadline: float) -> bool:
        """Hand off every surplus record before the deadline (a node that left
        the ring: all of them); True when none is left."""
        self.surplus.stop()
        while (remaining := deadline - time.monotonic()) > 0:
            try:  # an owner that never answers must not hold the exit past the deadline
                if await asyncio.wait_for(self.surplus.drop_once(), timeout=remaining):
                    return True
            except TimeoutError:
                return False
            await asyncio.sleep(min(SURPLUS_POLL_S, max(0.0, deadline - time.monotonic())))
        return False
