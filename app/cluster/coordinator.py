"""The coordinator: turns one client operation into calls on the key's replicas.

Whichever node a client hits coordinates (Dynamo-style): it stamps writes with
its hybrid clock and sends them to the key's N replicas in parallel, answering
once W are durable; a replica that cannot take a write has it held as a hint
by the next reachable node on the ring (sloppy quorum), or by the coordinator
itself when the ring has no spare node. Reads ask the R least-loaded replicas
(asking more only when one fails or is still syncing), answer with the newest
version, and repair stale replicas in the background. No HTTP here: errors are
app.errors types, absence is None.

A write is acknowledged only if it won. Each replica's ack says whether it
kept a newer version instead (a clock behind the cluster's, or a restart that
forgot the clock); then the write is re-stamped above that version and sent
again, up to MAX_WRITE_ROUNDS times, and otherwise fails with 503
(WriteNotWonError): never a 2xx for a value that will not be read back.
A node whose clock is off from most of its peers' coordinates no write.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import logging
from collections.abc import Awaitable, Iterator
from enum import StrEnum
from typing import Any, TypeVar

from app.clock import HybridClock, Version, wall_ms
from app.cluster.clock_offsets import ClockOffsets
from app.cluster.context import ClusterContext, ClusterWorker
from app.cluster.hedging import Hedger, Scheduler
from app.cluster.topology import Topology
from app.errors import (
    ClockOffsetError,
    FutureVersionError,
    InvalidRequestError,
    PeerError,
    PeerUnavailableError,
    QuorumError,
    WriteNotWonError,
)
from app.storage.base import Record
from app.transport.base import Peer, ReadAnswer, WriteAck

log = logging.getLogger(__name__)
T = TypeVar("T")


class Consistency(StrEnum):
    """How many replicas must answer a data request (`?consistency=`)."""

    ONE = "one"
    QUORUM = "quorum"
    ALL = "all"

    @classmethod
    def parse(cls, raw: str) -> Consistency:
        """The level a request asked for; InvalidRequestError (400) for any other word."""
        level = _CONSISTENCY_BY_NAME.get(raw)
        if level is None:
            raise InvalidRequestError(f"consistency must be one of {', '.join(cls)}, got {raw!r}")
        return level


_CONSISTENCY_BY_NAME = {level.value: level for level in Consistency}  # a dict, not Enum(): every request parses one
CONSISTENCY_LEVELS = tuple(Consistency)


class Landing(enum.Enum):
    """Where one replica's copy of a write landed."""

    DIRECT = "direct"  # on the replica itself
    HINTED = "hinted"  # held by a spare node for it (sloppy quorum): counts toward W
    UNCOUNTED = "uncounted"  # held here for it with no spare left: delivered later, no extra copy


# A write that lost to a newer version is re-stamped above it and sent again.
# One re-stamp fixes a clock that was behind; a third loss means another
# writer keeps racing this key, and the client is better told (503) and retrying.
MAX_WRITE_ROUNDS = 3


def required_acks(consistency: str, replicas: int) -> int:
    """W or R for a level (a Consistency, or its name: InvalidRequestError for another word)."""
    level = Consistency.parse(consistency)
    if level is Consistency.QUORUM:
        return replicas // 2 + 1
    if level is Consistency.ONE:
        return 1
    return replicas


