"""What the cluster layer's workers share: this node's id, its replica side,
the peer client, peer health, the current topology, the metrics and the
replication factor. Built once by app.cluster.node and handed to the
coordinator, anti-entropy and hand-off, instead of seven arguments each.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.cluster.health import PeerHealth
from app.cluster.replica import Replica
from app.cluster.topology import CurrentTopology
from app.metrics import NodeMetrics
from app.transport.base import PeerClient


@dataclass(frozen=True, slots=True)
class ClusterContext:
    node_id: str
    replica: Replica
    peer_client: PeerClient
    health: PeerHealth
    topology: CurrentTopology
    metrics: NodeMetrics
    replication_factor: int


class ClusterWorker:
    """Base of the coordinator, anti-entropy and hand-off: the context's parts
    as attributes of their own (the coordinator reads them per request, and a
    plain attribute is one lookup, not two)."""

    def __init__(self, context: ClusterContext) -> None:
        self.node_id = context.node_id
        self.replica = context.replica
        self.peer_client = context.peer_client
        self.health = context.health
        self.topology = context.topology
        self.metrics = context.metrics
        self.replication_factor = context.replication_factor
