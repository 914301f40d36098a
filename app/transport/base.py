"""The peer-client interface and the replica wire protocol shared by the HTTP
client, the internal routes that serve it, and the in-process fake.

Replica routes live under INTERNAL_PREFIX and are never forwarded again: a
node that receives one serves it from its own store, so a request crosses at
most one internal hop. Imports storage types only; no network library.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

from app.clock import Version
from app.storage.base import Record

INTERNAL_PREFIX = "/internal/v1"
KV_PATH = INTERNAL_PREFIX + "/kv/"
TOKEN_HEADER = "x-kvstore-token"
FROM_HEADER = "x-kvstore-from"  # the node id of the node sending an internal request
VERSION_HEADER = "x-kvstore-version"
EXPIRES_HEADER = "x-kvstore-expires"
TOMBSTONE_HEADER = "x-kvstore-tombstone"
APPLIED_HEADER = "x-kvstore-applied"
EXISTED_HEADER = "x-kvstore-existed"
NEWER_HEADER = "x-kvstore-newer"  # on a write's answer: the newer version the replica kept instead
HINT_HEADER = "x-kvstore-hint-for"  # a write held for another replica (hinted handoff)
SYNCING_HEADER = "x-kvstore-syncing"  # the replica is still pulling this range: its answer may be stale
BATCH_PATH = INTERNAL_PREFIX + "/batch"
DIGESTS_PATH = INTERNAL_PREFIX + "/digests"
SHARED_DIGEST_PATH = INTERNAL_PREFIX + "/shared-digest"  # one digest over every arc two nodes both replicate
RANGE_PATH = INTERNAL_PREFIX + "/range"
SYNCING_PATH = INTERNAL_PREFIX + "/syncing"  # the arcs a replica is still pulling after a membership change
MEMBERSHIP_PATH = INTERNAL_PREFIX + "/membership"
CLOCK_PATH = INTERNAL_PREFIX + "/clock"  # a node's wall clock, for offset measurement
WRITES_PATH = INTERNAL_PREFIX + "/writes"  # coalesced single-key writes (app.coalesce)
READS_PATH = INTERNAL_PREFIX + "/reads"  # coalesced single-key reads
RING_PATH = "/ring"  # a client route, not an internal one: the console fetches each peer's view
COALESCE_MAX_CALLS = 64  # calls per coalesced request: one request's worth of work, not a bulk transfer
COALESCE_MAX_BYTES = 256 * 1024  # body bytes per coalesced request; a bigger single write goes alone


@dataclass(frozen=True, slots=True)
class Peer:
    node_id: str
    url: str

    def __str__(self) -> str:
        return f"{self.node_id} ({self.url})"


@dataclass(frozen=True, slots=True)
class WriteAck:
    """A replica's answer to a write."""

    applied: bool  # the write was newer than what the replica held
    existed: bool  # the replica held a live value before the write
    newer: Version | None = None  # the replica kept this newer version: the write lost there

    @property
    def won(self) -> bool:
        """The replica now holds the write (applied, or already had that very version)."""
        return self.newer is None


def ack_for(record: Record, *, applied: bool, previous: Record | None, now_ms: int) -> WriteAck:
    """The answer to a write of `record` that found `previous` stored."""
    newer = previous.version if previous is not None and previous.version > record.version else None
    return WriteAck(applied, previous is not None and previous.live(now_ms), newer)  # positional: the hot path


@dataclass(frozen=True, slots=True)
class ReadAnswer:
    """A replica's answer to a read."""

    record: Record | None
    authoritative: bool = True  # False while the replica is still syncing the key's range


def quote_key(key: bytes) -> str:
    return quote(key, safe="")


def record_headers(record: Record) -> dict[str, str]:
    headers = {VERSION_HEADER: record.version.encode()}
    if record.expires_at_ms:
        headers[EXPIRES_HEADER] = str(record.expires_at_ms)
    if record.value is None:
        headers[TOMBSTONE_HEADER] = "1"
    return headers


def record_from_headers(headers: Mapping[str, str], body: bytes) -> Record:
    """Inverse of record_headers; raises ValueError on a malformed header."""
    version = Version.decode(headers[VERSION_HEADER])
    expires = int(headers.get(EXPIRES_HEADER) or 0)
    tombstone = headers.get(TOMBSTONE_HEADER) == "1"
    return Record(version=version, value=None if tombstone else body, expires_at_ms=expires)


