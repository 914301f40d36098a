"""The coordinator: turns one client operation into calls on the key's replicas.

Whichever node a client hits coordinates: it stamps writes with its hybrid
clock, sends them to the key's preference list (its own store directly, other
replicas through the PeerClient), and answers once enough replicas have. It
also serves the replica side (replica_read / replica_write) that the internal
routes and the in-process fake transport call. No HTTP here: errors are
app.errors types, absence is None.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from app.clock import HybridClock, Version, wall_ms
from app.cluster.health import PeerHealth
from app.cluster.membership import MembershipView
from app.errors import InvalidRequestError, PeerUnavailableError, QuorumError
from app.metrics import NodeMetrics
from app.storage.base import Record, Store
from app.transport.base import Peer, PeerClient, WriteAck

log = logging.getLogger(__name__)
T = TypeVar("T")

CONSISTENCY_LEVELS = ("one", "quorum", "all")


def required_acks(consistency: str, replicas: int) -> int:
    if consistency == "quorum":
        return replicas // 2 + 1
    if consistency == "one":
        return 1
    if consistency == "all":
        return replicas
    raise InvalidRequestError(f"consistency must be one of {', '.join(CONSISTENCY_LEVELS)}, got {consistency!r}")


class Coordinator:
    def __init__(
        self,
        *,
        membership: MembershipView,
        store: Store,
        clock: HybridClock,
        transport: PeerClient,
        health: PeerHealth,
        metrics: NodeMetrics,
        replication_factor: int,
    ) -> None:
        self.membership = membership
        self.store = store
        self.clock = clock
        self.transport = transport
        self.health = health
        self.metrics = metrics
        self.replication_factor = replication_factor
        self.node_id = clock.node_id
        self._background: set[asyncio.Task[object]] = set()

    # -- client side -------------------------------------------------------

    def replicas_for(self, key: bytes) -> list[Peer]:
        view = self.membership.current
        owners = view.ring.owners(key, self.replication_factor)
        return [view.peers[node_id] for node_id in owners]

    async def get(self, key: bytes, *, consistency: str = "quorum") -> Record | None:
        """The newest live record among the replicas asked, or None if absent."""
        replicas = self.replicas_for(key)
        needed = required_acks(consistency, len(replicas))
        if len(replicas) == 1 and replicas[0].node_id == self.node_id:
            answers = [self.replica_read(key)]  # the single-owner local hit: no tasks, no gather
        else:
            answers = await self._quorum(replicas, needed, "read", lambda peer: self._read_one(peer, key))
        newest = max((record for record in answers if record is not None), default=None, key=_version)
        if newest is None or not newest.live(wall_ms()):
            return None
        return newest

    async def put(
        self, key: bytes, value: bytes, *, ttl_s: float | None = None, consistency: str = "quorum"
    ) -> Version:
        expires = wall_ms() + int(ttl_s * 1000) if ttl_s else 0
        record = Record(version=self.clock.now(), value=value, expires_at_ms=expires)
        await self._write(key, record, consistency)
        return record.version

    async def delete(self, key: bytes, *, consistency: str = "quorum") -> bool:
        """Write a tombstone; True if any replica that answered held a live value."""
        acks = await self._write(key, Record(version=self.clock.now(), value=None), consistency)
        return any(ack.existed for ack in acks)

    async def _write(self, key: bytes, record: Record, consistency: str) -> list[WriteAck]:
        replicas = self.replicas_for(key)
        needed = required_acks(consistency, len(replicas))
        return await self._quorum(replicas, needed, "write", lambda peer: self._write_one(peer, key, record))

    async def _read_one(self, peer: Peer, key: bytes) -> Record | None:
        if peer.node_id == self.node_id:
            return self.replica_read(key)
        self.metrics.forwarded.labels(peer.node_id, "read").inc()
        return await self._remote(peer, self.transport.read(peer, key))

    async def _write_one(self, peer: Peer, key: bytes, record: Record) -> WriteAck:
        if peer.node_id == self.node_id:
            return await self.replica_write(key, record)
        self.metrics.forwarded.labels(peer.node_id, "write").inc()
        return await self._remote(peer, self.transport.write(peer, key, record))

    async def _remote(self, peer: Peer, call: Awaitable[T]) -> T:
        try:
            result = await call
        except PeerUnavailableError as exc:
            self.health.mark_down(peer.node_id, str(exc))
            raise
        self.health.mark_up(peer.node_id)
        return result

    async def _quorum(
        self, replicas: list[Peer], needed: int, what: str, call: Callable[[Peer], Awaitable[T]]
    ) -> list[T]:
        """Run call on every replica in parallel; return once `needed` succeeded.

        Calls still running after that finish in the background (a write still
        reaches every replica). Raises QuorumError when too few can succeed.
        """
        if len(replicas) == 1:
            return [await call(replicas[0])]  # its PeerUnavailableError names the owner
        pending = {asyncio.ensure_future(call(peer)) for peer in replicas}
        results: list[T] = []
        failures: list[str] = []
        while pending and len(results) < needed:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is None:
                    results.append(task.result())
                elif isinstance(exc, PeerUnavailableError):
                    failures.append(str(exc))
                else:
                    raise exc
        for task in pending:
            self._keep(task)
        if len(results) < needed:
            raise QuorumError(
                f"{what} quorum not reached: {len(results)} of {needed} required replicas answered"
                f" ({len(replicas)} asked): " + "; ".join(failures),
                required=needed,
                answered=len(results),
            )
        return results

    def _keep(self, task: asyncio.Task[object]) -> None:
        """Hold a reference to a background task and log its failure."""
        self._background.add(task)

        def done(t: asyncio.Task[object]) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.debug("background replica call failed: %s", t.exception())

        task.add_done_callback(done)

    # -- replica side -------------------------------------------------------

    def replica_read(self, key: bytes) -> Record | None:
        return self.store.get(key)

    async def replica_write(self, key: bytes, record: Record) -> WriteAck:
        """Apply a write here; return once it is as durable as the policy asks."""
        self.clock.observe(record.version)
        result = self.store.apply(key, record)
        durable = self.store.wait_durable()
        if durable is not None:
            await asyncio.wrap_future(durable)
        previous = result.previous
        return WriteAck(applied=result.applied, existed=previous is not None and previous.live(wall_ms()))


def _version(record: Record) -> Version:
    return record.version
