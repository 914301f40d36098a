"""Anti-entropy: replicas converge even when nobody reads the keys.

Each round this node picks the next peer (round robin) and compares, for every
ring arc both of them replicate, a digest of the records they hold: an XOR of
per-record hashes that each store keeps current on every write
(app.storage.digests), so a round in which nothing differs reads no records.
First one combined digest over all those arcs (the root: one request, each
side's value cached until its store changes); only when the roots differ
are the arcs compared one by one. A mismatched arc is narrowed to its
DIGEST_SUBARCS sub-arcs (a second level of the same digests, cut the same
way by both replicas from the same ring); only the sub-arcs that still
differ are exchanged: this node pulls the peer's
records there (last writer wins locally) and pushes back the ones it holds
newer. Measured (bench/scale.py, BENCHMARKS.md, with the costs of the
designs this one replaced): a round in which nothing differs costs ~1 ms of
CPU at 1M keys, both sides together. The second level costs one more round
trip, only when an arc differs, and cuts what one differing key moves from
its arc's records to its sub-arc's (1/16 of them).
Waits until the local index is built (at open, in a thread). Paced by
--anti-entropy-interval and capped per round, so it cannot starve client
traffic; the digest work runs in a thread.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass

from app.clock import wall_ms
from app.cluster.context import ClusterContext, ClusterWorker
from app.config import DIGEST_SUBARCS
from app.errors import DigestsBuildingError, PeerError, PeerUnavailableError, RingDiffersError
from app.storage.base import Record
from app.storage.digests import split_arc
from app.transport.base import Peer

ARCS_PER_EXCHANGE = 64  # mismatched sub-arcs fetched per request (a range scan each on both sides)
MAX_ARCS_PER_ROUND = 1024  # mismatched arcs repaired per round; the rest waits for the next round
# Digests compared per request: each side's share (index lookups, codec) is
# well under a millisecond, so a round never holds the event loop (or, from
# its thread, the GIL) long enough to show in client latency. All 3,072 arcs
# at once held it ~6 ms per side and doubled GET p99 under rounds every second.
DIGEST_ARCS_PER_REQUEST = 256


@dataclass(frozen=True, slots=True)
class RoundReport:
    """The last finished round, for /ring and the console: when, with whom, what it repaired."""

    finished_ms: int  # wall clock
    peer: str
    repaired: int  # records pulled here plus records pushed to the peer
    reached: bool  # False: the peer stopped answering during the round (nothing was compared)


class AntiEntropy(ClusterWorker):
    def __init__(self, context: ClusterContext) -> None:
        super().__init__(context)
        self._turn = itertools.count()
        self.rounds = 0
        self.repaired_total = 0
        self.last_round: RoundReport | None = None
        self._shared: tuple[object, dict[str, list[tuple[int, int]]]] = (None, {})

    def shared_arcs(self, peer_id: str) -> list[tuple[int, int]]:
        """The arcs both replicate; kept per ring (a few ms of Python to derive)."""
        ring = self.topology.current.ring
        if self._shared[0] is not ring:
            self._shared = (ring, {})
        cache = self._shared[1]
        if peer_id not in cache:
            cache[peer_id] = [
                arc
                for arc, owners in ring.replica_sets(self.replication_factor)
                if self.node_id in owners and peer_id in owners
            ]
        return cache[peer_id]

    async def run_round(self) -> int:
        """Compare with the next reachable peer; returns the records repaired."""
        view = self.topology.current
        peers = [p for p in sorted(view.peers) if p != self.node_id and self.health.is_up(p)]
        if not peers or self.node_id not in view.peers:
            return 0
        peer_id = peers[next(self._turn) % len(peers)]
        repaired = await self.compare_with(peer_id)
        self.rounds += 1
        self.repaired_total += repaired
        self.last_round = RoundReport(
            finished_ms=wall_ms(), peer=peer_id, repaired=repaired, reached=self.health.is_up(peer_id)
        )
        return repaired

    def ring_name(self) -> str:
        """What a peer must also have for "the arcs we both replicate" to mean the same arcs."""
        return f"{self.topology.current.ring.fingerprint}/{self.replication_factor}"

    async def shared_digest(self, peer_id: str) -> bytes:
        """This node's combined digest over the arcs it shares with the peer (a thread)."""
        return await asyncio.to_thread(self.replica.combined_digest, self.shared_arcs(peer_id))

    async def answer_shared_digest(self, asker: str, ring: str) -> bytes:
        """A peer's first question of a round; refused (NotComparableError)
        when this node's ring is another, or its index is still building."""
        if ring != self.ring_name() or asker not in self.topology.current.peers or asker == self.node_id:
            raise RingDiffersError(f"{asker} asked about ring {ring}; this node has {self.ring_name()}")
        if not self.replica.digests_ready():
            raise DigestsBuildingError("this node's digest index is still being built; ask again later")
        return await self.shared_digest(asker)

    async def compare_with(self, peer_id: str) -> int:
        peer = self.topology.current.peers[peer_id]
        arcs = self.shared_arcs(peer_id)
        if not arcs or not self.replica.digests_ready():
            return 0  # nothing shared, or the digest index is still being built (at open)
        agree = await self._combined_agree(peer)
        if agree is None:
            return 0
        if agree:
            self.metrics.ae_rounds.inc()
            self.metrics.ae_ranges_compared.inc(len(arcs))
            return 0
        differing = await self._differing(peer, arcs)
        if differing is None:
            return 0
        self.metrics.ae_rounds.inc()
        self.metrics.ae_ranges_compared.inc(len(arcs))
        self.metrics.ae_ranges_mismatched.inc(len(differing))
        if not differing:
            return 0
        # The Merkle level: the same digests over each mismatched arc's
        # sub-arcs, so only the records of the sub-arcs that differ move.
        subarcs = [sub for arc in differing[:MAX_ARCS_PER_ROUND] for sub in split_arc(*arc, DIGEST_SUBARCS)]
        narrowed = await self._differing(peer, subarcs)
        if narrowed is None:
            return 0
        repaired = 0
        for i in range(0, len(narrowed), ARCS_PER_EXCHANGE):
            chunk = narrowed[i : i + ARCS_PER_EXCHANGE]
            try:
                repaired += await self._exchange(peer, chunk)
            except PeerError as exc:
                self.health.call_failed(peer_id, exc)
                break
        self.metrics.ae_keys_repaired.inc(repaired)
        return repaired

    async def _combined_agree(self, peer: Peer) -> bool | None:
        """The Merkle root: one digest over every shared arc, each side's
        cached until its store changes, so a quiet round is one small request
        (at 1M keys: 0.8 ms of CPU, both sides; comparing arc by arc took 12
        exchanges a side and 17.5 ms). False: compare arc by arc (they
        differ, or the peer cannot say: another ring, an older version, a
        garbled answer); None: the peer is unreachable."""
        try:
            theirs = await self.peer_client.shared_digest(peer, asker=self.node_id, ring=self.ring_name())
        except PeerUnavailableError as exc:
            self.health.call_failed(peer.node_id, exc)
            return None
        except PeerError:  # refused or garbled: the arc-by-arc comparison can still work
            return False
        return theirs == await self.shared_digest(peer.node_id)

    async def _differing(self, peer: Peer, arcs: list[tuple[int, int]]) -> list[tuple[int, int]] | None:
        """The arcs whose digests differ here and at the peer (None: the peer failed)."""
        differing: list[tuple[int, int]] = []
        for i in range(0, len(arcs), DIGEST_ARCS_PER_REQUEST):
            chunk = arcs[i : i + DIGEST_ARCS_PER_REQUEST]
            try:
                theirs = await self.peer_client.digests(peer, chunk)
            except PeerError as exc:
                self.health.call_failed(peer.node_id, exc)
                return None
            mine = await asyncio.to_thread(self.replica.digests, chunk)
            differing += [arc for arc, a, b in zip(chunk, mine, theirs, strict=True) if a != b]
        return differing

    async def _exchange(self, peer: Peer, arcs: list[tuple[int, int]]) -> int:
        theirs = await self.peer_client.records_in_arcs(peer, arcs)
        pulled = await self.replica.write_batch(theirs)
        their_versions = {key: record.version for key, record in theirs}
        mine: list[tuple[bytes, Record]] = await asyncio.to_thread(self.replica.records_in_arcs, arcs)
        newer = [(k, r) for k, r in mine if (v := their_versions.get(k)) is None or v < r.version]
        pushed = await self.peer_client.write_batch(peer, newer) if newer else 0
        return pulled + pushed