class Coordinator(ClusterWorker):
    def __init__(
        self,
        context: ClusterContext,
        *,
        clock: HybridClock,
        offsets: ClockOffsets,
        scheduler: Scheduler | None = None,
    ) -> None:
        super().__init__(context)
        self.clock = clock
        self.offsets = offsets
        self.hedger = Hedger(scheduler=scheduler)
        self._background: set[asyncio.Future[Any]] = set()

    def replicas_for(self, key: bytes) -> list[Peer]:
        view = self.topology.current
        return [view.peers[node_id] for node_id in view.ring.owners(key, self.replication_factor)]

    # -- reads ----------------------------------------------------------------

    async def get(self, key: bytes, *, consistency: str = Consistency.QUORUM) -> Record | None:
        """The newest live record among the replicas asked, or None if absent."""
        replicas = self.replicas_for(key)
        needed = required_acks(consistency, len(replicas))
        if len(replicas) == 1 and replicas[0].node_id == self.node_id:
            record = self.replica.read(key).record  # the single-owner local hit: no tasks
            return record if record is not None and record.live(wall_ms()) else None
        answers = await self._read_quorum(key, replicas, needed)
        newest = max((a.record for _, a in answers if a.record is not None), default=None, key=_version)
        if newest is not None:
            # A version this node has seen: its next stamp must be later (a
            # clock far ahead of ours is not followed; its writes get refused).
            self.clock.observe_if_plausible(newest.version)
            stale = [peer for peer, a in answers if a.record is None or a.record.version < newest.version]
            if stale:
                self._keep(asyncio.ensure_future(self._repair(key, newest, stale)))
        if newest is None or not newest.live(wall_ms()):
            return None
        return newest

    def _read_order(self, replicas: list[Peer]) -> list[Peer]:
        """This node first when it is a replica (no hop), the rest by load."""
        by_id = {peer.node_id: peer for peer in replicas}
        local = [by_id.pop(self.node_id)] if self.node_id in by_id else []
        return local + [by_id[node_id] for node_id in self.health.rank(list(by_id))]

    async def _read_quorum(self, key: bytes, replicas: list[Peer], needed: int) -> list[tuple[Peer, ReadAnswer]]:
        """Ask `needed` replicas; for each that fails or is still syncing, ask
        one more. Every answer is returned (non-authoritative ones too: they
        may still hold the newest version, and are repaired if stale)."""
        round_ = _ReadRound(self, key, iter(self._read_order(replicas)), needed)
        await round_.finished
        if round_.authoritative < needed:
            self.metrics.quorum_failures.labels("read").inc()
            raise _quorum_error(
                "read", answered=round_.authoritative, needed=needed, asked=len(replicas), failures=round_.failures
            )
        return round_.answers

    def _read_soon(self, peer: Peer, key: bytes) -> asyncio.Future[ReadAnswer]:
        """A replica read under way, counted and accounted in the peer's
        health by a callback (a late answer still lands there)."""
        self.metrics.count_forwarded(peer.node_id, "read")
        started = self.health.begin(peer.node_id)
        call = self.peer_client.read_soon(peer, key)
        call.add_done_callback(functools.partial(self._account, peer.node_id, started))
        return call

    async def _repair(self, key: bytes, newest: Record, stale: list[Peer]) -> None:
        """Read repair: bring replicas that answered with an older version up to date."""
        for peer in stale:
            try:
                if peer.node_id == self.node_id:
                    await self.replica.write(key, newest)
                else:
                    await self._remote(peer, self.peer_client.write(peer, key, newest))
                self.metrics.read_repairs.inc()
            except (PeerError, FutureVersionError) as exc:
                # Not the client's problem (its read was answered), and anti-entropy repairs it later.
                self.metrics.read_repair_failures.inc()
                log.debug("read repair of a key on %s failed: %s", peer.node_id, exc)

    # -- writes ---------------------------------------------------------------

    async def put(
        self, key: bytes, value: bytes, *, ttl_s: float | None = None, consistency: str = Consistency.QUORUM
    ) -> Version:
        self._refuse_if_clock_off()
        expires = wall_ms() + int(ttl_s * 1000) if ttl_s else 0
        record = Record(self.clock.now(), value, expires)
        written, _ = await self._write(key, record, consistency)
        return written.version

    async def delete(self, key: bytes, *, consistency: str = Consistency.QUORUM) -> bool:
        """Write a tombstone; True if any replica that answered held a live value."""
        self._refuse_if_clock_off()
        _, acks = await self._write(key, Record(version=self.clock.now(), value=None), consistency)
        return any(ack.existed for ack in acks)

    def _refuse_if_clock_off(self) -> None:
        reason = self.offsets.refusal()
        if reason is not None:
            raise ClockOffsetError(f"{reason}; this node coordinates no writes until then, send them to another node")

    async def _write(self, key: bytes, record: Record, consistency: str) -> tuple[Record, list[WriteAck]]:
        """Write until the record wins on enough replicas; the record as
        finally stamped, and the acks of the replicas that hold it."""
        view = self.topology.current
        owners = view.ring.owners(key, self.replication_factor)
        needed = required_acks(consistency, len(owners))
        newer: Version | None = None
        for _ in range(MAX_WRITE_ROUNDS):
            if len(owners) == 1 and owners[0] == self.node_id:
                ack = await self.replica.write_soon(key, record)
                acks, newer = ([ack], None) if ack.won else ([], ack.newer)
            else:
                round_ = await self._write_round(view, key, record, owners, needed)
                acks, newer = round_.acks, round_.newer
                if newer is None and len(acks) < needed and round_.skipped:
                    extra, newer = await self._second_chance(key, record, round_.skipped)
                    acks = acks + extra
                if newer is None and len(acks) < needed:
                    self.metrics.quorum_failures.labels("write").inc()
                    raise _quorum_error(
                        "write", answered=len(acks), needed=needed, asked=len(owners), failures=round_.failures
                    )
            if newer is None:
                return record, acks
            record = self._restamp(record, above=newer)
        self.metrics.quorum_failures.labels("write").inc()
        raise WriteNotWonError(
            f"write not acknowledged: after {MAX_WRITE_ROUNDS} rounds replicas still held a newer version "
            f"({newer.encode() if newer else '?'}): other writers keep racing this key; retry"
        )

    async def _write_round(
        self, view: Topology, key: bytes, record: Record, owners: tuple[str, ...], needed: int
    ) -> _WriteRound:
        """Send the write to every owner at once (the replicas that are still
        running after the quorum still get it). Driven by callbacks on each
        call's future, not a task per replica: the remote calls are the
        coalescer's own futures, the local copy the replica's, and only a
        replica that fails or is marked down gets a task, to find a spare
        node for its hint."""
        round_ = _WriteRound(self, view, key, record, needed, len(owners))
        for node_id in owners:
            peer = view.peers[node_id]
            if node_id == self.node_id:
                self.replica.write_soon(key, record).add_done_callback(round_.local_done)
            elif self.health.is_up(node_id):
                call = self._write_soon(peer, key, record)
                call.add_done_callback(functools.partial(round_.remote_done, peer))
            else:
                round_.skipped.append(peer)
                round_.hint_elsewhere(peer)
        await round_.finished
        return round_

    def _restamp(self, record: Record, *, above: Version) -> Record:
        """The record again, stamped later than `above`, a version a replica
        kept instead of it. A version beyond the clock bound cannot be
        overtaken honestly: the write fails rather than jump the clock."""
        try:
            self.clock.observe(above)
        except FutureVersionError as exc:
            self.metrics.quorum_failures.labels("write").inc()
            raise WriteNotWonError(f"write not acknowledged: a replica holds a newer version: {exc}") from exc
        self.metrics.write_restamps.inc()
        return dataclasses.replace(record, version=self.clock.now())

    def _spares(self, view: Topology, key: bytes, skip: int) -> Iterator[Peer]:
        """Spare nodes for sloppy quorum: the rest of the ring, clockwise,
        reachable now. Lazy: only a failed replica write walks it."""
        for node_id in view.ring.owners(key, len(view.ring))[skip:]:
            if node_id == self.node_id or self.health.is_up(node_id):
                yield view.peers[node_id]

    async def _second_chance(
        self, key: bytes, record: Record, peers: list[Peer]
    ) -> tuple[list[WriteAck], Version | None]:
        """The write failed its quorum only because some replicas were marked
        down: try them directly after all. Reachability can lag the network
        (a partition that just healed), and the write itself is the probe; a
        replica that really is gone fails or times out as it would have."""

        async def one(peer: Peer) -> WriteAck | None:
            try:
                return await self._write_direct(peer, key, record)
            except PeerError:
                return None

        answers = [ack for ack in await asyncio.gather(*(one(peer) for peer in peers)) if ack is not None]
        newer = max((ack.newer for ack in answers if ack.newer is not None), default=None)
        return [ack for ack in answers if ack.won], newer

    async def _hint_elsewhere(self, peer: Peer, key: bytes, record: Record, spares: Iterator[Peer]) -> _Landed:
        """The replica cannot take the write: have a spare hold a hint for it."""
        for spare in spares:
            try:
                if spare.node_id == self.node_id:
                    ack = await self.replica.write(key, record, hint_for=peer.node_id)
                else:
                    ack = await self._remote(spare, self.peer_client.write(spare, key, record, hint_for=peer.node_id))
                self.metrics.hints_stored.inc()
                return Landing.HINTED, ack
            except PeerError:
                continue
        # No spare left: keep the hint here so the replica still gets the write
        # when it returns, but it is no extra copy, so it does not count toward W.
        await self.replica.write(key, record, hint_for=peer.node_id)
        self.metrics.hints_stored.inc()
        return Landing.UNCOUNTED, WriteAck(applied=False, existed=False)

    # -- plumbing -------------------------------------------------------------

    def _write_soon(self, peer: Peer, key: bytes, record: Record) -> asyncio.Future[WriteAck]:
        """_write_direct as a future: counted and accounted in the peer's health
        by callbacks (registered first, so health is current before the
        caller's own callbacks run)."""
        self.metrics.count_forwarded(peer.node_id, "write")
        started = self.health.begin(peer.node_id)
        call = self.peer_client.write_soon(peer, key, record)
        call.add_done_callback(functools.partial(self._account, peer.node_id, started))
        return call

    def _account(self, node_id: str, started: float, call: asyncio.Future[Any]) -> None:
        """What _remote does after a call, for a call made as a future."""
        exc = None if call.cancelled() else call.exception()
        if call.cancelled() or (exc is not None and not isinstance(exc, PeerError)):
            self.health.end(node_id, started, answered=False)
        elif exc is None:
            self.health.end(node_id, started)
            self.health.mark_up(node_id)
        else:
            assert isinstance(exc, PeerError)
            answered = not isinstance(exc, PeerUnavailableError)
            self.health.end(node_id, started, answered=answered)
            if answered:
                self.health.mark_up(node_id)
            else:
                self.health.call_failed(node_id, exc)

    def _write_direct(self, peer: Peer, key: bytes, record: Record) -> Awaitable[WriteAck]:
        """One replica write to a peer, counted as forwarded and in its health
        (the call itself, awaited by the caller: no extra coroutine per write)."""
        self.metrics.count_forwarded(peer.node_id, "write")
        return self._remote(peer, self.peer_client.write(peer, key, record))

    async def _remote(self, peer: Peer, call: Awaitable[T]) -> T:
        """A call to a peer, accounted in its health: an answer of any kind,
        a refusal included, proves it reachable; no answer marks it down (and
        a long silence does sooner: PeerHealth.trip_silent)."""
        started = self.health.begin(peer.node_id)
        try:
            result = await call
        except PeerError as exc:
            answered = not isinstance(exc, PeerUnavailableError)
            self.health.end(peer.node_id, started, answered=answered)
            if answered:
                self.health.mark_up(peer.node_id)
            else:
                self.health.call_failed(peer.node_id, exc)
            raise
        except BaseException:
            self.health.end(peer.node_id, started, answered=False)
            raise
        self.health.end(peer.node_id, started)
        self.health.mark_up(peer.node_id)
        return result

    def _keep(self, task: asyncio.Future[Any]) -> None:
        """Hold a reference to a background task and log its failure."""
        self._background.add(task)

        def done(t: asyncio.Future[Any]) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.debug("background replica call failed: %s", t.exception())

        task.add_done_callback(done)


