"""A node: store, hints, topology, peer health, what each peer speaks
(capabilities), the coordinator, and the background loops that keep
replicas converging (peer probes, which also measure clock offsets, hint
delivery, anti-entropy with a check for surplus copies, TTL sweeps). It is
also the membership source's sink.

Opened by the composition root (app.web.app), which hands it the peer client
and the membership source; it never imports a web or network library itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from app.clock import HybridClock, wall_ms
from app.cluster.anti_entropy import AntiEntropy
from app.cluster.capabilities import Capabilities
from app.cluster.clock_offsets import ClockOffsets
from app.cluster.context import ClusterContext
from app.cluster.coordinator import Consistency, Coordinator, required_acks
from app.cluster.handoff import Handoff
from app.cluster.health import PeerHealth
from app.cluster.hedging import Scheduler
from app.cluster.replica import Replica
from app.cluster.topology import CurrentTopology, Topology
from app.config import NodeConfig
from app.errors import PeerError
from app.membership.base import MembershipSource
from app.metrics import NodeMetrics
from app.storage import HintStore, Store, open_hint_store, open_store
from app.transport.base import Peer, PeerClient

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 1.0  # clock offsets measured, gauges refreshed, the membership re-read on exit
# Four times a second: a peer silent past its suspect delay is marked down
# (the breaker), and a peer marked down is asked whether it is back, so a
# healed link is used again within a quarter second even when no request
# proves it sooner.
PEER_WATCH_INTERVAL_S = 0.25
HINT_INTERVAL_S = 1.0  # how soon hints reach a replica after it is back
MAX_LOOP_BACKOFF_S = 30.0  # a failing background loop retries at most this far apart


class Node:
    """One running node, whole once built: `await Node.open(...)` opens its
    stores, builds every part and starts its loops; `close()` stops them and
    closes the stores. No part is ever missing in between."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        store: Store,
        hints: HintStore,
        peer_client: PeerClient,
        source: MembershipSource,
        metrics: NodeMetrics,
        wall: Callable[[], int] = wall_ms,
        scheduler: Scheduler | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.peer_client = peer_client
        self.membership_source = source
        max_offset_ms = int(config.max_clock_offset * 1000)
        self.clock = HybridClock(config.node_id, wall=wall, max_offset_ms=max_offset_ms)
        # Never stamp below a version this node already holds, whatever its
        # wall clock says after the restart.
        self.clock.restore(max(store.high_water(), hints.high_water()))
        self.offsets = ClockOffsets(max_offset_ms=max_offset_ms)
        self.topology = CurrentTopology(self_id=config.node_id, members=config.peers, vnodes=config.vnodes)
        self.health = PeerHealth(
            on_flip=self._on_peer_flip, monotonic=scheduler.time if scheduler is not None else time.monotonic
        )
        # What each member speaks, from the protocol header of its requests
        # and answers; a peer too old or too new is kept down (and named).
        self.capabilities = Capabilities(self_id=config.node_id, on_verdict=self.health.set_incompatible)
        peer_client.on_protocol(self.capabilities.observe)
        self.replica = Replica(store=store, hints=hints, clock=self.clock)
        context = ClusterContext(
            node_id=config.node_id,
            replica=self.replica,
            peer_client=peer_client,
            health=self.health,
            topology=self.topology,
            metrics=metrics,
            replication_factor=config.replication_factor,
        )
        self.coordinator = Coordinator(context, clock=self.clock, offsets=self.offsets, scheduler=scheduler)
        self.handoff = Handoff(
            context,
            write_quorum=required_acks(Consistency.QUORUM, config.replication_factor),
            sync_deadline_s=config.sync_deadline,
        )
        self.anti_entropy = AntiEntropy(context)
        self.members_known = False
        self._source_error: str | None = None  # the source's last failure, shown by /ready until members are known
        self._starts_empty = store.live_count() == 0
        self._tasks: list[asyncio.Task[None]] = []
        metrics.track_keys(store.live_count)
        metrics.track_storage(used=lambda: self._usage()[0], limit=lambda: self._usage()[1])
        metrics.track_syncs(store="data", policy=config.fsync, stats=store.sync_stats)
        metrics.track_syncs(store="hints", policy=config.fsync, stats=hints.sync_stats)
        metrics.ranges_below_quorum.set_function(self._ranges_below_quorum)
        metrics.digest_index_ready.set_function(lambda: float(store.digests_ready()))
        metrics.membership_staleness.set_function(source.staleness_s)
        own = self.capabilities.own
        metrics.build_info.labels(own.release, str(own.protocol), str(own.min_protocol)).set(1)
        metrics.cluster_protocol.set_function(self.capabilities.cluster_protocol)
        metrics.peers_incompatible.set_function(lambda: len(self.capabilities.incompatible_members()))
        self.topology.on_change(self._on_topology_change)
        self._on_topology_change(self.topology.current, self.topology.current)

    @classmethod
    async def open(
        cls,
        config: NodeConfig,
        *,
        peer_client: PeerClient,
        source: MembershipSource,
        metrics: NodeMetrics | None = None,
        wall: Callable[[], int] = wall_ms,
        scheduler: Scheduler | None = None,
    ) -> Node:
        """Open the stores (off the event loop: a big LMDB may take a moment),
        build the node and start its loops. A node that starts empty pulls its
        ranges once it knows its ring (see set_members). `wall` is the wall
        clock its versions are stamped from (tests skew it); `scheduler` the
        monotonic clock and timer of peer health's breaker and of read hedging
        (None: time.monotonic and the running loop; unit tests advance a manual one)."""
        store = await asyncio.to_thread(open_store, config)
        try:
            hints = await asyncio.to_thread(open_hint_store, config)
        except BaseException:
            store.close()
            raise
        node = cls(
            config,
            store=store,
            hints=hints,
            peer_client=peer_client,
            source=source,
            metrics=metrics or NodeMetrics(),
            wall=wall,
            scheduler=scheduler,
        )
        node._tasks = [
            asyncio.create_task(node._run_source()),
            asyncio.create_task(node._forever("clock probe", PROBE_INTERVAL_S, node._probe_clocks)),
            asyncio.create_task(node._forever("peer watch", PEER_WATCH_INTERVAL_S, node._watch_peers)),
            asyncio.create_task(node._forever("hint delivery", HINT_INTERVAL_S, node.handoff.deliver_hints)),
            asyncio.create_task(node._forever("anti-entropy", config.anti_entropy_interval, node._repair_round)),
            asyncio.create_task(node._forever("sweep", config.sweep_interval, node._sweep)),
        ]
        return node

    @property
    def store(self) -> Store:
        return self.replica.store

    async def drain(self) -> None:
        """Before exiting: a node that is no longer a member hands every record
        to its new owners first (a scale-down must not drop a key below N
        copies). The whole drain, re-read included, is bounded by
        --drain-deadline (the chart fits it inside the pod's grace period, so
        the kubelet never kills a hand-off half-way); what is left then is
        logged. A member just stops."""
        deadline = time.monotonic() + self.config.drain_deadline
        try:
            await asyncio.wait_for(
                self.membership_source.refresh(self), timeout=min(PROBE_INTERVAL_S * 5, self.config.drain_deadline)
            )
        except Exception:  # an unreachable API must not block shutdown
            log.warning("could not re-read membership before exiting", exc_info=True)
        if self.config.node_id in self.topology.current.peers:
            return
        log.warning(
            "this node left the ring: handing its records to their owners before exiting (at most %.1f s, "
            "--drain-deadline)",
            max(0.0, deadline - time.monotonic()),
        )
        if await self.handoff.drain(deadline):
            log.warning("hand-off complete")
            return
        left = self.handoff.status.surplus_keys
        log.error(
            "drain: %s records not handed off within --drain-deadline %.1f s (KVSTORE_DRAIN_DEADLINE; the chart "
            "derives it from terminationGracePeriodSeconds): their other replicas still hold them if they were "
            "written at quorum, and anti-entropy restores the missing copies",
            left if left else "an unknown number of",
            self.config.drain_deadline,
        )

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.peer_client.close()
        await asyncio.to_thread(self.replica.store.close)
        await asyncio.to_thread(self.replica.hints.close)

    # -- the membership source's sink -------------------------------------------

    async def set_members(self, members: dict[str, str]) -> None:
        await self.apply_membership(members, propagate=False)
        if not self.members_known:
            self.members_known = True
            if self._starts_empty and len(self.topology.current.peers) > 1:
                self.handoff.bootstrap()
            self.handoff.on_start()

    def set_peer_ready(self, node_id: str, ready: bool) -> None:
        if node_id != self.config.node_id:
            self.health.set_source_ready(node_id, ready)

    def record_source_error(self, reason: str) -> None:
        self.metrics.membership_errors.inc()
        self._source_error = reason
        log.warning("membership source: %s", reason)

    async def _run_source(self) -> None:
        """The source runs for the node's lifetime; if it ever fails, restart it."""
        delay = PROBE_INTERVAL_S
        while True:
            try:
                await self.membership_source.run(self)
                if self.members_known:
                    return  # a one-shot source (static) is done
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("membership source failed; restarting it")
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_LOOP_BACKOFF_S)

    def not_ready_reason(self) -> str | None:
        """None when the node can serve: ring known, initial sync done, clock within bounds."""
        if not self.members_known:
            if self._source_error:
                return f"waiting for the first member list from the membership source: {self._source_error}"
            return "waiting for the first member list from the membership source"
        if self.config.node_id not in self.topology.current.ring:
            return "this node is not a member of its own ring"
        if self.handoff.bootstrapping:
            left = self.handoff.status.pending_ranges
            return f"pulling {left or 'its'} ranges from their previous replicas"
        return self.offsets.refusal()

    async def apply_membership(self, members: dict[str, str], *, propagate: bool) -> tuple[Topology, list[str]]:
        """Swap in a new member list; with propagate, tell every old and new
        member too. Returns the new view and the members that could not be told."""
        old = self.topology.current
        new = self.topology.update(members)
        failed: list[str] = []
        if propagate:
            targets = {**old.peers, **new.peers}
            targets.pop(self.config.node_id, None)

            async def tell(node_id: str) -> None:
                try:
                    await self.peer_client.set_membership(targets[node_id], members)
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
        await self.anti_entropy.run_round()
        await self.handoff.check_surplus()

    async def _watch_peers(self) -> None:
        """Trip the breaker on silent peers; ask each peer marked down whether it is back."""
        for node_id in self.health.trip_silent():
            log.warning("peer %s marked down: %s", node_id, self.health.state(node_id).last_error)
        view = self.topology.current
        down = [view.peers[node_id] for node_id in self.health.down_peers() if node_id in view.peers]
        results = await asyncio.gather(*(self.peer_client.probe(peer) for peer in down), return_exceptions=True)
        for peer, answered in zip(down, results, strict=True):
            if isinstance(answered, PeerError):  # e.g. PeerTLSError: still down, and now /ring says why
                self.health.mark_down(peer.node_id, str(answered))
            elif isinstance(answered, BaseException):
                raise answered
            elif answered:
                self.health.mark_up(peer.node_id)

    async def _probe_clocks(self) -> None:
        """Ask each peer that is up what time it is; refresh the per-peer gauges."""
        view = self.topology.current
        up = [
            peer
            for node_id, peer in view.peers.items()
            if node_id != self.config.node_id and self.health.is_up(node_id)
        ]
        await asyncio.gather(*(self._measure_offset(peer) for peer in up))
        for node_id in view.peers:
            if node_id != self.config.node_id:
                state = self.health.state(node_id)
                self.metrics.peer_outstanding.labels(node_id).set(state.outstanding)
                self.metrics.peer_latency.labels(node_id).set(state.latency_s)

    async def _measure_offset(self, peer: Peer) -> bool:
        """Read the peer's wall clock between two of ours (NTP's midpoint rule)."""
        sent_wall = self.clock.reading_ms()
        started = time.monotonic()
        try:
            theirs = await self.peer_client.wall_clock(peer)
        except PeerError:
            return False
        self.offsets.record(
            peer.node_id, sent_wall_ms=sent_wall, round_trip_ms=(time.monotonic() - started) * 1000, peer_wall_ms=theirs
        )
        offset = self.offsets.offset_ms(peer.node_id)
        if offset is not None:
            self.metrics.clock_offset.labels(peer.node_id).set(offset / 1000)
        return True

    async def _sweep(self) -> None:
        await asyncio.to_thread(self.replica.store.sweep, wall_ms())
        await asyncio.to_thread(self.replica.hints.sweep, wall_ms())

    def _usage(self) -> tuple[int, int]:
        """(used, limit) bytes of the data store; (0, 0) for one without a limit."""
        usage = self.replica.store.usage()
        return (0, 0) if usage is None else (usage.used_bytes, usage.limit_bytes)

    def _ranges_below_quorum(self) -> int:
        """Arcs of the ring with fewer than a write quorum of replicas up, as
        this node sees them (itself counted up). Computed when scraped: one
        walk of the ring's precomputed preference lists, ~1 ms for 3 nodes."""
        ring = self.topology.current.ring
        if len(ring) == 0:
            return 0
        n = min(self.config.replication_factor, len(ring))
        needed = required_acks(Consistency.QUORUM, n)
        up = {node_id for node_id in ring.members if node_id == self.config.node_id or self.health.is_up(node_id)}
        return sum(1 for _, owners in ring.replica_sets(n) if len(up.intersection(owners)) < needed)

    def _on_peer_flip(self, node_id: str, up: bool) -> None:
        if not up and self.health.state(node_id).incompatible is None:
            # Away: its process may come back as another release (a rollback).
            # Until its next request or answer says which, no feature counts on it.
            self.capabilities.forget(node_id)
        self.metrics.peer_reachable.labels(node_id).set(1 if up else 0)
        self._count_reachable()

    def _count_reachable(self) -> None:
        others = [n for n in self.topology.current.peers if n != self.config.node_id]
        self.metrics.peers_reachable.set(sum(self.health.is_up(n) for n in others))

    def _on_topology_change(self, old: Topology, new: Topology) -> None:
        # The digest index re-cuts itself at the new ring's arcs in its own
        # thread (only the intervals a new boundary cuts are re-read).
        self.replica.store.align_digests(new.ring.ranges())
        self.metrics.ring_members.set(len(new.peers))
        self.capabilities.set_members(new.peers)
        for node_id in new.peers:
            if node_id != self.config.node_id:
                self.metrics.peer_reachable.labels(node_id).set(1 if self.health.is_up(node_id) else 0)
        for node_id in set(old.peers) - set(new.peers):
            self.health.forget(node_id)
            self.offsets.forget(node_id)
            self.metrics.peer_reachable.remove(node_id)
            with contextlib.suppress(KeyError):  # never measured
                self.metrics.clock_offset.remove(node_id)
        for node_id, peer in old.peers.items():  # gone, or moved to another URL
            if node_id not in new.peers or new.peers[node_id].url != peer.url:
                self.peer_client.forget(peer)
        self._count_reachable()
        if old is not new:
            self.handoff.on_membership_change(old, new)
