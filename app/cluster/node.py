"""A node: store, hints, membership view, peer health, the coordinator, and
the background loops that keep replicas converging (peer probes, which also
measure clock offsets, hint delivery, anti-entropy with foreign-record
handoff, TTL sweeps).

Built by the composition root (app.web.app), which hands it the peer client;
it never imports a web or network library itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from app.clock import HybridClock, wall_ms
from app.cluster.clock_offsets import ClockOffsets
from app.cluster.coordinator import Coordinator, required_acks
from app.cluster.handoff import Handoff
from app.cluster.health import PeerHealth
from app.cluster.membership import Membership, MembershipView
from app.cluster.repair import AntiEntropy
from app.cluster.replica import Replica
from app.config import NodeConfig
from app.discovery.base import MembershipSource
from app.discovery.static import StaticMembership
from app.errors import PeerError
from app.metrics import NodeMetrics
from app.storage import open_hint_store, open_store
from app.transport.base import Peer, PeerClient

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 1.0  # how soon a peer that came back is routed to again
HINT_INTERVAL_S = 1.0  # how soon hints reach a replica after it is back
MAX_LOOP_BACKOFF_S = 30.0  # a failing background loop retries at most this far apart


class Node:
    def __init__(self, config: NodeConfig, *, metrics: NodeMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or NodeMetrics()
        max_offset_ms = int(config.max_clock_offset * 1000)
        self.clock = HybridClock(config.node_id, max_offset_ms=max_offset_ms)
        self.offsets = ClockOffsets(max_offset_ms=max_offset_ms)
        self.membership = MembershipView(self_id=config.node_id, members=config.peers, vnodes=config.vnodes)
        self.health = PeerHealth(on_flip=self._on_peer_flip)
        self.replica: Replica | None = None
        self.coordinator: Coordinator | None = None
        self.handoff: Handoff | None = None
        self.anti_entropy: AntiEntropy | None = None
        self.started_at = time.monotonic()
        self.members_known = False
        self.source: MembershipSource = StaticMembership(config.peers)
        self._starts_empty = False
        self._tasks: list[asyncio.Task[None]] = []
        self.membership.on_change(self._on_membership_change)
        self._on_membership_change(self.membership.current, self.membership.current)

    @property
    def store(self):  # type: ignore[no-untyped-def]
        return self.replica.store if self.replica else None

    async def start(self, transport: PeerClient, *, source: MembershipSource | None = None) -> None:
        """Open the stores (off the event loop: a big LMDB may take a moment),
        start the membership source and the loops. A node that starts empty
        pulls its ranges once it knows its ring (see set_members)."""
        store = await asyncio.to_thread(open_store, self.config)
        hints = await asyncio.to_thread(open_hint_store, self.config)
        # Never stamp below a version this node already holds, whatever its
        # wall clock says after the restart.
        self.clock.restore(max(store.high_water(), hints.high_water()))
        self.metrics.track_keys(store.live_count)
        self.replica = Replica(store=store, hints=hints, clock=self.clock)
        common = dict(
            replica=self.replica, transport=transport, health=self.health,
            membership=self.membership, metrics=self.metrics, replication_factor=self.config.replication_factor,
        )
        self.coordinator = Coordinator(clock=self.clock, offsets=self.offsets, **common)  # type: ignore[arg-type]
        self.handoff = Handoff(
            node_id=self.config.node_id,
            write_quorum=required_acks("quorum", self.config.replication_factor),
            sync_deadline_s=self.config.sync_deadline,
            **common,  # type: ignore[arg-type]
        )
        self.anti_entropy = AntiEntropy(node_id=self.config.node_id, **common)  # type: ignore[arg-type]
        self._starts_empty = store.live_count() == 0
        self.source = source or StaticMembership(self.config.peers)
        self.metrics.membership_staleness.set_function(self.source.staleness_s)
        self._tasks = [
            asyncio.create_task(self._run_source()),
            asyncio.create_task(self._forever("peer probe", PROBE_INTERVAL_S, self._probe_peers)),
            asyncio.create_task(self._forever("hint delivery", HINT_INTERVAL_S, self.handoff.deliver_hints)),
            asyncio.create_task(self._forever("anti-entropy", self.config.anti_entropy_interval, self._repair_round)),
            asyncio.create_task(self._forever("sweep", self.config.sweep_interval, self._sweep)),
        ]

    async def drain(self) -> None:
        """Before exiting: a node that is no longer a member hands every record
        to its new owners first (a scale-down must not drop a key below N
        copies). Bounded by --sync-deadline; a member just stops."""
        if self.handoff is None:
            return
        try:
            await asyncio.wait_for(self.source.refresh(self), timeout=PROBE_INTERVAL_S * 5)
        except Exception:  # an unreachable API must not block shutdown
            log.warning("could not re-read membership before exiting", exc_info=True)
        if self.config.node_id in self.membership.current.peers:
            return
        log.warning("this node left the ring: handing its records to their owners before exiting")
        deadline = time.monotonic() + self.config.sync_deadline
        self.handoff.foreign_dirty = True
        while time.monotonic() < deadline:
            await self.handoff.handoff_foreign()
            if not self.handoff.foreign_dirty:
                log.warning("hand-off complete")
                return
            await asyncio.sleep(PROBE_INTERVAL_S)
        log.error("hand-off incomplete at the deadline: %d records left", self.handoff.status.foreign_keys)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.coordinator is not None:
            await self.coordinator.transport.close()
        if self.replica is not None:
            await asyncio.to_thread(self.replica.store.close)
            await asyncio.to_thread(self.replica.hints.close)
            self.replica = None

    # -- the membership source's sink ----------------------------------------

    async def set_members(self, members: dict[str, str]) -> None:
        await self.apply_membership(members, propagate=False)
        if not self.members_known:
            self.members_known = True
            if self._starts_empty and len(self.membership.current.peers) > 1 and self.handoff is not None:
                self.handoff.bootstrap()

    def set_ready(self, node_id: str, ready: bool) -> None:
        if node_id != self.config.node_id:
            self.health.set_source_ready(node_id, ready)

    def record_source_error(self, reason: str) -> None:
        self.metrics.membership_errors.inc()
        log.warning("membership source: %s", reason)

    async def _run_source(self) -> None:
        """The source runs for the node's lifetime; if it ever fails, restart it."""
        delay = PROBE_INTERVAL_S
        while True:
            try:
                await self.source.run(self)
                if self.members_known:
                    return  # a one-shot source (static) is done
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("membership source failed; restarting it")
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_LOOP_BACKOFF_S)

    def not_ready_reason(self) -> str | None:
        """None when the node can serve: store open, ring known, initial sync done."""
        if self.replica is None or self.coordinator is None:
            return "store is not open yet"
        if not self.members_known:
            return "waiting for the first member list from the membership source"
        if self.config.node_id not in self.membership.current.ring:
            return "this node is not a member of its own ring"
        if self.handoff is not None and self.handoff.status.syncing and self.handoff.bootstrapping:
            return f"pulling {self.handoff.status.pending_ranges} ranges from their previous replicas"
        return self.offsets.refusal()

    async def apply_membership(self, members: dict[str, str], *, propagate: bool) -> tuple[Membership, list[str]]:
        """Swap in a new member list; with propagate, tell every old and new
        member too. Returns the new view and the members that could not be told."""
        old = self.membership.current
        new = self.membership.update(members)
        failed: list[str] = []
        if propagate and self.coordinator is not None:
            targets = {**old.peers, **new.peers}
            targets.pop(self.config.node_id, None)

            async def tell(node_id: str) -> None:
                try:
                    await self.coordinator.transport.set_membership(targets[node_id], members)  # type: ignore[union-attr]
                except PeerError as exc:
                    log.warning("could not propagate membership to %s: %s", node_id, exc)
                    failed.append(node_id)

            await asyncio.gather(*(tell(node_id) for node_id in targets))
        return new, failed

    async def _forever(self, name: str, interval: float, step: Callable[[], Awaitable[object]]) -> None:
        """Run step every interval; never die silently: log and back off on errors."""
        delay = interval
        while True:
            await asyncio.sleep(delay)
            try:
                await step()
                delay = interval
            except Exception:
                log.exception("%s loop failed; retrying", name)
                delay = min(delay * 2, MAX_LOOP_BACKOFF_S)

    async def _repair_round(self) -> None:
        assert self.anti_entropy is not None and self.handoff is not None
        await self.anti_entropy.run_round()
        await self.handoff.handoff_foreign()

    async def _probe_peers(self) -> None:
        """A down peer is asked whether it is back; an up one what time it is."""
        assert self.coordinator is not None
        view = self.membership.current
        down = set(self.health.down_peers())
        others = [peer for node_id, peer in view.peers.items() if node_id != self.config.node_id]
        results = await asyncio.gather(*(
            self.coordinator.transport.probe(peer) if peer.node_id in down else self._measure_offset(peer)
            for peer in others
        ))
        for peer, answered in zip(others, results):
            if answered and peer.node_id in down:
                self.health.mark_up(peer.node_id)
        for node_id in view.peers:
            if node_id != self.config.node_id:
                state = self.health.snapshot(node_id)
                self.metrics.peer_outstanding.labels(node_id).set(state.outstanding)
                self.metrics.peer_latency.labels(node_id).set(state.latency_s)

    async def _measure_offset(self, peer: Peer) -> bool:
        """Read the peer's wall clock between two of ours (NTP's midpoint rule)."""
        assert self.coordinator is not None
        sent_wall = self.clock.wall_ms()
        started = time.monotonic()
        try:
            theirs = await self.coordinator.transport.wall_clock(peer)
        except PeerError:
            return False
        self.offsets.record(peer.node_id, sent_wall_ms=sent_wall, round_trip_ms=(time.monotonic() - started) * 1000,
                            peer_wall_ms=theirs)
        offset = self.offsets.offset_ms(peer.node_id)
        if offset is not None:
            self.metrics.clock_offset.labels(peer.node_id).set(offset / 1000)
        return True

    async def _sweep(self) -> None:
        if self.replica is not None:
            await asyncio.to_thread(self.replica.store.sweep, wall_ms())
            await asyncio.to_thread(self.replica.hints.sweep, wall_ms())

    def _on_peer_flip(self, node_id: str, up: bool) -> None:
        self.metrics.peer_up.labels(node_id).set(1 if up else 0)
        self._count_reachable()

    def _count_reachable(self) -> None:
        others = [n for n in self.membership.current.peers if n != self.config.node_id]
        self.metrics.peers_reachable.set(sum(self.health.is_up(n) for n in others))

    def _on_membership_change(self, old: Membership, new: Membership) -> None:
        self.metrics.ring_members.set(len(new.peers))
        for node_id in new.peers:
            if node_id != self.config.node_id:
                self.metrics.peer_up.labels(node_id).set(1 if self.health.is_up(node_id) else 0)
        for node_id in set(old.peers) - set(new.peers):
            self.health.forget(node_id)
            self.offsets.forget(node_id)
            self.metrics.peer_up.remove(node_id)
            with contextlib.suppress(KeyError):  # never measured
                self.metrics.clock_offset.remove(node_id)
        if self.coordinator is not None:
            for node_id, peer in old.peers.items():  # gone, or moved to another URL
                if node_id not in new.peers or new.peers[node_id].url != peer.url:
                    self.coordinator.transport.forget(peer)
        self._count_reachable()
        if old is not new and self.handoff is not None:
            self.handoff.on_membership_change(old, new)
