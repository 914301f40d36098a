"""Surplus copies: records in arcs this node no longer replicates (after a
membership change, at start, or when it left the ring and drains), handed to
their owners and dropped as soon as the owners confirm.

The ring says which arcs are surplus; only their records are read (per-arc
range reads: an empty arc costs one cursor seek), never the whole store. For
each arc whose owners have finished syncing it, this node compares its digest
of the records it read with each owner's: equal means the owner holds every
one of them. An owner that differs is sent the records (last writer wins);
its acknowledgement (given once applied and durable under its policy) is the
confirmation. Then exactly the versions read are discarded, so a newer write
that arrived meanwhile survives and is handled on the next pass. Polled at a
short interval after a change until nothing is left. Called by app.cluster.handoff.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

from app.cluster.context import ClusterContext, ClusterWorker
from app.cluster.rebalance import DIGEST_ARCS, RebalanceStatus
from app.errors import PeerError
from app.ring import ArcSet
from app.storage.base import DIGEST_BYTES, Record, fingerprint
from app.transport.base import Peer

log = logging.getLogger(__name__)

Arc = tuple[int, int]

SURPLUS_POLL_S = 0.5  # how soon after a change (and between passes) surplus is checked
SURPLUS_POLL_MAX_S = 5.0  # the interval backs off to this while owners are unreachable
ARCS_PER_PASS_CHUNK = DIGEST_ARCS  # arcs read, compared and dropped together (one digest request per owner)
PUSH_BATCH = 5000  # records per write to an owner that lacks some


class SurplusDrop(ClusterWorker):
    def __init__(self, context: ClusterContext, *, status: RebalanceStatus) -> None:
        super().__init__(context)
        self.status = status
        self._held: dict[Arc, int] = {}  # surplus arc -> records last seen there
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Poll until this node holds no surplus (restarted by every change)."""
        if self._task is not None:
            self._task.cancel()
        self._held = {}
        self._task = asyncio.ensure_future(self._poll())

    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _poll(self) -> None:
        delay = 0.0  # the first pass at once: it counts what is held, so the report is true from the start
        while True:
            await asyncio.sleep(delay)
            try:
                if await self.drop_once():
                    return
                delay = SURPLUS_POLL_S
            except Exception:  # a background loop never dies silently
                log.exception("surplus hand-off pass failed; retrying")
                delay = min(delay * 2, SURPLUS_POLL_MAX_S)

    async def drop_once(self, *, recount: bool = False) -> bool:
        """One pass over the surplus arcs; True when none holds a record.
        Arcs are counted once per poll (recount: again), then only the
        non-empty ones are worked on."""
        view = self.topology.current
        ring, n = view.ring, self.replication_factor
        surplus = [(arc, owners) for arc, owners in ring.replica_sets(n) if self.node_id not in owners]
        if not surplus or not view.peers:
            self._report({})
            return True
        known = {} if recount else self._held
        held = {arc: known.get(arc, -1) for arc, _ in surplus}
        uncounted = [arc for arc, count in held.items() if count < 0]
        if uncounted:
            held.update(zip(uncounted, await asyncio.to_thread(self._count, uncounted), strict=True))
        self._report(held)
        busy = [(arc, owners) for arc, owners in surplus if held[arc] != 0]
        if not busy:
            return True
        waiting = await self._owners_syncing({owner for _, owners in busy for owner in owners}, view.peers)
        ready = [
            (arc, owners)
            for arc, owners in busy
            if not any(o not in waiting or arc[1] in waiting[o] for o in owners if o != self.node_id)
        ]
        for i in range(0, len(ready), ARCS_PER_PASS_CHUNK):
            held.update(await self._drop_chunk(ready[i : i + ARCS_PER_PASS_CHUNK], view.peers))
            self._report(held)
        return all(count == 0 for count in held.values())

    def _report(self, held: dict[Arc, int]) -> None:
        self._held = held
        self.status.surplus_keys = sum(max(0, count) for count in held.values())
        self.status.surplus_ranges = sum(1 for count in held.values() if count != 0)

    async def _owners_syncing(self, owners: set[str], peers: dict[str, Peer]) -> dict[str, ArcSet]:
        """The arcs each reachable owner is still pulling; owners that are
        down or do not answer are left out (their arcs wait for the next pass;
        the probe loop, not this poll, decides whether they are down)."""
        found: dict[str, ArcSet] = {}
        for owner in sorted(owners):
            if owner == self.node_id or owner not in peers or not self.health.is_up(owner):
                continue
            try:
                found[owner] = ArcSet(await self.peer_client.syncing_arcs(peers[owner]))
            except PeerError as exc:
                log.info("surplus hand-off: owner %s did not answer: %s", owner, exc)
        return found

    def _count(self, arcs: list[Arc]) -> list[int]:
        store = self.replica.store
        return [sum(1 for _ in store.iter_range(start, end)) for start, end in arcs]

    def _read(self, arcs: list[Arc]) -> list[tuple[list[tuple[bytes, Record]], bytes]]:
        """Each arc's records and their digest (the function Store.digest computes)."""
        out = []
        for start, end in arcs:
            records = list(self.replica.store.iter_range(start, end))
            acc = 0
            for key, record in records:
                acc ^= fingerprint(key, record.version.hlc, record.version.node.encode())
            out.append((records, acc.to_bytes(DIGEST_BYTES, "big")))
        return out

    async def _drop_chunk(self, chunk: list[tuple[Arc, tuple[str, ...]]], peers: dict[str, Peer]) -> dict[Arc, int]:
        """Hand off and drop the chunk's arcs; returns the records each still holds."""
        arcs = [arc for arc, _ in chunk]
        read = await asyncio.to_thread(self._read, arcs)
        left: dict[Arc, int] = {}
        full = [(arc, owners, records, digest) for (arc, owners), (records, digest) in zip(chunk, read, strict=True)]
        for arc, _, records, _ in full:
            left[arc] = len(records)
        full = [entry for entry in full if entry[2]]
        if not full:
            return left
        # Which owners lack something: one digest request per owner for its arcs.
        by_owner: dict[str, list[int]] = defaultdict(list)
        for position, (_, owners, _, _) in enumerate(full):
            for owner in owners:
                by_owner[owner].append(position)
        unconfirmed: set[int] = set()
        to_push: dict[str, list[int]] = defaultdict(list)
        for owner, positions in by_owner.items():
            try:
                theirs = await self.peer_client.digests(peers[owner], [full[p][0] for p in positions])
            except PeerError as exc:
                log.info("surplus hand-off: no digests from %s: %s", owner, exc)
                unconfirmed.update(positions)
                continue
            for position, digest in zip(positions, theirs, strict=True):
                if digest != full[position][3]:
                    to_push[owner].append(position)
        for owner, positions in to_push.items():
            records = [record for p in positions if p not in unconfirmed for record in full[p][2]]
            try:
                for i in range(0, len(records), PUSH_BATCH):
                    await self.peer_client.write_batch(peers[owner], records[i : i + PUSH_BATCH])
                self.metrics.rebalance_keys_streamed.labels("out").inc(len(records))
            except PeerError as exc:
                log.info("surplus hand-off: %s did not take %d records: %s", owner, len(records), exc)
                unconfirmed.update(positions)
        confirmed = [entry for position, entry in enumerate(full) if position not in unconfirmed]
        doomed = [(key, record.version) for _, _, records, _ in confirmed for key, record in records]
        removed = await asyncio.to_thread(self.replica.store.discard_many, doomed) if doomed else 0
        # A write that arrived since the read kept its newer version: recount
        # those arcs on the next pass rather than call them empty.
        for arc, _, _, _ in confirmed:
            left[arc] = 0 if removed == len(doomed) else -1
        return left