class _ReadRound:
    """One quorum read: asks replicas in order until `needed` authoritative
    answers arrive or the order runs out; a failed or still-syncing replica
    makes it ask one more. Driven by done-callbacks rather than asyncio.wait,
    which rebuilds its waiter set on every wake-up: this runs per request."""

    def __init__(self, coordinator: Coordinator, key: bytes, order: Iterator[Peer], needed: int) -> None:
        self.coordinator, self.key, self.order, self.needed = coordinator, key, order, needed
        self.answers: list[tuple[Peer, ReadAnswer]] = []
        self.failures: list[str] = []
        self.authoritative = 0
        self.in_flight = 0
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for peer in _take(order, needed):
            self._ask(peer)
        self._maybe_finish()

    def _ask(self, peer: Peer) -> None:
        coordinator = self.coordinator
        if peer.node_id == coordinator.node_id:  # the local copy: no task, no hop
            self._answered(peer, coordinator.replica.read(self.key))
            return
        task = coordinator._read_soon(peer, self.key)
        self.in_flight += 1
        node_id = peer.node_id
        coordinator.hedger.watch(
            node_id, coordinator.health.hedge_delay(node_id), task, lambda: self._hedge(peer, task)
        )
        task.add_done_callback(lambda t: self._on_done(peer, t))

    def _hedge(self, peer: Peer, task: asyncio.Future[ReadAnswer]) -> None:
        """The replica has not answered within its p95: ask the next one too,
        and the first answers win."""
        if task.done() or self.finished.done():
            return
        self.coordinator.metrics.hedged_reads.inc()
        self._ask_one_more()

    def _on_done(self, peer: Peer, task: asyncio.Future[ReadAnswer]) -> None:
        self.in_flight -= 1
        if self.finished.done():
            return
        exc = (
            task.exception()
            if not task.cancelled()
            else PeerUnavailableError(f"read from {peer} cancelled", peer=peer.node_id)
        )
        if exc is None:
            self._answered(peer, task.result())
        elif isinstance(exc, PeerError):
            self.coordinator.metrics.replica_read_failures.labels(peer.node_id).inc()
            self.failures.append(str(exc))
            self._ask_one_more()
        else:
            self.finished.set_exception(exc)
            return
        self._maybe_finish()

    def _answered(self, peer: Peer, answer: ReadAnswer) -> None:
        self.answers.append((peer, answer))
        if answer.authoritative:
            self.authoritative += 1
        else:
            self._ask_one_more()

    def _ask_one_more(self) -> None:
        for extra in _take(self.order, 1):
            self._ask(extra)

    def _maybe_finish(self) -> None:
        if not self.finished.done() and (self.authoritative >= self.needed or self.in_flight == 0):
            self.finished.set_result(None)


