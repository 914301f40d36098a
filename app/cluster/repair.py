"""Anti-entropy: replicas converge even when nobody reads the keys.

Each round this node picks the next peer (round robin) and compares, for every
ring arc both of them replicate, a digest of the records they hold (an XOR of
per-record hashes: order-independent, cheap to compute in one pass). Only the
arcs whose digests differ are exchanged: this node pulls the peer's records
there (last writer wins locally) and pushes back the ones it holds newer. The
arc digests play the role of a Merkle tree's leaves; with arcs this small the
tree's upper levels would save little and cost a second round trip.
Paced by --anti-entropy-interval and capped per round, so it cannot starve
client traffic; the digest work runs in a thread.
"""

from __future__ import annotations

import asyncio
import itertools

from app.cluster.context import ClusterContext, ClusterWorker
from app.errors import PeerError
from app.storage.base import Record
from app.transport.base import Peer

ARCS_PER_EXCHANGE = 64  # mismatched arcs fetched per request
MAX_ARCS_PER_ROUND = 1024  # bound on one round's repair work; the rest waits for the next round


class AntiEntropy(ClusterWorker):
    def __init__(self, context: ClusterContext) -> None:
        super().__init__(context)
        self._turn = itertools.count()
        self.rounds = 0

    def shared_arcs(self, peer_id: str) -> list[tuple[int, int]]:
        ring = self.topology.current.ring
        return [
            arc
            for arc, owners in ring.replica_sets(self.replication_factor)
            if self.node_id in owners and peer_id in owners
        ]

    async def run_round(self) -> int:
        """Compare with the next reachable peer; returns the records repaired."""
        view = self.topology.current
        peers = [p for p in sorted(view.peers) if p != self.node_id and self.health.is_up(p)]
        if not peers or self.node_id not in view.peers:
            return 0
        peer_id = peers[next(self._turn) % len(peers)]
        repaired = await self.compare_with(peer_id)
        self.rounds += 1
        return repaired

    async def compare_with(self, peer_id: str) -> int:
        peer = self.topology.current.peers[peer_id]
        arcs = self.shared_arcs(peer_id)
        if not arcs:
            return 0
        try:
            theirs = await self.peer_client.digests(peer, arcs)
        except PeerError as exc:
            self.health.call_failed(peer_id, exc)
            return 0
        mine = await asyncio.to_thread(self.replica.digests, arcs)
        self.metrics.ae_ranges_compared.inc(len(arcs))
        differing = [arc for arc, a, b in zip(arcs, mine, theirs, strict=True) if a != b]
        self.metrics.ae_ranges_mismatched.inc(len(differing))
        repaired = 0
        for i in range(0, min(len(differing), MAX_ARCS_PER_ROUND), ARCS_PER_EXCHANGE):
            chunk = differing[i : i + ARCS_PER_EXCHANGE]
            try:
                repaired += await self._exchange(peer, chunk)
            except PeerError as exc:
                self.health.call_failed(peer_id, exc)
                break
        self.metrics.ae_keys_repaired.inc(repaired)
        return repaired

    async def _exchange(self, peer: Peer, arcs: list[tuple[int, int]]) -> int:
        theirs = await self.peer_client.records_in_arcs(peer, arcs)
        pulled = await self.replica.write_batch(theirs)
        their_versions = {key: record.version for key, record in theirs}
        mine: list[tuple[bytes, Record]] = await asyncio.to_thread(self.replica.records_in_arcs, arcs)
        newer = [(k, r) for k, r in mine if (v := their_versions.get(k)) is None or v < r.version]
        pushed = await self.peer_client.write_batch(peer, newer) if newer else 0
        return pulled + pushed
