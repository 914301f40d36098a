"""The routes an operator uses to change the cluster, under /admin/: a new
member list (applied here and told to every old and new member), and
rebalancing progress. FastAPI routes behind `require_admin` (a user with
admin under --auth-file, else the cluster token); thin: they validate, call
the node, shape JSON."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from app.access import EVERYONE, User
from app.transport.base import TOKEN_HEADER
from app.web.access import USER
from app.web.asgi import header, verify_cluster_token
from app.web.members import requested_members
from app.web.slot import node_of

BEARER_PREFIX = b"Bearer "


async def require_admin(request: Request) -> None:
    """Under --auth-file the data plane has already checked the user for
    admin (app.web.access); without it, admin routes need the cluster token,
    in x-kvstore-token or as `Authorization: Bearer TOKEN`, so one `--token`
    in the CLI and the chart's jobs works with access control on or off."""
    user = request.scope.get(USER)
    if isinstance(user, User) and user is not EVERYONE:
        return
    token = node_of(request).config.cluster_token
    sent = header(request.scope, TOKEN_HEADER.encode())
    bearer = header(request.scope, b"authorization")
    if sent is None and bearer is not None and bearer.startswith(BEARER_PREFIX):
        sent = bearer[len(BEARER_PREFIX) :].strip()
    verify_cluster_token(sent, token.encode() if token else None)


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


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
