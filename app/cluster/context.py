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