class PeerClient(abc.ABC):
    """Calls the replica routes of other nodes. Every request carries this
    build's protocol header, and every answer's is reported to protocol_sink.

    Failing to get an answer (refused, reset, timed out, or a 503) raises
    app.errors.PeerUnavailableError naming the peer; an answer that refuses
    the call (409, another 4xx) PeerRefusedError; any other wrong answer
    PeerError. Only the first says the peer is down.
    """

    @abc.abstractmethod
    async def read(self, peer: Peer, key: bytes) -> ReadAnswer:
        """The peer's record for key (tombstones included; None if it has none)."""

    @abc.abstractmethod
    async def write(self, peer: Peer, key: bytes, record: Record, *, hint_for: str | None = None) -> WriteAck:
        """Apply record on the peer (or, with hint_for, hold it there for that
        node); returns once the peer has made it durable."""

    def read_soon(self, peer: Peer, key: bytes) -> asyncio.Future[ReadAnswer]:
        """read() already under way, as a future (see write_soon)."""
        return asyncio.ensure_future(self.read(peer, key))

    def write_soon(self, peer: Peer, key: bytes, record: Record) -> asyncio.Future[WriteAck]:
        """write() already under way: a future of its ack, for a caller that
        wants a callback rather than a coroutine (the coordinator's write
        round, where a task per replica cost ~3 us each). Clients that
        coalesce hand out their batch's future itself."""
        return asyncio.ensure_future(self.write(peer, key, record))

    @abc.abstractmethod
    async def write_batch(self, peer: Peer, records: list[tuple[bytes, Record]]) -> int:
        """Apply many records on the peer (last writer wins); how many were newer."""

    @abc.abstractmethod
    async def digests(self, peer: Peer, arcs: list[tuple[int, int]]) -> list[bytes]:
        """The peer's digest of its records in each arc (anti-entropy)."""

    @abc.abstractmethod
    async def shared_digest(self, peer: Peer, *, asker: str, ring: str) -> bytes:
        """The peer's combined digest over every arc it and `asker` both
        replicate on the ring with this fingerprint (anti-entropy's first,
        one-value comparison). PeerRefusedError when the peer's ring differs,
        its index is still building, or it predates the route."""

    @abc.abstractmethod
    async def records_in_arcs(self, peer: Peer, arcs: list[tuple[int, int]]) -> list[tuple[bytes, Record]]:
        """Every record the peer holds in the arcs (tombstones included)."""

    @abc.abstractmethod
    async def syncing_arcs(self, peer: Peer) -> list[tuple[int, int]]:
        """The arcs the peer is still pulling after a membership change: its
        digests there are not yet worth comparing (surplus hand-off waits)."""

    @abc.abstractmethod
    async def set_membership(self, peer: Peer, members: dict[str, str]) -> None:
        """Tell the peer the new member list (it applies it without propagating)."""

    @abc.abstractmethod
    async def probe(self, peer: Peer) -> bool:
        """A cheap liveness check: True if the peer answers its health route.
        May raise PeerTLSError instead of returning False, to say why not (a
        certificate from another CA): the prober shows that reason in /ring."""

    @abc.abstractmethod
    async def ring_view(self, peer: Peer, *, authorization: str | None) -> dict[str, object]:
        """The peer's public /ring answer (the console shows how each member
        sees the others). `authorization` is the console caller's own header,
        forwarded: /ring is a client route, never opened by the cluster token."""

    @abc.abstractmethod
    async def wall_clock(self, peer: Peer) -> int:
        """The peer's wall clock in ms, as it answers (clock offset measurement)."""

    # Where the client reports the protocol header (app.transport.protocol) of
    # each answer a peer gives: (node id, header value or None). Set by the node.
    protocol_sink: Callable[[str, str | None], None] | None = None

    def on_protocol(self, sink: Callable[[str, str | None], None]) -> None:
        """Report every peer answer's protocol header to sink (app.cluster.capabilities)."""
        self.protocol_sink = sink

    def forget(self, peer: Peer) -> None:  # noqa: B027 - fakes hold nothing
        """The peer left the membership: drop its pooled connections. A later
        call to it (a handoff, say) opens new ones."""

    async def close(self) -> None:  # noqa: B027 - fakes hold nothing
        """Release pooled connections."""
