"""Every Prometheus metric kvstore exports, declared once, in a registry per node
(so several nodes can live in one test process). The only module importing
prometheus_client. Labels are bounded: op, status, peer; never the key.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# *_created series double every counter's output and no dashboard of ours reads them.
disable_created_metrics()

# Data-path latencies sit between ~100 us (local hit) and the peer timeout.
LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
OPS = ("get", "put", "delete")

__all__ = ["CONTENT_TYPE_LATEST", "NodeMetrics"]


class NodeMetrics:
    """The metrics of one node. Hot-path children are bound once, up front."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "kvstore_requests_total", "Client requests served, by operation and HTTP status.",
            ["op", "status"], registry=r,
        )
        self.duration = Histogram(
            "kvstore_request_duration_seconds", "Client request latency, by operation.",
            ["op"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.forwarded = Counter(
            "kvstore_forwarded_requests_total",
            "Requests this node sent to another node on a client's behalf, by peer and operation.",
            ["peer", "op"], registry=r,
        )
        self.internal = Counter(
            "kvstore_internal_requests_total",
            "Replica requests received from other nodes, by operation.",
            ["op"], registry=r,
        )
        self.keys = Gauge("kvstore_keys", "Live keys in this node's local store.", registry=r)
        self.peer_up = Gauge(
            "kvstore_peer_reachable", "1 if this node currently sees the peer as reachable.",
            ["peer"], registry=r,
        )
        self.ring_members = Gauge("kvstore_ring_members", "Members of this node's hash ring.", registry=r)
        self._observers = {op: self.duration.labels(op) for op in OPS}
        self._counters: dict[tuple[str, int], Callable[[], None]] = {}

    def track_keys(self, count: Callable[[], int]) -> None:
        self.keys.set_function(count)

    def observe(self, op: str, status: int, seconds: float) -> None:
        """Record one client request (the hot path: two dict lookups, two increments)."""
        inc = self._counters.get((op, status))
        if inc is None:
            inc = self._counters[(op, status)] = self.requests.labels(op, str(status)).inc
        inc()
        observer = self._observers.get(op)
        if observer is not None:
            observer.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
