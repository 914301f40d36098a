"""Pulling the arcs a node newly replicates, after a membership change or at
the start of an empty node: each arc comes from ONE previous replica, streamed
in large ordered batches with back-pressure; the other previous replicas the
write-quorum rule needs are then checked by digest, and only the arcs that
differ are pulled from them. Until then the arcs are non-authoritative
(Replica.syncing), so a read never counts this node's partial copy.

Why that is enough: an acknowledged write reached W of the old replicas, so
any (old replicas - W + 1) of them include one that holds it. After the first
source's pull this node holds everything that source held; each further source
either agrees by digest (an XOR of (key, version) fingerprints: equal digests,
equal record sets) or its differing arcs are pulled. Called by app.cluster.handoff.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass

from app.cluster.context import ClusterContext, ClusterWorker
from app.cluster.replica import FULL_SCAN_ABOVE_ARCS
from app.cluster.topology import Topology
from app.errors import PeerError
from app.ring import ArcSet, HashRing, segments
from app.storage.base import DIGEST_BYTES, Record
from app.transport.base import Peer

log = logging.getLogger(__name__)

_Batch = tuple[list[tuple[int, int]], list[tuple[bytes, Record]]]  # the arcs fetched, and their records

EMPTY_DIGEST = bytes(DIGEST_BYTES)  # the digest of an arc holding no record
# A fetch of ~20k records (~3 MB at 100-byte values) is ~0.1 s of work on
# each side: large enough that per-request costs vanish, small enough that a
# client request never waits long behind one. Arcs per fetch adapt to it.
TARGET_RECORDS_PER_FETCH = 20_000
FIRST_ARCS_PER_FETCH = 8  # before the first answer says how full arcs are
# At most this many arcs per fetch: above it the source's Replica.records_in_arcs
# reads its whole store in one pass (right for anti-entropy's many small
# arcs, ruinous per rebalancing batch: measured, a 1M-key join spent 96 s of
# CPU instead of ~20 s).
MAX_ARCS_PER_FETCH = FULL_SCAN_ABOVE_ARCS
PREFETCH = 2  # batches fetched ahead of the one being applied: memory stays within ~3 batches
# Digests are asked for in chunks of this many arcs: at or below the replica's
# per-arc threshold (Replica.digests), so a source still building its digest
# index answers them by reading only those arcs instead of refusing.
DIGEST_ARCS = FULL_SCAN_ABOVE_ARCS
SYNC_RETRY_S = 0.2  # first retry delay when a source is unreachable; doubles up to SYNC_RETRY_MAX_S
SYNC_RETRY_MAX_S = 2.0


@dataclass
class RebalanceStatus:
    """What /admin/rebalance and the metrics report, kept current throughout."""

    syncing: bool = False
    pending_ranges: int = 0
    keys_streamed: int = 0  # records received by every pull since start
    records_pulled: int = 0  # records received by the last (or current) sync
    records_needed: int = 0  # records this node holds in the arcs that sync gained, counted as it goes
    surplus_keys: int = 0  # records held in arcs this node does not replicate, not yet handed off
    surplus_ranges: int = 0  # arcs holding them
    last_change_epoch: int = 0

    @property
    def foreign_keys(self) -> int:
        """The name earlier versions reported surplus under (kept for readers of it)."""
        return self.surplus_keys


def sources_needed(sources: int, write_quorum: int) -> int:
    """How many of an arc's previous replicas must be synced from: any
    (sources - W + 1) of them include one that took each acknowledged write."""
    if sources >= write_quorum:
        return max(1, sources - write_quorum + 1)
    return sources


class Rebalance(ClusterWorker):
    def __init__(self, context: ClusterContext, *, write_quorum: int, status: RebalanceStatus) -> None:
        super().__init__(context)
        self.write_quorum = write_quorum
        self.status = status
        self._pulls: dict[str, int] = defaultdict(int)  # pulls running against each source right now

    async def sync(self, old_ring: HashRing, new: Topology, urls: dict[str, Peer], deadline: float) -> None:
        """Pull every arc this node replicates on `new` but did not on old_ring."""
        groups: dict[tuple[str, ...], list[tuple[int, int]]] = defaultdict(list)
        for start, end, before, after in segments(old_ring, new.ring, self.replication_factor):
            if self.node_id in after and self.node_id not in before and before:
                groups[tuple(sorted(before))].append((start, end))
        gained = [arc for arcs in groups.values() for arc in arcs]
        self.status.records_pulled = 0
        self.status.records_needed = await asyncio.to_thread(self._count_held, gained)
        self._set_syncing(gained, epoch=new.epoch)
        await asyncio.gather(*(self._sync_group(sources, arcs, urls, deadline) for sources, arcs in groups.items()))

    def _count_held(self, arcs: list[tuple[int, int]]) -> int:
        """Records already here in the arcs (a node rejoining with data): per-arc
        range reads, so an empty node reads nothing."""
        store = self.replica.store
        return sum(1 for start, end in arcs for _ in store.iter_range(start, end))

    async def _sync_group(
        self, sources: tuple[str, ...], arcs: list[tuple[int, int]], urls: dict[str, Peer], deadline: float
    ) -> None:
        need = sources_needed(len(sources), self.write_quorum)
        # A source with no known URL can give nothing: it counts as done, as it
        # always has (the quorum rule then leans on the others and anti-entropy).
        known = [s for s in sources if s in urls]
        covered: dict[tuple[int, int], set[str]] = {arc: {s for s in sources if s not in urls} for arc in arcs}
        delay = SYNC_RETRY_S
        failing: set[str] = set()  # sources whose last attempt failed: others are preferred
        while True:
            todo = [arc for arc in arcs if len(covered[arc]) < need]
            self._release([arc for arc in arcs if len(covered[arc]) >= need])
            if not todo:
                return
            if time.monotonic() >= deadline:
                log.warning(
                    "sync of %d arcs gave up after the deadline; anti-entropy will finish it (sources %s)",
                    len(todo),
                    ", ".join(known),
                )
                self._release(todo)
                return
            plan = self._assign(todo, covered, known, failing)
            if not plan:
                self._release(todo)
                return
            results = await asyncio.gather(
                *(self._sync_from(urls[source], assigned) for source, assigned in plan.items())
            )
            progressed = False
            for source, (done, ok) in zip(plan, results, strict=True):
                for arc in done:
                    covered[arc].add(source)
                progressed |= bool(done)
                if ok:
                    failing.discard(source)
                else:
                    failing.add(source)
            if not progressed:
                await asyncio.sleep(delay)
                delay = min(delay * 2, SYNC_RETRY_MAX_S)

    def _assign(
        self,
        todo: list[tuple[int, int]],
        covered: dict[tuple[int, int], set[str]],
        sources: list[str],
        failing: set[str],
    ) -> dict[str, list[tuple[int, int]]]:
        """One more source per arc, spread evenly: reachable sources that did
        not just fail first, and
        among them the ones this node pulls from least right now, then the
        lower latency score of the health tracker (bulk pulls are few and long,
        so their own count says more about a source's load than per-request
        latency does). Each arc is streamed from one source only; the next
        pass checks it against another by digest."""

        def load(source: str) -> tuple[bool, int, float]:
            return (not self.health.is_up(source), self._pulls[source], self.health.state(source).latency_s)

        ranked = sorted(sources, key=load)
        given: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for arc in todo:
            candidates = [s for s in ranked if s not in covered[arc]]
            if not candidates:
                continue
            up = [s for s in candidates if self.health.is_up(s) and s not in failing] or candidates
            best = min(up, key=lambda s: (len(given[s]), ranked.index(s)))
            given[best].append(arc)
        return dict(given)

    async def _sync_from(self, peer: Peer, arcs: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], bool]:
        """Make this node hold everything the source holds in the arcs: arcs
        empty here are streamed whole; the others are compared by digest and
        only differing ones streamed. Returns the arcs done (all, unless the
        source failed part-way) and whether it answered throughout."""
        done: list[tuple[int, int]] = []
        self._pulls[peer.node_id] += 1
        try:
            mine = await self._my_digests(arcs)
            to_pull = [arc for arc, digest in zip(arcs, mine, strict=True) if digest == EMPTY_DIGEST]
            compare = [(arc, digest) for arc, digest in zip(arcs, mine, strict=True) if digest != EMPTY_DIGEST]
            for i in range(0, len(compare), DIGEST_ARCS):
                chunk = compare[i : i + DIGEST_ARCS]
                theirs = await self.peer_client.digests(peer, [arc for arc, _ in chunk])
                for (arc, digest), their in zip(chunk, theirs, strict=True):
                    if their == digest:
                        done.append(arc)  # we hold exactly what it holds there
                    else:
                        to_pull.append(arc)
            to_pull.sort(key=lambda arc: arc[1])  # ring order: each fetch reads adjacent LMDB pages
            await self._stream(peer, to_pull, done)
        except PeerError as exc:  # the probe loop, not a bulk pull, judges whether the source is down
            log.info("sync from %s stopped with %d of %d arcs done, will retry: %s", peer, len(done), len(arcs), exc)
            return done, False
        finally:
            self._pulls[peer.node_id] -= 1
        return done, True

    async def _my_digests(self, arcs: list[tuple[int, int]]) -> list[bytes]:
        out: list[bytes] = []
        for i in range(0, len(arcs), DIGEST_ARCS):
            out += await asyncio.to_thread(self.replica.digests, arcs[i : i + DIGEST_ARCS])
        return out

    async def _stream(self, peer: Peer, arcs: list[tuple[int, int]], done: list[tuple[int, int]]) -> None:
        """Fetch the arcs' records in batches and apply them; the next batch
        is fetched while the previous one is applied, and at most PREFETCH
        wait (back-pressure: a slow disk here slows the source's reads)."""
        if not arcs:
            return
        batches: asyncio.Queue[_Batch | Exception | None] = asyncio.Queue(PREFETCH)

        async def fetch() -> None:
            per_fetch, i = FIRST_ARCS_PER_FETCH, 0
            try:
                while i < len(arcs):
                    chunk = arcs[i : i + per_fetch]
                    records = await self.peer_client.records_in_arcs(peer, chunk)
                    await batches.put((chunk, records))
                    i += len(chunk)
                    per_arc = max(1.0, len(records) / len(chunk))
                    per_fetch = max(1, min(MAX_ARCS_PER_FETCH, int(TARGET_RECORDS_PER_FETCH / per_arc)))
            except Exception as exc:  # noqa: BLE001 - not swallowed: the applier re-raises it after what came before
                await batches.put(exc)
                return
            await batches.put(None)

        fetcher = asyncio.ensure_future(fetch())
        try:
            while (item := await batches.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                chunk, records = item
                _, new_keys = await self.replica.write_pulled(records)
                self.status.keys_streamed += len(records)
                self.status.records_pulled += len(records)
                self.status.records_needed += new_keys
                self.metrics.rebalance_keys_streamed.labels("in").inc(len(records))
                done.extend(chunk)
        finally:
            fetcher.cancel()

    def release_all(self) -> None:
        self._set_syncing([], epoch=self.status.last_change_epoch)

    def _release(self, arcs: list[tuple[int, int]]) -> None:
        """These arcs are synced (or given up on): serve them as authoritative."""
        if not arcs:
            return
        finished = set(arcs)
        still = [arc for arc in self.replica.syncing.arcs if arc not in finished]
        if len(still) != len(self.replica.syncing.arcs):
            self._set_syncing(still, epoch=self.status.last_change_epoch)

    def _set_syncing(self, arcs: list[tuple[int, int]], *, epoch: int) -> None:
        self.replica.syncing = ArcSet(arcs)
        self.status.syncing = bool(arcs)
        self.status.pending_ranges = len(arcs)
        self.status.last_change_epoch = epoch
        self.metrics.syncing_ranges.set(len(arcs))