_Landed = tuple[Landing, WriteAck]


class _WriteRound:
    """One write sent to every owner: counts outcomes as each replica's call
    completes; `finished` resolves once `needed` replicas hold the write or
    every replica has answered. `newer` is the newest version a replica kept
    instead of the write, if any did."""

    def __init__(
        self, coordinator: Coordinator, view: Topology, key: bytes, record: Record, needed: int, replicas: int
    ) -> None:
        self.coordinator, self.view, self.key, self.record = coordinator, view, key, record
        self.needed, self.owners, self.remaining = needed, replicas, replicas
        self.acks: list[WriteAck] = []
        self.newer: Version | None = None
        self.skipped: list[Peer] = []  # replicas not tried because they were marked down
        self.failures: list[str] = []
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._spares: Iterator[Peer] | None = None  # shared by every failed replica, so each gets another spare

    def local_done(self, task: asyncio.Future[WriteAck]) -> None:
        self._settle(task, Landing.DIRECT)

    def remote_done(self, peer: Peer, call: asyncio.Future[WriteAck]) -> None:
        """A direct write to a peer is over; one that failed is hinted elsewhere."""
        exc = None if call.cancelled() else call.exception()
        if isinstance(exc, PeerError):  # unreachable, or refused (say, its clock is behind ours by more than the bound)
            coordinator = self.coordinator
            coordinator.metrics.replica_write_failures.labels(peer.node_id).inc()
            if not isinstance(exc, PeerUnavailableError):
                log.info("replica %s refused a write: %s", peer.node_id, exc)
            self.hint_elsewhere(peer)
            return
        self._settle(call, Landing.DIRECT)

    def hint_elsewhere(self, peer: Peer) -> None:
        coordinator = self.coordinator
        if self._spares is None:
            self._spares = coordinator._spares(self.view, self.key, self.owners)
        task = asyncio.ensure_future(coordinator._hint_elsewhere(peer, self.key, self.record, self._spares))
        coordinator._keep(task)
        task.add_done_callback(self._settle_landed)

    def _settle(self, call: asyncio.Future[WriteAck], landing: Landing) -> None:
        if call.cancelled():
            self._count(None, "a replica write was cancelled")
        elif (exc := call.exception()) is None:
            self._count((landing, call.result()), None)
        else:
            self._count_error(exc)

    def _settle_landed(self, task: asyncio.Future[_Landed]) -> None:
        if task.cancelled():
            self._count(None, "a replica write was cancelled")
        elif (exc := task.exception()) is None:
            self._count(task.result(), None)
        else:
            self._count_error(exc)

    def _count_error(self, exc: BaseException) -> None:
        if isinstance(exc, (PeerError, FutureVersionError)):
            self._count(None, str(exc))
        else:
            self.remaining -= 1
            if not self.finished.done():
                self.finished.set_exception(exc)

    def _count(self, landed: _Landed | None, failure: str | None) -> None:
        self.remaining -= 1
        if self.finished.done():
            return
        if landed is None:
            assert failure is not None
            self.failures.append(failure)
        else:
            landing, ack = landed
            if landing is Landing.UNCOUNTED:
                self.failures.append("a replica was unreachable and no spare node could hold its hint")
            elif not ack.won:
                assert ack.newer is not None
                self.newer = ack.newer if self.newer is None else max(self.newer, ack.newer)
            else:
                self.acks.append(ack)
        if len(self.acks) >= self.needed or self.remaining == 0:
            self.finished.set_result(None)


def _quorum_error(what: str, *, answered: int, needed: int, asked: int, failures: list[str]) -> QuorumError:
    detail = "; ".join(failures) if failures else "replicas did not answer in time"
    return QuorumError(
        f"{what} quorum not reached: {answered} of {needed} required replicas answered ({asked} replicas): {detail}",
        required=needed,
        answered=answered,
    )


def _take(iterator: Iterator[T], count: int) -> list[T]:
    taken: list[T] = []
    if count <= 0:
        return taken
    for item in iterator:
        taken.append(item)
        if len(taken) == count:
            break
    return taken


def _version(record: Record) -> Version:
    return record.version
