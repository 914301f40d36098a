"""Operations routes served by FastAPI: readiness, the ring view (for people,
/ring; for ring-aware clients, /ring/tokens), metrics. Thin: they read the
node from the slot and shape JSON. (/health is the data plane's: probes hit
it often.)"""

from __future__ import annotations

import time

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.clock import wall_ms
from app.cluster.node import Node
from app.config import MAX_BATCH_BODY_BYTES, MAX_BATCH_KEYS
from app.errors import NodeStartingError
from app.metrics import CONTENT_TYPE_LATEST, NodeMetrics
from app.ring import HASH_NAME
from app.web.slot import NodeSlot, node_of

router = APIRouter(tags=["operations"])


@router.get("/ready", summary="Readiness: 200 when the ring is known and the store is open, else 503")
async def ready(request: Request) -> JSONResponse:
    status, body = readiness(request.app.state.slot)
    return JSONResponse(body, status_code=status)


def readiness(slot: NodeSlot) -> tuple[int, dict[str, str]]:
    """/ready's status and body, here and on the ops listener (app.web.ops)."""
    try:
        reason = slot.require().not_ready_reason()
    except NodeStartingError as exc:
        reason = str(exc)
    if reason is not None:
        return 503, {"error": f"not ready: {reason}"}
    return 200, {"status": "ready"}


@router.get("/ring", summary="This node's view of the ring: members, reachability, key-space shares")
async def ring(request: Request) -> dict[str, object]:
    return ring_view(node_of(request))


def ring_view(node: Node) -> dict[str, object]:
    """/ring's answer; the console (routes_console) reads every node's."""
    source = node.membership_source
    view = node.topology.current
    shares = view.ring.shares()
    replica_shares = view.ring.shares(node.config.replication_factor)
    now = time.monotonic()
    members = []
    capabilities = node.capabilities
    for node_id, peer in sorted(view.peers.items()):
        state = node.health.state(node_id)
        protocol = capabilities.peer(node_id)
        is_self = node_id == node.config.node_id
        members.append(
            {
                "node_id": node_id,
                "url": peer.url,
                "self": is_self,
                "reachable": True if is_self else node.health.is_up(node_id),
                "since_s": None if is_self else round(max(0.0, now - state.since), 3),
                "last_error": None if is_self or node.health.is_up(node_id) else state.last_error,
                "outstanding_requests": None if is_self else state.outstanding,
                "latency_ms": None if is_self else round(state.latency_s * 1000, 3),
                "clock_offset_ms": None if is_self else _rounded(node.offsets.offset_ms(node_id)),
                # What it runs and speaks, as last heard (None: not heard from since it was last away).
                "version": None if protocol is None else protocol.release,
                "protocol": None if protocol is None else protocol.protocol,
                "capabilities": None if protocol is None else sorted(protocol.capabilities),
                "incompatible": capabilities.incompatibility(node_id),
                "share": round(shares[node_id], 6),
                "replica_share": round(replica_shares[node_id], 6),
            }
        )
    own = capabilities.own
    return {
        "node_id": node.config.node_id,
        "version": own.release,
        "protocol": {"version": own.protocol, "min": own.min_protocol, "capabilities": sorted(own.capabilities)},
        # What the whole ring may use: the oldest protocol among the members and the
        # capabilities every one supports; `waiting_for` names members not heard from yet.
        "cluster": {
            "protocol": capabilities.cluster_protocol(),
            "capabilities": sorted(capabilities.cluster_capabilities()),
            "waiting_for": capabilities.unknown_members(),
        },
        "syncing": node.handoff.status.syncing,
        "epoch": view.epoch,
        "vnodes": view.ring.vnodes,
        "replication_factor": min(node.config.replication_factor, len(view.ring)),
        "clock": {"max_offset_ms": node.offsets.max_offset_ms, "refusal": node.offsets.refusal()},
        "membership_source": source.status() | {"staleness_s": round(source.staleness_s(), 3)},
        "members": members,
        "local": local_view(node),
    }


def local_view(node: Node) -> dict[str, object]:
    """What this node says of itself (added in 0.2 for the console's member
    rows; readers of 0.1.0's /ring find it absent): readiness, keys,
    storage, hints, rebalancing and anti-entropy. (Its release is /ring's
    top-level `version`.)"""
    usage = node.store.usage()
    status = node.handoff.status
    last = node.anti_entropy.last_round
    reason = node.not_ready_reason()
    return {
        "wall_ms": wall_ms(),
        "ready": reason is None,
        "not_ready_reason": reason,
        "live_keys": node.store.live_count(),
        "storage_used_bytes": None if usage is None else usage.used_bytes,
        "storage_limit_bytes": None if usage is None else usage.limit_bytes,
        "hints_pending": node.replica.hints.pending(),
        "rebalance": {
            "syncing": status.syncing,
            "pending_ranges": status.pending_ranges,
            "records_pulled": status.records_pulled,
            "records_needed": status.records_needed,
            "surplus_keys": status.surplus_keys,
            "surplus_ranges": status.surplus_ranges,
        },
        "anti_entropy": {
            "interval_s": node.config.anti_entropy_interval,
            "rounds": node.anti_entropy.rounds,
            "repaired_total": node.anti_entropy.repaired_total,
            "last_round": None
            if last is None
            else {
                "finished_ms": last.finished_ms,
                "peer": last.peer,
                "repaired": last.repaired,
                "reached": last.reached,
            },
        },
    }


# The layout of GET /ring/tokens; bumped on any change a client must know about
# (kvstore_client checks it and falls back to routing through any node if it is newer).
RING_TOKENS_FORMAT = 1


@router.get(
    "/ring/tokens",
    summary="The ring for ring-aware clients: members, tokens with owners, replication factor, epoch, hash",
)
async def ring_tokens(request: Request) -> Response:
    """Everything a client needs to send a key straight to its replicas.
    `tokens[i]` is owned by `members[owners[i]]`; a key hashed with `hash`
    belongs to the first token >= its hash (wrapping), and its replicas are
    the first `replication_factor` distinct owners walking on from there.
    `epoch` changes with the membership; every answer carries it in the
    x-kvstore-epoch header, so a client knows when to fetch this again."""
    node = node_of(request)
    view = node.topology.current
    ids = sorted(view.peers)
    index = {node_id: i for i, node_id in enumerate(ids)}
    points = view.ring.points()
    body = {
        "format": RING_TOKENS_FORMAT,
        "epoch": view.client_epoch,
        "hash": HASH_NAME,
        "replication_factor": min(node.config.replication_factor, len(view.ring)),
        "vnodes": view.ring.vnodes,
        "members": [
            {
                "node_id": node_id,
                "url": view.peers[node_id].url,
                "reachable": node_id == node.config.node_id or node.health.is_up(node_id),
            }
            for node_id in ids
        ],
        "batch": {"max_keys": MAX_BATCH_KEYS, "max_body_bytes": MAX_BATCH_BODY_BYTES},
        "tokens": [token for token, _ in points],
        "owners": [index[owner] for _, owner in points],
    }
    # orjson: 5,000 64-bit tokens are ~100 kB; the stdlib encoder FastAPI uses takes ~10x longer.
    return Response(orjson.dumps(body), media_type="application/json")


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    metrics: NodeMetrics = request.app.state.metrics  # served before the node is open too
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
