"""Ring membership: the current members, their URLs and the ring built from them.

A membership change builds a whole new Topology (and HashRing) and swaps
one reference, so a request never sees a half-updated ring. Providers
(static peer list, Kubernetes) call `update`; the coordinator reads `current`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from app.ring import HashRing
from app.transport.base import Peer


@dataclass(frozen=True)
class Topology:
    ring: HashRing
    peers: dict[str, Peer]  # every member, this node included, by node id
    epoch: int  # bumped on every change; lets watchers tell views apart

    def peer(self, node_id: str) -> Peer:
        return self.peers[node_id]

    @cached_property
    def client_epoch(self) -> str:
        """The ring's version as clients see it (GET /ring/tokens, and the
        x-kvstore-epoch header of every answer): a digest of the members, their
        URLs and the vnodes, so every node with the same view says the same
        value. `epoch` is a per-node counter (a node that joined later counts
        from 1): clients comparing it across nodes would refresh forever."""
        identity = "\n".join(
            [str(self.ring.vnodes), *(f"{node_id}={peer.url}" for node_id, peer in sorted(self.peers.items()))]
        )
        return hashlib.blake2b(identity.encode(), digest_size=8).hexdigest()


class CurrentTopology:
    """Holds the current Topology of one node and swaps it atomically."""

    def __init__(self, *, self_id: str, members: dict[str, str], vnodes: int) -> None:
        self.self_id = self_id
        self._vnodes = vnodes
        self._listeners: list[Callable[[Topology, Topology], None]] = []
        self._current = self._build(members, epoch=1)

    def _build(self, members: dict[str, str], *, epoch: int) -> Topology:
        peers = {node_id: Peer(node_id, url.rstrip("/")) for node_id, url in members.items()}
        return Topology(ring=HashRing(peers, vnodes=self._vnodes), peers=peers, epoch=epoch)

    @property
    def current(self) -> Topology:
        return self._current

    def on_change(self, listener: Callable[[Topology, Topology], None]) -> None:
        """Call listener(old, new) after every swap."""
        self._listeners.append(listener)

    def update(self, members: dict[str, str]) -> Topology:
        """Swap in a new membership if it differs from the current one."""
        old = self._current
        if {node_id: peer.url for node_id, peer in old.peers.items()} == members:
            return old
        new = self._build(members, epoch=old.epoch + 1)
        self._current = new
        for listener in self._listeners:
            listener(old, new)
        return new
