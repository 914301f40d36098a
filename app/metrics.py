"""Every Prometheus metric kvstore exports, declared once, in a registry per node
(so several nodes can live in one test process). The only module importing
prometheus_client. Labels are bounded: op, status, peer; never the key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from app.storage.flusher import SyncStats

# *_created series double every counter's output and no dashboard of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated

# Data-path latencies sit between ~100 us (local hit) and the peer timeout.
LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
OPS = ("get", "put", "delete")
REBALANCE_DIRECTIONS = ("in", "out")  # records pulled into this node, records handed off by it

__all__ = ["CONTENT_TYPE_LATEST", "NodeMetrics"]


class SyncCollector(Collector):
    """The stores' fsync counters, read from each store when scraped: the
    flusher counts its syncs anyway (app.storage.flusher.SyncStats), so
    nothing is counted per write and app.storage imports no metrics library.

    Counters rather than a histogram of writes per sync: rate(synced_writes)
    / rate(syncs) is the mean writes per fsync over any window, sums across
    nodes and stores, and costs nothing per sync; rate(seconds) / rate(syncs)
    the mean fsync time, the disk's health.
    """

    def __init__(self) -> None:
        self._sources: list[tuple[str, str, Callable[[], SyncStats | None]]] = []

    def track(self, *, store: str, policy: str, stats: Callable[[], SyncStats | None]) -> None:
        self._sources.append((store, policy, stats))

    def _families(self) -> tuple[CounterMetricFamily, CounterMetricFamily, CounterMetricFamily]:
        labels = ["store", "policy"]
        return (
            CounterMetricFamily(
                "kvstore_storage_syncs",
                "fsyncs of a local store (store=data or hints), by --fsync policy: under always, one per "
                "group commit; under batch, at most one per window.",
                labels=labels,
            ),
            CounterMetricFamily(
                "kvstore_storage_synced_writes",
                "Writes (records changed) those fsyncs made durable; divided by kvstore_storage_syncs_total, "
                "the writes that shared each fsync.",
                labels=labels,
            ),
            CounterMetricFamily("kvstore_storage_sync_seconds", "Time spent in those fsyncs.", labels=labels),
        )

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield from self._families()

    def collect(self) -> Iterator[CounterMetricFamily]:
        syncs, writes, seconds = self._families()
        for store, policy, read in self._sources:
            stats = read()
            if stats is None:
                continue  # an engine that never syncs (memory): no series
            syncs.add_metric([store, policy], stats.syncs)
            writes.add_metric([store, policy], stats.synced_writes)
            seconds.add_metric([store, policy], stats.sync_seconds)
        yield from (syncs, writes, seconds)


class NodeMetrics:
    """The metrics of one node. Hot-path children are bound once, up front."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "kvstore_requests_total",
            "Client requests served, by operation and HTTP status.",
            ["op", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "kvstore_request_duration_seconds",
            "Client request latency, by operation.",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.forwarded = Counter(
            "kvstore_forwarded_requests_total",
            "Requests this node sent to another node on a client's behalf, by peer and operation.",
            ["peer", "op"],
            registry=r,
        )
        self.internal = Counter(
            "kvstore_internal_requests_total",
            "Replica requests received from other nodes, by operation.",
            ["op"],
            registry=r,
        )
        self.keys = Gauge("kvstore_keys", "Live keys in this node's local store.", registry=r)
        self.peer_reachable = Gauge(
            "kvstore_peer_reachable",
            "1 if this node currently sees the peer as reachable.",
            ["peer"],
            registry=r,
        )
        self.ring_members = Gauge("kvstore_ring_members", "Members of this node's hash ring.", registry=r)
        self.build_info = Gauge(
            "kvstore_build_info",
            "Always 1: the release this node runs and the node-to-node protocol range it speaks.",
            ["version", "protocol", "min_protocol"],
            registry=r,
        )
        self.cluster_protocol = Gauge(
            "kvstore_cluster_protocol",
            "The protocol every member speaks, as this node has heard: the lowest among them "
            "(a member not heard from counts as the oldest this node talks to). An upgrade is "
            "complete when every node shows the new release's.",
            registry=r,
        )
        self.peers_incompatible = Gauge(
            "kvstore_peers_incompatible",
            "Members whose protocol this node cannot speak (too old or too new): treated as unreachable.",
            registry=r,
        )
        self.quorum_failures = Counter(
            "kvstore_quorum_failures_total",
            "Client operations refused because too few replicas answered.",
            ["op"],
            registry=r,
        )
        self.replica_write_failures = Counter(
            "kvstore_replica_write_failures_total",
            "Writes a replica could not take directly, by replica.",
            ["peer"],
            registry=r,
        )
        self.replica_read_failures = Counter(
            "kvstore_replica_read_failures_total",
            "Replica reads that failed, by replica.",
            ["peer"],
            registry=r,
        )
        self.hints_stored = Counter(
            "kvstore_hints_stored_total", "Writes held as hints for an unreachable replica.", registry=r
        )
        self.hints_delivered = Counter("kvstore_hints_delivered_total", "Hints delivered to their replica.", registry=r)
        self.hints_pending = Gauge("kvstore_hints_pending", "Hints this node holds, not yet delivered.", registry=r)
        self.hedged_reads = Counter(
            "kvstore_hedged_reads_total",
            "Replica reads sent to another replica because the first had not answered within its p95.",
            registry=r,
        )
        self.read_repairs = Counter("kvstore_read_repairs_total", "Stale replicas updated by read repair.", registry=r)
        self.read_repair_failures = Counter(
            "kvstore_read_repair_failures_total",
            "Read repairs a stale replica did not take (unreachable, or it refused); anti-entropy repairs them later.",
            registry=r,
        )
        self.ae_rounds = Counter(
            "kvstore_anti_entropy_rounds_total",
            "Anti-entropy rounds that compared this node's digests with a peer's.",
            registry=r,
        )
        self.digest_index_ready = Gauge(
            "kvstore_digest_index_ready",
            "1 once the maintained digest index is built (anti-entropy waits for it after a start), else 0.",
            registry=r,
        )
        self.ae_ranges_compared = Counter(
            "kvstore_anti_entropy_ranges_compared_total",
            "Ring arcs whose digests anti-entropy compared.",
            registry=r,
        )
        self.ae_ranges_mismatched = Counter(
            "kvstore_anti_entropy_ranges_mismatched_total",
            "Compared arcs whose digests differed.",
            registry=r,
        )
        self.ae_keys_repaired = Counter(
            "kvstore_anti_entropy_keys_repaired_total",
            "Records anti-entropy fixed, here or on a peer.",
            registry=r,
        )
        self.rebalance_keys_streamed = Counter(
            "kvstore_rebalance_keys_streamed_total",
            "Records moved by rebalancing after a membership change.",
            ["direction"],
            registry=r,
        )
        self.tls_handshakes = Counter(
            "kvstore_tls_handshakes_total",
            "TLS handshakes: side=server for connections accepted, client for connections to peers.",
            ["side"],
            registry=r,
        )
        self.tls_reloads = Counter(
            "kvstore_tls_reloads_total",
            "Changes of the TLS files: result=ok swapped the certificate in, failed kept the old one.",
            ["result"],
            registry=r,
        )
        self.auth_denied = Counter(
            "kvstore_auth_denied_total",
            "Requests refused by access control: reason=no_credentials, unknown_credentials (401) or forbidden (403).",
            ["reason"],
            registry=r,
        )
        self.auth_reloads = Counter(
            "kvstore_auth_reloads_total",
            "Changes of the --auth-file: result=ok put the new rules in force, failed kept the old ones.",
            ["result"],
            registry=r,
        )
        self.rebalance_pulled = Gauge(
            "kvstore_rebalance_pulled_records",
            "Records received by the last (or current) sync of newly replicated arcs.",
            registry=r,
        )
        self.rebalance_needed = Gauge(
            "kvstore_rebalance_needed_records",
            "Records this node holds in the arcs its last sync gained (pulled / needed is 1 when each moved once).",
            registry=r,
        )
        self.rebalance_surplus = Gauge(
            "kvstore_rebalance_surplus_records",
            "Records held in arcs this node does not replicate, not yet handed off and dropped.",
            registry=r,
        )
        self.syncing_ranges = Gauge(
            "kvstore_syncing_ranges", "Arcs this node is still pulling after a membership change.", registry=r
        )
        self.peers_reachable = Gauge(
            "kvstore_peers_reachable", "Other members this node currently sees as reachable.", registry=r
        )
        self.peer_outstanding = Gauge(
            "kvstore_peer_outstanding_requests",
            "Requests in flight to each peer (read load balancing).",
            ["peer"],
            registry=r,
        )
        self.peer_latency = Gauge(
            "kvstore_peer_latency_seconds",
            "Moving average of each peer's response time.",
            ["peer"],
            registry=r,
        )
        self.write_restamps = Counter(
            "kvstore_write_restamps_total",
            "Writes re-stamped and sent again because a replica kept a newer version (a clock behind the cluster's).",
            registry=r,
        )
        self.clock_offset = Gauge(
            "kvstore_clock_offset_seconds",
            "Each peer's wall clock minus this node's, as last measured by a probe.",
            ["peer"],
            registry=r,
        )
        self.membership_errors = Counter(
            "kvstore_membership_source_errors_total",
            "Failures reading or watching the membership source (the last known ring stays in use).",
            registry=r,
        )
        self.membership_staleness = Gauge(
            "kvstore_membership_staleness_seconds",
            "Seconds since the membership source last confirmed the ring.",
            registry=r,
        )
        self.storage_used = Gauge(
            "kvstore_storage_used_bytes",
            "Bytes the local store uses (LMDB: its file's high-water mark; RocksDB: its files; 0 in memory).",
            registry=r,
        )
        self.storage_limit = Gauge(
            "kvstore_storage_limit_bytes",
            "Bytes the local store may use before writes are refused with 507: the smaller of --map-size "
            "and what the volume has room for (RocksDB: the volume alone; 0: no limit, in memory).",
            registry=r,
        )
        self.ranges_below_quorum = Gauge(
            "kvstore_ranges_below_quorum",
            "Ring arcs with fewer than a quorum of their replicas reachable from this node (writes to them fail).",
            registry=r,
        )
        self.syncs = SyncCollector()
        r.register(self.syncs)
        # Every child whose label values are known up front exists from the start, at 0: a rate or an
        # alert over it then reads "none yet", not "no data" (Prometheus' advice on initialising metrics).
        for op in ("read", "write"):
            self.quorum_failures.labels(op)
        for direction in REBALANCE_DIRECTIONS:
            self.rebalance_keys_streamed.labels(direction)
        self.internal_reads = self.internal.labels("read")  # bound once: the replica routes' hot path
        self.internal_writes = self.internal.labels("write")
        self._observers = {op: self.duration.labels(op) for op in OPS}
        self._counters: dict[tuple[str, int], Callable[[], None]] = {}
        self._forwards: dict[tuple[str, str], Callable[[], None]] = {}

    def track_rebalance(
        self, *, pulled: Callable[[], float], needed: Callable[[], float], surplus: Callable[[], float]
    ) -> None:
        self.rebalance_pulled.set_function(pulled)
        self.rebalance_needed.set_function(needed)
        self.rebalance_surplus.set_function(surplus)

    def track_keys(self, count: Callable[[], int]) -> None:
        self.keys.set_function(count)

    def track_storage(self, *, used: Callable[[], float], limit: Callable[[], float]) -> None:
        """Storage gauges read when scraped: a full volume shows without a write."""
        self.storage_used.set_function(used)
        self.storage_limit.set_function(limit)

    def track_syncs(self, *, store: str, policy: str, stats: Callable[[], SyncStats | None]) -> None:
        """A store's fsync counters (store: data or hints), read when scraped."""
        self.syncs.track(store=store, policy=policy, stats=stats)

    def count_tls_handshake(self, side: str) -> None:
        self.tls_handshakes.labels(side).inc()

    def count_tls_reload(self, ok: bool) -> None:
        self.tls_reloads.labels("ok" if ok else "failed").inc()

    def count_auth_denied(self, reason: str) -> None:
        self.auth_denied.labels(reason).inc()

    def count_auth_reload(self, ok: bool) -> None:
        self.auth_reloads.labels("ok" if ok else "failed").inc()

    def observe(self, op: str, status: int, seconds: float) -> None:
        """Record one client request (the hot path: two dict lookups, two increments)."""
        inc = self._counters.get((op, status))
        if inc is None:
            inc = self._counters[(op, status)] = self.requests.labels(op, str(status)).inc
        inc()
        observer = self._observers.get(op)
        if observer is not None:
            observer.observe(seconds)

    def count_forwarded(self, peer: str, op: str) -> None:
        """One request sent to a peer on a client's behalf (the hot path:
        labels() takes a lock and a lookup, so each child is bound once)."""
        inc = self._forwards.get((peer, op))
        if inc is None:
            inc = self._forwards[(peer, op)] = self.forwarded.labels(peer, op).inc
        inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
