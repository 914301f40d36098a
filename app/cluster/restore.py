"""Writing a restored batch of records into the cluster with their original
versions: grouped by replica set on the current ring (any cluster size), each
group sent to every replica as one batch write (last writer wins there, so a
newer live write survives and a second restore changes nothing), and each
record acknowledged by W replicas or the request fails. Called by the restore
route (app.web.routes_backup).

A replica that is down is not hinted: the restore fails only if fewer than W
replicas took a group, and anti-entropy brings the missing copy later.
Versions from further ahead than --max-clock-offset are refused before
anything is written (FutureVersionError, 409): a backup restored later holds
older versions than the clock, so this only meets a backup taken from a
cluster whose clocks ran ahead.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from app.cluster.context import ClusterWorker
from app.cluster.coordinator import Consistency, required_acks
from app.errors import PeerError, QuorumError
from app.storage.base import Record
from app.transport.base import Peer


@dataclass(frozen=True, slots=True)
class RestoreResult:
    records: int  # records in the request, each now held by at least W replicas
    applied: int  # records newer than what some replica held (summed per replica set, the busiest replica)
    replica_writes_applied: int  # replica copies that changed, exactly

    @property
    def unchanged(self) -> int:
        return self.records - self.applied


class RestoreWriter(ClusterWorker):
    async def restore(self, records: list[tuple[bytes, Record]]) -> RestoreResult:
        if not records:
            return RestoreResult(0, 0, 0)
        clock = self.replica.clock
        for _, record in records:
            clock.observe(record.version)  # every version checked (and the clock moved past it) before any write
        view = self.topology.current
        groups: dict[tuple[str, ...], list[tuple[bytes, Record]]] = {}
        for key, record in records:
            groups.setdefault(view.ring.owners(key, self.replication_factor), []).append((key, record))
        results = await asyncio.gather(
            *(self._write_group([view.peers[o] for o in owners], group) for owners, group in groups.items())
        )
        return RestoreResult(
            records=len(records),
            applied=sum(max(counts) for counts in results),
            replica_writes_applied=sum(sum(counts) for counts in results),
        )

    async def _write_group(self, peers: list[Peer], records: list[tuple[bytes, Record]]) -> list[int]:
        """Every replica's count of records it took as newer; QuorumError if fewer than W took the batch."""
        answers = await asyncio.gather(*(self._write_one(peer, records) for peer in peers), return_exceptions=True)
        counts = [answer for answer in answers if isinstance(answer, int)]
        failures = [str(answer) for answer in answers if isinstance(answer, PeerError)]
        unexpected = [
            answer for answer in answers if isinstance(answer, BaseException) and not isinstance(answer, PeerError)
        ]
        if unexpected:
            raise unexpected[0]
        needed = required_acks(Consistency.QUORUM, len(peers))
        if len(counts) < needed:
            raise QuorumError(
                f"restore: {len(counts)} of {len(peers)} replicas took a batch of {len(records)} records, "
                f"{needed} needed: {'; '.join(failures)}; nothing after this chunk was written, retry the restore",
                required=needed,
                answered=len(counts),
            )
        return counts

    async def _write_one(self, peer: Peer, records: list[tuple[bytes, Record]]) -> int:
        if peer.node_id == self.node_id:
            return await self.replica.write_batch(records)
        try:
            return await self.peer_client.write_batch(peer, records)
        except PeerError as exc:
            self.health.call_failed(peer.node_id, exc)
            raise
