"""The cluster at a glance, for the console (app.web.routes_console): which
arcs of the ring have fewer than N or fewer than a quorum of replicas
reachable, the verdict that follows (healthy, degraded, unavailable) with
its reasons in words, the ring cut into runs of one owner for the picture,
each peer's own /ring fetched through the peer client, and every replica's
copy of one key, read without repairing anything.

Reads the node's parts; changes nothing. Imports no web or network library.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from app.clock import wall_ms
from app.cluster.coordinator import required_acks
from app.cluster.node import Node
from app.errors import PeerError
from app.ring import HASH_SPACE, HashRing
from app.storage.base import Record

HEALTHY, DEGRADED, UNAVAILABLE = "healthy", "degraded", "unavailable"
BELOW_N, BELOW_QUORUM = "below_n", "below_quorum"
# How long the key lookup waits for a replica's copy: the page polls every
# 2 s, and a stalled replica must not hold a poll longer than half of that.
# (A peer's /ring is waited on for --peer-timeout: no answer marks it down.)
PEER_WAIT_S = 1.0
FRACTION_DIGITS = 6  # arc ends as fractions of the circle: a millionth is far below a pixel


@dataclass(frozen=True, slots=True)
class ArcHealth:
    """Arcs (as this node sees its peers) by how many replicas are reachable."""

    total: int
    below_n: int  # fewer than N reachable, a quorum still: writes and reads work, redundancy is reduced
    below_quorum: int  # fewer than a quorum: quorum reads and writes of these keys fail
    below_n_share: float  # fraction of the key space in those arcs
    below_quorum_share: float
    runs: list[tuple[float, float, str]] = field(default_factory=list)  # (start, end, BELOW_*) merged, in order


def _fraction(token: int) -> float:
    return round(token / HASH_SPACE, FRACTION_DIGITS)


def _pieces(start: int, end: int) -> list[tuple[float, float]]:
    """The arc (start, end] as fractions of the circle; the arc that wraps past zero in two."""
    if start < end:
        return [(_fraction(start), _fraction(end))]
    return [(_fraction(start), 1.0), (0.0, _fraction(end))]


def _merged(labelled: Iterable[tuple[int, int, object]]) -> list[tuple[float, float, object]]:
    """Adjacent pieces with the same label as one run, sorted by start."""
    pieces = sorted((a, b, label) for start, end, label in labelled for a, b in _pieces(start, end))
    runs: list[tuple[float, float, object]] = []
    for a, b, label in pieces:
        if runs and runs[-1][2] == label and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], b, label)
        else:
            runs.append((a, b, label))
    return runs


def arc_health(ring: HashRing, *, n: int, up: set[str]) -> ArcHealth:
    """Each arc's reachable replicas against N and a quorum of N. One walk
    of the ring's precomputed replica sets (4-18 ms for 3,072 arcs, the
    more arcs at risk the more), kept for the last few rings and up-sets:
    every console poll asks, and they rarely change between two."""
    return _arc_health(ring, n, frozenset(up))


@functools.lru_cache(maxsize=8)
def _arc_health(ring: HashRing, n: int, up: frozenset[str]) -> ArcHealth:
    if len(ring) == 0:
        return ArcHealth(0, 0, 0, 0.0, 0.0)
    n = min(n, len(ring))
    quorum = required_acks("quorum", n)
    sets = ring.replica_sets(n)
    short: list[tuple[int, int, object]] = []
    widths = {BELOW_N: 0, BELOW_QUORUM: 0}
    counts = {BELOW_N: 0, BELOW_QUORUM: 0}
    for (start, end), owners in sets:
        reachable = sum(1 for owner in owners if owner in up)
        if reachable >= n:
            continue
        label = BELOW_QUORUM if reachable < quorum else BELOW_N
        counts[label] += 1
        widths[label] += (end - start) % HASH_SPACE or HASH_SPACE
        short.append((start, end, label))
    return ArcHealth(
        total=len(sets),
        below_n=counts[BELOW_N],
        below_quorum=counts[BELOW_QUORUM],
        below_n_share=round(widths[BELOW_N] / HASH_SPACE, FRACTION_DIGITS),
        below_quorum_share=round(widths[BELOW_QUORUM] / HASH_SPACE, FRACTION_DIGITS),
        runs=[(a, b, str(label)) for a, b, label in _merged(short)],
    )


@functools.lru_cache(maxsize=2)
def owner_runs(ring: HashRing) -> list[tuple[float, float, int]]:
    """The circle cut into runs of one owner (index into ring.members), for
    the ring picture; kept for the current ring (the list is shared: callers
    must not change it)."""
    index = {member: i for i, member in enumerate(ring.members)}
    if len(ring) == 0:
        return []
    return [
        (a, b, int(str(label)))
        for a, b, label in _merged((start, end, index[ring.owners_of_token(end, 1)[0]]) for start, end in ring.ranges())
    ]


@dataclass(frozen=True, slots=True)
class MemberFacts:
    """What the verdict needs to know of one member."""

    node_id: str
    up: bool  # as the judging node sees it
    why_down: str | None = None
    ready: bool | None = None  # None: unknown (no answer from it)
    not_ready_reason: str | None = None
    seen_down_by: tuple[str, ...] = ()  # other members that see it down
    incompatible: str | None = None  # why its protocol cannot work with this node's (from /ring), if so


def verdict(*, members: list[MemberFacts], arcs: ArcHealth, n: int, observer: str) -> tuple[str, list[str]]:
    """healthy, degraded (a member down, unready or incompatible, or an arc below N while
    every arc keeps a quorum) or unavailable (an arc below quorum); and why, in words."""
    reasons: list[str] = []
    n = max(1, n)
    quorum = required_acks("quorum", n)
    if arcs.below_quorum:
        reasons.append(
            f"{arcs.below_quorum:,} of {arcs.total:,} arcs ({arcs.below_quorum_share:.1%} of the key space) have "
            f"fewer than a quorum ({quorum}) of their {n} replicas reachable: quorum reads and writes of their "
            "keys fail"
        )
    for member in members:
        if not member.up:
            observers = [observer, *(o for o in member.seen_down_by if o != observer)]
            why = f": {member.why_down}" if member.why_down else ""
            reasons.append(f"{member.node_id} is down as {_listed(observers)} {_sees(observers)} it{why}")
            continue
        if member.seen_down_by:
            others = list(member.seen_down_by)
            reasons.append(
                f"{member.node_id} is down as {_listed(others)} {_sees(others)} it (up as {observer} sees it)"
            )
        if member.ready is False:
            reasons.append(f"{member.node_id} is not ready: {member.not_ready_reason or 'no reason given'}")
        if member.incompatible:
            reasons.append(f"{member.node_id} is incompatible: {member.incompatible}")
    if arcs.below_n:
        reasons.append(
            f"{arcs.below_n:,} of {arcs.total:,} arcs ({arcs.below_n_share:.1%} of the key space) have fewer than "
            f"{n} replicas reachable (a quorum still)"
        )
    if arcs.below_quorum:
        return UNAVAILABLE, reasons
    return (DEGRADED if reasons else HEALTHY), reasons


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _sees(names: list[str]) -> str:
    return "sees" if len(names) == 1 else "see"


async def peer_views(node: Node, *, authorization: str | None) -> dict[str, dict[str, object] | str]:
    """Each other member's own /ring (or why there is none): peers this node
    sees down are not asked (their answer cannot come back here either).
    A peer that gives no answer is marked down, as after any call that gets
    none: with no client traffic a crashed peer would otherwise look up here
    until the next anti-entropy round asks it something (30 s by default)."""
    view = node.topology.current
    asked = [
        peer
        for node_id, peer in sorted(view.peers.items())
        if node_id != node.config.node_id and node.health.is_up(node_id)
    ]

    async def ask(peer_id: str) -> dict[str, object] | str:
        try:
            return await node.peer_client.ring_view(view.peers[peer_id], authorization=authorization)
        except PeerError as exc:
            node.health.call_failed(peer_id, exc)
            return str(exc)

    answers = await asyncio.gather(*(ask(peer.node_id) for peer in asked))
    found: dict[str, dict[str, object] | str] = {
        node_id: f"{node_id} is down as {node.config.node_id} sees it; not asked"
        for node_id in view.peers
        if node_id != node.config.node_id
    }
    found.update(zip((peer.node_id for peer in asked), answers, strict=True))
    return found


@dataclass(frozen=True, slots=True)
class ReplicaCopy:
    """One replica's copy of a key, as it answered (nothing is repaired)."""

    node_id: str
    record: Record | None = None
    answered: bool = True
    syncing: bool = False  # the replica is still pulling this key's arc: its copy may be stale
    error: str | None = None

    def as_json(self, now_ms: int) -> dict[str, object]:
        record = self.record
        if not self.answered:
            state = "unreachable"
        elif record is None:
            state = "absent"
        elif record.is_tombstone:
            state = "deleted"
        elif record.expired(now_ms):
            state = "expired"
        else:
            state = "live"
        return {
            "node_id": self.node_id,
            "state": state,
            "version": None if record is None else record.version.encode(),
            "version_wall_ms": None if record is None else record.version.physical_ms,
            "expires_at_ms": None if record is None or not record.expires_at_ms else record.expires_at_ms,
            "value_bytes": None if record is None or record.value is None else len(record.value),
            "syncing": self.syncing,
            "error": self.error,
        }


