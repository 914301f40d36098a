"""Reading the whole cluster for a backup, arc by arc, the way anti-entropy
compares replicas: for each bounded batch of ring arcs, N - W + 1 of their
replicas (this node first when it is one) are asked for their digests; where
those agree, the records come from one of them, where they differ, from each
of them, keeping the newest version per key (tombstones and expiries
included). Paced: after each batch the reader rests, so client traffic keeps
most of the CPU. Called by the backup route (app.web.routes_backup), which
turns each batch into chunks of app.storage.backup_format.

Why that is complete: a write acknowledged before the backup started is
durable on W replicas of its arc, so any R' = N - W + 1 replicas include one
of them, and last-writer-wins means that replica still holds that version or
a newer one when it is read. Fewer than R' replicas of an arc answering
fails the backup (QuorumError) rather than write an incomplete file.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence

from app.cluster.context import ClusterWorker
from app.cluster.coordinator import Consistency, required_acks
from app.errors import InvalidRequestError, MembershipChangedError, PeerError, QuorumError
from app.storage.base import Record
from app.transport.base import Peer

BATCH_RECORDS = 10_000  # records per batch aimed at (from the key estimate): ~2 MB in flight, per batch
MAX_ARCS_PER_BATCH = 64  # the replicas scan each arc's range up to here (Replica: FULL_SCAN_ABOVE_ARCS)
PREFETCH_BATCHES = 1  # batches read ahead while the previous one is sent: bounded memory, no idle wait
# The share of time a backup works; it rests the rest, for client traffic.
# Measured with 3 nodes on one core, 3 x 1M keys (BENCHMARKS.md, "backup and restore"):
# at pace 1 the backup took 7-8 s and GET throughput during it fell to 0.38x;
# at 0.3, 19-22 s and 0.76-0.86x over three runs. `--pace 1` when nothing else runs.
DEFAULT_PACE = 0.3

Arc = tuple[int, int]
Batch = list[tuple[bytes, Record]]


class BackupSource(ClusterWorker):
    """The records of the whole ring, batch by batch; one per backup."""

    _epoch = -1  # the ring's epoch when plan() ran: a batch read under another epoch fails
    _caller_busy = 0.0

    def plan(self) -> list[tuple[tuple[str, ...], list[Arc]]]:
        """The ring's arcs in batches, each batch's arcs sharing one replica set;
        raises QuorumError now if some arc has too few reachable replicas."""
        view = self.topology.current
        self._epoch = view.epoch
        by_owners: dict[tuple[str, ...], list[Arc]] = {}
        for arc, owners in view.ring.replica_sets(self.replication_factor):
            by_owners.setdefault(owners, []).append(arc)
        short = [
            owners
            for owners in by_owners
            if sum(1 for o in owners if o == self.node_id or self.health.is_up(o)) < self.required(owners)
        ]
        if short:
            raise QuorumError(
                f"backup: {len(short)} replica sets have fewer than N - W + 1 reachable replicas "
                f"(first: {', '.join(short[0])}); a backup then could miss acknowledged writes: "
                "bring the nodes back, then retry",
                required=self.required(short[0]),
                answered=0,
            )
        per_arc = self.estimated_records() / max(1, sum(len(arcs) for arcs in by_owners.values()))
        size = max(1, min(MAX_ARCS_PER_BATCH, int(BATCH_RECORDS / max(per_arc, 1.0))))
        return [(owners, arcs[i : i + size]) for owners, arcs in by_owners.items() for i in range(0, len(arcs), size)]

    def required(self, owners: Sequence[str]) -> int:
        """Replicas of an arc that must answer: N - W + 1 (W: a quorum of N)."""
        return len(owners) - required_acks(Consistency.QUORUM, len(owners)) + 1

    def estimated_records(self) -> int:
        """Keys in the cluster, estimated from this node's share (for progress)."""
        members = max(1, len(self.topology.current.peers))
        copies = min(self.replication_factor, members)
        return self.replica.store.live_count() * members // copies

    async def batches(
        self, plan: list[tuple[tuple[str, ...], list[Arc]]], *, pace: float = DEFAULT_PACE
    ) -> AsyncIterator[Batch]:
        """Each planned batch's records, newest per key. The next batch is read
        while the caller handles the current one (PREFETCH_BATCHES ahead), and
        after each read the reader rests so that it works `pace` of the time
        (the caller's own work on a batch counts: note_busy)."""
        if not 0 < pace <= 1:
            raise InvalidRequestError(f"backup: pace must be in (0, 1], got {pace}")
        queue: asyncio.Queue[asyncio.Task[Batch]] = asyncio.Queue(maxsize=PREFETCH_BATCHES)
        rest_per_busy = (1 - pace) / pace

        async def feed() -> None:
            for owners, arcs in plan:
                started = time.monotonic()
                task = asyncio.ensure_future(self.read_batch(owners, arcs))
                try:
                    await queue.put(task)
                except BaseException:
                    task.cancel()
                    raise
                with contextlib.suppress(Exception):  # its failure reaches the consumer through the task
                    await task
                busy, self._caller_busy = time.monotonic() - started + self._caller_busy, 0.0
                if rest_per_busy:
                    await asyncio.sleep(busy * rest_per_busy)

        feeder = asyncio.ensure_future(feed())
        try:
            for _ in plan:
                task = await queue.get()
                yield await task
        finally:
            feeder.cancel()
            while not queue.empty():
                queue.get_nowait().cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await feeder

    def note_busy(self, seconds: float) -> None:
        """The caller spent `seconds` on a batch (encoding it): the next rest covers that too."""
        self._caller_busy += seconds

    async def read_batch(self, owners: tuple[str, ...], arcs: list[Arc]) -> Batch:
        if self.topology.current.epoch != self._epoch:
            raise MembershipChangedError(
                "backup: the ring's membership changed during the backup; run it again once rebalancing is done",
                required=0,
                answered=0,
            )
        needed = self.required(owners)
        # Digests from just N - W + 1 replicas (this node first: its records need
        # no hop), asking the next ones only for those that do not answer.
        candidates = iter(self._order(owners))
        reached: list[tuple[Peer, list[bytes]]] = []
        while len(reached) < needed:
            wave = [peer for _, peer in zip(range(needed - len(reached)), candidates, strict=False)]
            if not wave:
                raise QuorumError(
                    f"backup: only {len(reached)} of {len(owners)} replicas of {len(arcs)} arcs answered, "
                    f"{needed} needed; retry once the nodes are back",
                    required=needed,
                    answered=len(reached),
                )
            answers = await asyncio.gather(*(self._digests(peer, arcs) for peer in wave))
            reached += [(peer, digests) for peer, digests in zip(wave, answers, strict=True) if digests is not None]
        first = reached[0][1]
        agreeing = [arc for i, arc in enumerate(arcs) if all(digests[i] == first[i] for _, digests in reached)]
        records: Batch = await self._from_any([peer for peer, _ in reached], agreeing) if agreeing else []
        if len(agreeing) < len(arcs):
            agreed = set(agreeing)
            differing = [arc for arc in arcs if arc not in agreed]
            newest: dict[bytes, Record] = {}
            for part in await asyncio.gather(*(self._records(peer, differing) for peer, _ in reached)):
                for key, record in part:
                    held = newest.get(key)
                    if held is None or held.version < record.version:
                        newest[key] = record
            records.extend(newest.items())
        return records

    def _order(self, owners: tuple[str, ...]) -> list[Peer]:
        """This node first, then the reachable replicas least loaded first, then the rest."""
        peers = self.topology.current.peers
        others = [o for o in owners if o != self.node_id]
        ranked = self.health.rank(others)
        ordered = ([self.node_id] if self.node_id in owners else []) + ranked
        ordered += [o for o in others if o not in ranked]
        return [peers[o] for o in ordered]

    async def _digests(self, peer: Peer, arcs: list[Arc]) -> list[bytes] | None:
        """The peer's digests, or None when it cannot answer now."""
        if peer.node_id == self.node_id:
            return await asyncio.to_thread(self.replica.digests, arcs)
        try:
            return await self.peer_client.digests(peer, arcs)
        except PeerError as exc:
            self.health.call_failed(peer.node_id, exc)
            return None

    async def _from_any(self, peers: list[Peer], arcs: list[Arc]) -> Batch:
        """The arcs' records from the first of `peers` that answers (their
        digests agreed: any of them holds every version the others do)."""
        failures: list[str] = []
        for peer in peers:
            try:
                return await self._records(peer, arcs)
            except PeerError as exc:
                self.health.call_failed(peer.node_id, exc)
                failures.append(str(exc))
        raise QuorumError(f"backup: no replica sent its records: {'; '.join(failures)}", required=1, answered=0)

    async def _records(self, peer: Peer, arcs: list[Arc]) -> Batch:
        if peer.node_id == self.node_id:
            return await asyncio.to_thread(self.replica.records_in_arcs, arcs)
        return await self.peer_client.records_in_arcs(peer, arcs)
