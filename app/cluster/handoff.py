"""Moving records to the nodes that should hold them: hinted handoff (hints
delivered once their replica is back), rebalancing after a membership change
(a node pulls the ranges it newly replicates from their previous replicas and
serves them as authoritative only when done), and handing off "foreign"
records (ones this node no longer replicates) before dropping them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass

from app.cluster.context import ClusterContext, ClusterWorker
from app.cluster.topology import Topology
from app.errors import PeerError
from app.ring import ArcSet, HashRing, segments
from app.storage.base import Record
from app.transport.base import Peer

log = logging.getLogger(__name__)

HINT_BATCH = 500  # hints delivered per request: bounded memory, few round trips
ARCS_PER_FETCH = 128  # arcs per range request while syncing: bounded response size
HANDOFF_BATCH = 1000  # foreign records pushed per request
SYNC_RETRY_S = 0.2  # first retry delay for an unreachable sync source; doubles up to SYNC_RETRY_MAX_S
SYNC_RETRY_MAX_S = 2.0


@dataclass
class RebalanceStatus:
    syncing: bool = False
    pending_ranges: int = 0
    keys_streamed: int = 0
    foreign_keys: int = 0
    last_change_epoch: int = 0


class Handoff(ClusterWorker):
    def __init__(self, context: ClusterContext, *, write_quorum: int, sync_deadline_s: float) -> None:
        super().__init__(context)
        self.write_quorum = write_quorum
        self.sync_deadline_s = sync_deadline_s
        self.status = RebalanceStatus()
        self.foreign_dirty = True  # scan for foreign records at least once after start
        self.bootstrapping = False  # the start-up pull of an empty node: gates readiness
        self._sync_task: asyncio.Task[None] | None = None

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

    # -- rebalancing: pulling newly replicated ranges ------------------------------

    def on_membership_change(self, old: Topology, new: Topology) -> None:
        self.foreign_dirty = True
        self.start_sync(old.ring, new, urls=old.peers | new.peers)

    def bootstrap(self) -> None:
        """A node starting with an empty store pulls everything it replicates
        from the nodes that held those ranges without it (a join, or a node
        that lost its disk). A node with data relies on anti-entropy instead."""
        view = self.topology.current
        without_self = HashRing([m for m in view.ring.members if m != self.node_id], vnodes=view.ring.vnodes)
        self.bootstrapping = True
        self.start_sync(without_self, view, urls=view.peers)

    def start_sync(self, old_ring: HashRing, new: Topology, *, urls: dict[str, Peer]) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()
        self._sync_task = asyncio.ensure_future(self._sync(old_ring, new, urls))

    async def _sync(self, old_ring: HashRing, new: Topology, urls: dict[str, Peer]) -> None:
        groups: dict[tuple[str, ...], list[tuple[int, int]]] = defaultdict(list)
        for start, end, before, after in segments(old_ring, new.ring, self.replication_factor):
            if self.node_id in after and self.node_id not in before and before:
                groups[before].append((start, end))
        pending = [arc for arcs in groups.values() for arc in arcs]
        self._set_syncing(pending, epoch=new.epoch)
        deadline = time.monotonic() + self.sync_deadline_s
        try:
            await asyncio.gather(*(self._pull_group(sources, arcs, urls, deadline) for sources, arcs in groups.items()))
        finally:
            if self.status.last_change_epoch == new.epoch:
                self._set_syncing([], epoch=new.epoch)
                self.bootstrapping = False

    async def _pull_group(
        self, sources: tuple[str, ...], arcs: list[tuple[int, int]], urls: dict[str, Peer], deadline: float
    ) -> None:
        # Any W of the old replicas held every acknowledged write, so pulling from
        # (old replicas - W + 1) of them is guaranteed to see each one.
        needed = max(1, len(sources) - self.write_quorum + 1) if len(sources) >= self.write_quorum else len(sources)
        done: set[str] = set()
        delay = SYNC_RETRY_S
        while len(done) < needed and time.monotonic() < deadline:
            for source in sources:
                if source in done:
                    continue
                peer = urls.get(source)
                if peer is None:
                    done.add(source)  # unknown URL: nothing we can pull
                    continue
                try:
                    for i in range(0, len(arcs), ARCS_PER_FETCH):
                        records = await self.peer_client.records_in_arcs(peer, arcs[i : i + ARCS_PER_FETCH])
                        await self.replica.write_batch(records)
                        self.status.keys_streamed += len(records)
                        self.metrics.rebalance_keys_streamed.labels("in").inc(len(records))
                    done.add(source)
                except PeerError as exc:
                    log.info("sync from %s failed, will retry: %s", source, exc)
            if len(done) < needed:
                await asyncio.sleep(delay)
                delay = min(delay * 2, SYNC_RETRY_MAX_S)
        if len(done) < needed:
            log.warning(
                "sync of %d arcs gave up after the deadline with %d of %d sources; anti-entropy will finish it",
                len(arcs),
                len(done),
                needed,
            )
        finished = set(arcs)
        still = [arc for arc in self.replica.syncing.arcs if arc not in finished]
        self._set_syncing(still, epoch=self.status.last_change_epoch)

    def _set_syncing(self, arcs: list[tuple[int, int]], *, epoch: int) -> None:
        self.replica.syncing = ArcSet(arcs)
        self.status.syncing = bool(arcs)
        self.status.pending_ranges = len(arcs)
        self.status.last_change_epoch = epoch
        self.metrics.syncing_ranges.set(len(arcs))

    # -- foreign records: hand off, then drop ----------------------------------------

    async def handoff_foreign(self) -> None:
        """Push records this node no longer replicates to their replicas, and
        drop each once every one of them has it. Only scans after a change."""
        if not self.foreign_dirty:
            return
        view = self.topology.current
        ring, me, n = view.ring, self.node_id, self.replication_factor
        if me in ring.members and len(ring.members) <= n:
            # Every member replicates every key (3 nodes at N=3, a lone node):
            # nothing here can be foreign, so skip a scan that costs seconds
            # of CPU per million records at every start.
            self.status.foreign_keys = 0
            self.foreign_dirty = False
            return

        def scan() -> list[tuple[bytes, Record]]:
            return [(k, r) for k, r in self.replica.store.iter_range(0, 0) if me not in ring.owners(k, n)]

        foreign = await asyncio.to_thread(scan)
        self.status.foreign_keys = len(foreign)
        if not foreign:
            self.foreign_dirty = False
            return
        for i in range(0, len(foreign), HANDOFF_BATCH):
            batch = foreign[i : i + HANDOFF_BATCH]
            if self.topology.current is not view:
                return  # the ring moved under us; the next round rescans
            if await self._push_to_owners(view, batch):
                for key, record in batch:
                    self.replica.store.discard(key, record.version)
                self.status.foreign_keys -= len(batch)