async def replica_copies(node: Node, key: bytes) -> list[ReplicaCopy]:
    """Every replica's copy of key, in preference order: this node's from its
    store, the others' through the replica read route, at most PEER_WAIT_S
    each. Read repair is not triggered (the coordinator alone does that)."""
    view = node.topology.current
    n = min(node.config.replication_factor, len(view.ring))
    owners = view.ring.owners(key, n) if n else ()

    async def copy_of(owner: str) -> ReplicaCopy:
        if owner == node.config.node_id:
            answer = node.replica.read(key)
        else:
            try:
                answer = await asyncio.wait_for(node.peer_client.read(view.peers[owner], key), PEER_WAIT_S)
            except (PeerError, TimeoutError) as exc:
                return ReplicaCopy(owner, answered=False, error=str(exc) or "no answer in time")
        return ReplicaCopy(owner, record=answer.record, syncing=not answer.authoritative)

    return list(await asyncio.gather(*(copy_of(owner) for owner in owners)))


def agreement(copies: list[ReplicaCopy]) -> dict[str, object]:
    """Whether the replicas that answered hold the same version, and whether all did."""
    answered = [copy for copy in copies if copy.answered]
    versions = {None if copy.record is None else copy.record.version for copy in answered}
    return {
        "agree": len(versions) <= 1,
        "answered": len(answered),
        "replicas": len(copies),
        "now_ms": wall_ms(),
    }


def facts_of(
    node_id: str,
    *,
    up: bool,
    why_down: str | None,
    own_view: Mapping[str, object] | None,
    others: Mapping[str, Mapping[str, object]],
    incompatible: object = None,
) -> MemberFacts:
    """A member's facts from this node's health and the /ring answers gathered
    (its own, for readiness; the others', for whether they see it down)."""
    local = own_view.get("local") if own_view is not None else None
    ready = local.get("ready") if isinstance(local, Mapping) else None
    reason = local.get("not_ready_reason") if isinstance(local, Mapping) else None
    seen_down_by = []
    for observer, ring in sorted(others.items()):
        if observer == node_id:
            continue
        members = ring.get("members")
        for member in members if isinstance(members, list) else []:
            if isinstance(member, Mapping) and member.get("node_id") == node_id and member.get("reachable") is False:
                seen_down_by.append(observer)
    return MemberFacts(
        node_id=node_id,
        up=up,
        why_down=why_down,
        ready=ready if isinstance(ready, bool) else None,
        not_ready_reason=reason if isinstance(reason, str) else None,
        seen_down_by=tuple(seen_down_by),
        incompatible=None if not incompatible else str(incompatible),
    )
