"""The routes an operator uses to change the cluster, under /admin/: a new
member list (applied here and told to every old and new member), and
rebalancing progress. FastAPI routes behind the cluster token; thin: they
validate, call the node, shape JSON."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from app.web.asgi import check_token
from app.web.members import requested_members
from app.web.slot import node_of


async def require_token(request: Request) -> None:
    token = node_of(request).config.cluster_token
    check_token(request.scope, token.encode() if token else None)


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_token)])


class MembershipChange(BaseModel):
    peers: dict[str, str] = Field(description="the complete new member list: node id -> base URL")


@router.post("/membership", summary="Change the ring's members; applied here and sent to every old and new member")
async def change_membership(change: MembershipChange, request: Request) -> dict[str, object]:
    node = node_of(request)
    view, failed = await node.apply_membership(requested_members(change.peers), propagate=True)
    return {"epoch": view.epoch, "members": sorted(view.peers), "not_told": sorted(failed)}


@router.get(
    "/rebalance",
    summary="Rebalancing progress: arcs still syncing, records pulled and needed by the last sync, surplus still held",
)
async def rebalance(request: Request) -> dict[str, object]:
    node = node_of(request)
    status = node.handoff.status
    return {
        "syncing": status.syncing,
        "pending_ranges": status.pending_ranges,
        "keys_streamed": status.keys_streamed,
        "records_pulled": status.records_pulled,
        "records_needed": status.records_needed,
        "surplus_keys": status.surplus_keys,
        "surplus_ranges": status.surplus_ranges,
        "foreign_keys": status.foreign_keys,
        "hints_pending": node.replica.hints.pending(),
        "anti_entropy_rounds": node.anti_entropy.rounds,
    }
