"""An in-process PeerClient for unit tests: calls other nodes' replica side
directly, no sockets, with fault injection (a peer can be made unreachable).
Integration tests use the real HTTP client; this keeps unit tests fast."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Protocol

from app.clock import wall_ms
from app.errors import DigestsBuildingError, NotComparableError, PeerRefusedError, PeerUnavailableError
from app.storage.base import Record
from app.transport.base import Peer, PeerClient, ReadAnswer, WriteAck
from app.transport.protocol import OWN

OWN_HEADER = OWN.render()


class ReplicaSide(Protocol):
    def read(self, key: bytes) -> ReadAnswer: ...
    async def write(self, key: bytes, record: Record, *, hint_for: str | None = None) -> WriteAck: ...
    async def write_batch(self, records: list[tuple[bytes, Record]]) -> int: ...
    def digests(self, arcs: list[tuple[int, int]]) -> list[bytes]: ...
    def records_in_arcs(self, arcs: list[tuple[int, int]]) -> list[tuple[bytes, Record]]: ...
    def syncing_arcs(self) -> list[tuple[int, int]]: ...


class InProcessPeerClient(PeerClient):
    def __init__(self, replicas: dict[str, ReplicaSide] | None = None) -> None:
        self.replicas: dict[str, ReplicaSide] = replicas if replicas is not None else {}
        self.membership_handlers: dict[str, Callable[[dict[str, str]], object]] = {}
        # node_id -> its anti-entropy's answer to a shared-digest call (asker, ring fingerprint)
        self.shared_digest_handlers: dict[str, Callable[[str, str], Awaitable[bytes]]] = {}
        self.unreachable: set[str] = set()
        self.hung: set[str] = set()  # accept calls and never answer (a blackholed peer): callers must time out or hedge
        self.ring_views: dict[str, Callable[[], dict[str, object]]] = {}  # node_id -> its /ring answer
        self.walls: dict[str, Callable[[], int]] = {}  # a node's wall clock, if not the real one (skew tests)
        self.calls: list[tuple[str, str]] = []  # (node_id, operation), for assertions
        # node_id -> the protocol header its answers carry, if not this build's (None: none, as 0.1.0)
        self.protocols: dict[str, str | None] = {}

    def _target(self, peer: Peer, operation: str) -> ReplicaSide:
        self.calls.append((peer.node_id, operation))
        if peer.node_id in self.unreachable or peer.node_id not in self.replicas:
            raise PeerUnavailableError(f"peer {peer} unreachable: injected fault", peer=peer.node_id)
        if self.protocol_sink is not None:
            self.protocol_sink(peer.node_id, self.protocols.get(peer.node_id, OWN_HEADER))
        return self.replicas[peer.node_id]

    async def read(self, peer: Peer, key: bytes) -> ReadAnswer:
        target = self._target(peer, "read")
        if peer.node_id in self.hung:
            await asyncio.Event().wait()  # never set: only a caller's timeout or cancellation ends it
        return target.read(key)

    async def write(self, peer: Peer, key: bytes, record: Record, *, hint_for: str | None = None) -> WriteAck:
        target = self._target(peer, "hint" if hint_for else "write")
        if peer.node_id in self.hung:
            await asyncio.Event().wait()
        return await target.write(key, record, hint_for=hint_for)

    async def write_batch(self, peer: Peer, records: list[tuple[bytes, Record]]) -> int:
        return await self._target(peer, "batch").write_batch(records)

    async def digests(self, peer: Peer, arcs: list[tuple[int, int]]) -> list[bytes]:
        try:
            return self._target(peer, "digests").digests(arcs)
        except DigestsBuildingError as exc:  # the HTTP client's translation of the route's 409
            raise PeerRefusedError(f"peer {peer} answered 409 to a digests: {exc}", peer=peer.node_id) from exc

    async def shared_digest(self, peer: Peer, *, asker: str, ring: str) -> bytes:
        self._target(peer, "shared-digest")
        try:
            return await self.shared_digest_handlers[peer.node_id](asker, ring)
        except NotComparableError as exc:  # the HTTP client's translation of the route's 409
            raise PeerRefusedError(f"peer {peer} answered 409 to a shared digest: {exc}", peer=peer.node_id) from exc

    async def records_in_arcs(self, peer: Peer, arcs: list[tuple[int, int]]) -> list[tuple[bytes, Record]]:
        return self._target(peer, "range").records_in_arcs(arcs)

    async def syncing_arcs(self, peer: Peer) -> list[tuple[int, int]]:
        return self._target(peer, "syncing").syncing_arcs()

    async def set_membership(self, peer: Peer, members: dict[str, str]) -> None:
        self._target(peer, "membership")
        result = self.membership_handlers[peer.node_id](members)
        if inspect.isawaitable(result):
            await result

    async def probe(self, peer: Peer) -> bool:
        # A hung peer's probe times out, as the real client's does after PROBE_TIMEOUT_S.
        return peer.node_id in self.replicas and not ({peer.node_id} & (self.unreachable | self.hung))

    async def wall_clock(self, peer: Peer) -> int:
        self._target(peer, "clock")
        if peer.node_id in self.hung:
            raise PeerUnavailableError(f"peer {peer} unreachable (clock): timed out", peer=peer.node_id)
        return self.walls.get(peer.node_id, wall_ms)()

    async def ring_view(self, peer: Peer, *, authorization: str | None) -> dict[str, object]:
        self._target(peer, "ring")
        if peer.node_id in self.hung or peer.node_id not in self.ring_views:
            raise PeerUnavailableError(f"peer {peer} unreachable (ring view): timed out", peer=peer.node_id)
        return self.ring_views[peer.node_id]()
