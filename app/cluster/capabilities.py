"""Capability negotiation (Riak's riak_core_capability): what each member of
the ring speaks, learned from the protocol header (app.transport.protocol) on
every internal request it sends this node and every answer it gives, the
probes included; and what the cluster as a whole may use.

The API a feature needs is one call:

    if node.capabilities.cluster_supports("digest-v2"):
        ...  # the new wire format
    else:
        ...  # what every release since X-1 understands

A feature that changes what goes over the wire gets a name in
app.transport.protocol.CAPABILITIES and is used only while cluster_supports()
says so: this node supports it and every other member has been heard from
since it was last seen down and supports it too. A member not heard from yet,
a member that sent no header (0.1.0) and a member that left all say no, so a
mixed cluster runs in the old mode until the last old node is gone, and goes
back to it the moment an old node reappears (a rollback). Knowledge lags a
restart by at most one probe (a second), so a gated feature must also fail
safe against an old peer: a new route or field that an old node refuses with
a 4xx, never one it would misread. `peer_supports(node_id, name)` is the
same question for one peer (point-to-point features). A peer whose protocol
range does not meet ours is reported through `on_verdict` (the node marks it
unreachable and /ring names it); its calls are never misread.

Fed by app.web.dataplane (requests) and the peer client (answers), through
app.cluster.node; read by /ring, the metrics, and any gated feature.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from app.transport.protocol import OWN, PeerProtocol, parse

log = logging.getLogger(__name__)

_UNSEEN = object()  # no header value observed since the peer was last forgotten


class Capabilities:
    def __init__(
        self,
        *,
        self_id: str,
        own: PeerProtocol = OWN,
        on_verdict: Callable[[str, str | None], None] | None = None,
    ) -> None:
        """on_verdict(node_id, reason) runs on each new observation of a peer:
        reason says why it is incompatible, None that it is compatible."""
        self.self_id = self_id
        self.own = own
        self._on_verdict = on_verdict
        self._raw: dict[str, object] = {}  # node id -> the header value last seen (None: no header)
        self._peers: dict[str, PeerProtocol] = {}  # compatible peers heard from
        self._incompatible: dict[str, str] = {}  # node id -> why
        self._members: frozenset[str] = frozenset()

    # -- fed by the node -----------------------------------------------------------

    def observe(self, node_id: str, header: str | None) -> None:
        """A request or answer from node_id carried this header value (None:
        none). Called for every one; costs a dict lookup unless it changed."""
        if node_id == self.self_id or self._raw.get(node_id, _UNSEEN) == header:
            return
        self._raw[node_id] = header
        try:
            peer = parse(header)
            reason = self.own.incompatible_with(peer)
        except ValueError as exc:
            peer, reason = None, f"its protocol header {header!r} is unreadable ({exc}); treated as unreachable"
        was = self._incompatible.get(node_id)
        if reason is None and peer is not None:
            self._peers[node_id] = peer
            self._incompatible.pop(node_id, None)
            if was is not None:
                log.warning(
                    "peer %s is compatible again: kvstore %s, protocol %d", node_id, peer.release, peer.protocol
                )
        else:
            assert reason is not None
            self._peers.pop(node_id, None)
            self._incompatible[node_id] = reason
            if was != reason:
                log.error("peer %s is incompatible, treated as unreachable: %s", node_id, reason)
        if self._on_verdict is not None:
            self._on_verdict(node_id, reason)

    def forget(self, node_id: str) -> None:
        """Unknown again (its process may be replaced, say by an older release,
        while it is away): the next request or answer from it tells."""
        self._raw.pop(node_id, None)
        self._peers.pop(node_id, None)
        self._incompatible.pop(node_id, None)

    def set_members(self, node_ids: Iterable[str]) -> None:
        """The ring's members now; those that left are forgotten."""
        self._members = frozenset(node_ids)
        for node_id in set(self._raw) - self._members:
            self.forget(node_id)

    # -- read by features, /ring and the metrics -----------------------------------

    def peer(self, node_id: str) -> PeerProtocol | None:
        """What a compatible peer speaks; None while unknown or incompatible."""
        return self.own if node_id == self.self_id else self._peers.get(node_id)

    def incompatibility(self, node_id: str) -> str | None:
        return self._incompatible.get(node_id)

    def peer_supports(self, node_id: str, name: str) -> bool:
        peer = self.peer(node_id)
        return name in self.own.capabilities and peer is not None and name in peer.capabilities

    def cluster_supports(self, name: str) -> bool:
        """True when this node and every other member, each heard from, support `name`."""
        return name in self.own.capabilities and all(
            self.peer_supports(node_id, name) for node_id in self._members if node_id != self.self_id
        )

    def cluster_capabilities(self) -> frozenset[str]:
        return frozenset(name for name in self.own.capabilities if self.cluster_supports(name))

    def cluster_protocol(self) -> int:
        """The protocol every member speaks: the lowest among them, a member
        not heard from counted as the oldest this node talks to."""
        lowest = self.own.protocol
        for node_id in self._members:
            peer = self.peer(node_id)
            lowest = min(lowest, peer.protocol if peer is not None else self.own.min_protocol)
        return lowest

    def incompatible_members(self) -> list[str]:
        return sorted(node_id for node_id in self._members if node_id in self._incompatible)

    def unknown_members(self) -> list[str]:
        """Members not heard from (or incompatible): they hold the cluster in the old mode."""
        return sorted(node_id for node_id in self._members if self.peer(node_id) is None)
