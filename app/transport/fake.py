"""An in-process PeerClient for unit tests: calls other nodes' coordinators
directly, no sockets, with fault injection (a peer can be made unreachable).
Integration tests use the real HTTP client; this keeps unit tests fast."""

from __future__ import annotations

from typing import Protocol

from app.errors import PeerUnavailableError
from app.storage.base import Record
from app.transport.base import Peer, PeerClient, WriteAck


class ReplicaSide(Protocol):
    def replica_read(self, key: bytes) -> Record | None: ...
    async def replica_write(self, key: bytes, record: Record) -> WriteAck: ...


class InProcessPeerClient(PeerClient):
    def __init__(self, replicas: dict[str, ReplicaSide] | None = None) -> None:
        self.replicas: dict[str, ReplicaSide] = replicas if replicas is not None else {}
        self.unreachable: set[str] = set()
        self.calls: list[tuple[str, str]] = []  # (node_id, "read" | "write"), for assertions

    def _target(self, peer: Peer) -> ReplicaSide:
        if peer.node_id in self.unreachable or peer.node_id not in self.replicas:
            raise PeerUnavailableError(f"peer {peer} unreachable: injected fault", peer=peer.node_id)
        return self.replicas[peer.node_id]

    async def read(self, peer: Peer, key: bytes) -> Record | None:
        self.calls.append((peer.node_id, "read"))
        return self._target(peer).replica_read(key)

    async def write(self, peer: Peer, key: bytes, record: Record) -> WriteAck:
        self.calls.append((peer.node_id, "write"))
        return await self._target(peer).replica_write(key, record)

    async def probe(self, peer: Peer) -> bool:
        return peer.node_id in self.replicas and peer.node_id not in self.unreachable
