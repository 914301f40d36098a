"""The console's data, under /console/ (the page itself is static, under
/ui: routes_ui): the overview the page polls (verdict, member rows, arcs
at risk, rebalancing and anti-entropy), the ring's owners for its picture,
and one key's copy on each of its replicas. FastAPI routes, off the data
path; thin: app.cluster.overview gathers and judges, these shape JSON.

Any authenticated user may read the overview (like /ring, which it is
made of: this node's, and each peer's fetched with the caller's own
Authorization header); a key's copies need read access to that key.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.access import Permission
from app.clock import wall_ms
from app.cluster import overview
from app.cluster.coordinator import required_acks
from app.cluster.node import Node
from app.web.access import require_key
from app.web.keys import key_from_query, parse_query
from app.web.routes_ops import ring_view
from app.web.slot import node_of

router = APIRouter(prefix="/console", tags=["console"])

POLL_INTERVAL_MS = 2000  # how often the page asks again: live enough, and one request per open page per 2 s


def _json(body: object) -> Response:
    return Response(orjson.dumps(body), media_type="application/json", headers={"cache-control": "no-store"})


@router.get("/overview", summary="The console's first screen: verdict and reasons, members, arcs at risk, repair")
async def console_overview(request: Request) -> Response:
    node = node_of(request)
    # The peers first: one that gives no answer is marked down, and this node's own view then says so.
    views = await overview.peer_views(node, authorization=request.headers.get("authorization"))
    mine = ring_view(node)
    answers: dict[str, dict[str, Any]] = {node.config.node_id: mine}
    answers.update((node_id, view) for node_id, view in views.items() if isinstance(view, dict))
    return _json(_overview(node, mine, views, answers))


def _overview(
    node: Node,
    mine: dict[str, Any],
    views: dict[str, dict[str, object] | str],
    answers: dict[str, dict[str, Any]],
) -> dict[str, object]:
    me = node.config.node_id
    topology = node.topology.current
    n = min(node.config.replication_factor, len(topology.ring))
    up = {member for member in topology.peers if member == me or node.health.is_up(member)}
    arcs = overview.arc_health(topology.ring, n=n, up=up)
    rows = []
    facts = []
    for member in mine["members"]:
        node_id = member["node_id"]
        own = answers.get(node_id)
        member_facts = overview.facts_of(
            node_id,
            up=node_id in up,
            why_down=member["last_error"],
            own_view=own,
            others=answers,
            incompatible=member.get("incompatible") or None,
        )
        facts.append(member_facts)
        rows.append(_row(member, own, views.get(node_id), answers, member_facts))
    verdict, reasons = overview.verdict(members=facts, arcs=arcs, n=n, observer=me)
    return {
        "node_id": me,
        "wall_ms": mine["local"]["wall_ms"],
        "poll_ms": POLL_INTERVAL_MS,
        "verdict": verdict,
        "reasons": reasons,
        "epoch": topology.epoch,
        "replication_factor": n,
        "quorum": required_acks("quorum", n) if n else 0,
        "ring": {
            "fingerprint": topology.ring.fingerprint,
            "members": list(topology.ring.members),
            "arcs": arcs.total,
            "below_n": arcs.below_n,
            "below_quorum": arcs.below_quorum,
            "below_n_share": arcs.below_n_share,
            "below_quorum_share": arcs.below_quorum_share,
            "runs": arcs.runs,
        },
        "members": rows,
    }


def _row(
    member: dict[str, Any],
    own: dict[str, Any] | None,
    fetch: dict[str, object] | str | None,
    answers: dict[str, dict[str, Any]],
    facts: overview.MemberFacts,
) -> dict[str, object]:
    """One member row: this node's view of it, its own word (None where a 0.1.0 /ring has no `local`)."""
    node_id = member["node_id"]
    local: dict[str, Any] = (own or {}).get("local") or {}
    seen_by: dict[str, str | None] = {}
    for observer, ring in sorted(answers.items()):
        if observer == node_id:
            continue
        entry = next((m for m in ring.get("members") or [] if m.get("node_id") == node_id), None)
        seen_by[observer] = None if entry is None else ("up" if entry.get("reachable") else "down")
    return {
        "node_id": node_id,
        "url": member["url"],
        "self": member["self"],
        "state": "up" if facts.up else "down",
        "since_s": member["since_s"],
        "last_error": member["last_error"],
        "seen_by": seen_by,
        "answer_error": fetch if isinstance(fetch, str) else None,
        # The release as this node last heard it (0.2's /ring), else as the member says itself.
        "version": member.get("version") or (own or {}).get("version"),
        "incompatible": member.get("incompatible") or None,  # why it cannot join this ring's protocol, if so
        "ready": facts.ready,
        "not_ready_reason": facts.not_ready_reason,
        "clock_offset_ms": member["clock_offset_ms"],
        "latency_ms": member["latency_ms"],
        "share": member["share"],
        "replica_share": member["replica_share"],
        "live_keys": local.get("live_keys"),
        "storage_used_bytes": local.get("storage_used_bytes"),
        "storage_limit_bytes": local.get("storage_limit_bytes"),
        "hints_pending": local.get("hints_pending"),
        "syncing": (own or {}).get("syncing"),
        "rebalance": local.get("rebalance"),
        "anti_entropy": local.get("anti_entropy"),
        "wall_ms": local.get("wall_ms"),
    }


@router.get("/ring", summary="The ring's owners as runs of the circle, for the console's picture")
async def console_ring(request: Request) -> Response:
    ring = node_of(request).topology.current.ring
    return _json({"fingerprint": ring.fingerprint, "members": list(ring.members), "runs": overview.owner_runs(ring)})


@router.get(
    "/key",
    summary="Each replica's copy of one key (version, expiry), in preference order; read-only, no read repair",
)
async def console_key(request: Request) -> Response:
    node = node_of(request)
    key = key_from_query(parse_query(request.scope["query_string"]))
    require_key(request.scope, Permission.READ, key)  # the access rule of a read of this key
    copies = await overview.replica_copies(node, key)
    now = wall_ms()
    return _json({"key": key.decode(), **overview.agreement(copies), "copies": [copy.as_json(now) for copy in copies]})
