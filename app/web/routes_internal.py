"""Node-to-node bulk routes under /internal/v1 (anti-entropy, rebalancing,
hint delivery, membership propagation), and the admin routes an operator
uses to change membership. All require the cluster token when one is set.
Thin: decode, call the replica or node, encode."""

from __future__ import annotations

import asyncio

import orjson
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from app.cluster.node import Node
from app.config import parse_peers
from app.errors import ConfigError
from app.transport import codec
from app.transport.base import BATCH_PATH, DIGESTS_PATH, MEMBERSHIP_PATH, RANGE_PATH
from app.web.dataplane import check_token

OCTETS = "application/octet-stream"


def _node(request: Request) -> Node:
    node: Node = request.app.state.node
    if node.replica is None:
        raise HTTPException(503, "node is starting: store not open yet")
    return node


async def require_token(request: Request) -> None:
    node: Node = request.app.state.node
    token = node.config.cluster_token
    refusal = check_token(request.scope, token.encode() if token else None)
    if refusal is not None:
        raise HTTPException(refusal.status, orjson.loads(refusal.body)["error"])


internal = APIRouter(tags=["internal"], dependencies=[Depends(require_token)])
admin = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_token)])


async def _arcs(request: Request) -> list[tuple[int, int]]:
    try:
        return codec.decode_arcs(await request.body())
    except ValueError as exc:
        raise HTTPException(400, f"bad arc list: {exc}") from None


@internal.post(BATCH_PATH, summary="Apply many replica records (last writer wins)")
async def batch(request: Request) -> dict[str, int]:
    node = _node(request)
    try:
        records = codec.decode_records(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPException(400, f"bad record batch: {exc}") from None
    return {"applied": await node.replica.write_batch(records)}  # type: ignore[union-attr]


@internal.post(DIGESTS_PATH, summary="Digest of this node's records in each arc", response_class=Response)
async def digests(request: Request) -> Response:
    node = _node(request)
    arcs = await _arcs(request)
    found = await asyncio.to_thread(node.replica.digests, arcs)  # type: ignore[union-attr]
    return Response(codec.encode_digests(found), media_type=OCTETS)


@internal.post(RANGE_PATH, summary="Every record this node holds in the arcs", response_class=Response)
async def fetch_range(request: Request) -> Response:
    node = _node(request)
    arcs = await _arcs(request)
    records = await asyncio.to_thread(node.replica.range, arcs)  # type: ignore[union-attr]
    return Response(codec.encode_records(records), media_type=OCTETS)


class MembershipChange(BaseModel):
    peers: dict[str, str] = Field(description="the complete new member list: node id -> base URL")


def _validated(change: MembershipChange) -> dict[str, str]:
    try:
        members = parse_peers(",".join(f"{node_id}={url}" for node_id, url in change.peers.items()))
    except ConfigError as exc:
        raise HTTPException(400, str(exc).removeprefix("config: ")) from None
    if not members:
        raise HTTPException(400, "peers must name at least one member")
    return members


@internal.post(MEMBERSHIP_PATH, summary="Take a new member list from another node (no propagation)")
async def take_membership(change: MembershipChange, request: Request) -> dict[str, object]:
    node = _node(request)
    view, _ = await node.apply_membership(_validated(change), propagate=False)
    return {"epoch": view.epoch, "members": sorted(view.peers)}


@admin.post("/membership", summary="Change the ring's members; applied here and sent to every old and new member")
async def change_membership(change: MembershipChange, request: Request) -> dict[str, object]:
    node = _node(request)
    view, failed = await node.apply_membership(_validated(change), propagate=True)
    return {"epoch": view.epoch, "members": sorted(view.peers), "not_told": sorted(failed)}


@admin.get("/rebalance", summary="Rebalancing progress after a membership change")
async def rebalance(request: Request) -> dict[str, object]:
    node = _node(request)
    status = node.handoff.status  # type: ignore[union-attr]
    return {
        "syncing": status.syncing,
        "pending_ranges": status.pending_ranges,
        "keys_streamed": status.keys_streamed,
        "foreign_keys": status.foreign_keys,
        "hints_pending": node.replica.hints.pending(),  # type: ignore[union-attr]
        "anti_entropy_rounds": node.anti_entropy.rounds,  # type: ignore[union-attr]
    }
