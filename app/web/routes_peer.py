"""Every node-to-node route, under /internal/v1/ (app.transport.base names
them), answered by the data plane without FastAPI: single-key replica reads
and writes and their coalesced forms (the hot path), the wall clock for
offset probes, and the bulk routes of anti-entropy, rebalancing, hint
delivery and membership propagation. Never forwarded again. The data plane
checks the cluster token before any of these runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import orjson

from app.clock import wall_ms
from app.cluster.node import Node
from app.config import MAX_KEY_BYTES
from app.errors import InvalidRequestError
from app.storage.base import Record
from app.transport import codec
from app.transport.base import (
    APPLIED_HEADER,
    COALESCE_MAX_BYTES,
    COALESCE_MAX_CALLS,
    EXISTED_HEADER,
    HINT_HEADER,
    KV_PATH,
    NEWER_HEADER,
    SYNCING_HEADER,
    record_from_headers,
    record_headers,
)
from app.web.asgi import JSON, OCTETS, Receive, Reply, Scope, allow, raw_path_after, read_body
from app.web.keys import check_value_size, key_from_path, validate_key
from app.web.members import requested_members

T = TypeVar("T")

KV_PREFIX_BYTES = KV_PATH.encode()
SYNCING = (SYNCING_HEADER.encode(), b"1")
FRAME_OVERHEAD = MAX_KEY_BYTES + 300  # per coalesced call: its key, node ids and fixed fields
# Bulk bodies are bounded by what senders batch (at most 1,000 records of at
# most --max-value-bytes each), not by one request's worth.
BULK_MAX_BYTES = 1 << 30


class PeerRoutes:
    """The handlers, bound to the limits of one node's configuration."""

    def __init__(self, *, max_value_bytes: int) -> None:
        self.max_value = max_value_bytes
        # A coalesced body holds calls up to COALESCE_MAX_BYTES in all, or a single
        # write of any allowed size (the sender never batches a bigger one with others).
        self.max_coalesced = max(max_value_bytes, COALESCE_MAX_BYTES) + COALESCE_MAX_CALLS * FRAME_OVERHEAD

    # -- single keys: /internal/v1/kv/{key} ---------------------------------------

    async def kv(self, node: Node, scope: Scope, receive: Receive, method: str) -> Reply:
        allow(method, KV_PATH + "{key}", ("GET", "PUT"))
        key = key_from_path(raw_path_after(scope, KV_PREFIX_BYTES))
        if method == "GET":
            node.metrics.internal_reads.inc()
            answer = node.replica.read(key)
            extra = [] if answer.authoritative else [SYNCING]
            if answer.record is None:
                return Reply(404, headers=extra)
            return Reply(
                200, answer.record.value or b"", OCTETS, _encode_headers(record_headers(answer.record)) + extra
            )
        node.metrics.internal_writes.inc()
        body = await read_body(scope, receive, self.max_value)
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        try:
            record = record_from_headers(headers, body)
        except (KeyError, ValueError):
            raise InvalidRequestError("replica write needs a valid x-kvstore-version header") from None
        ack = await node.replica.write(key, record, hint_for=headers.get(HINT_HEADER) or None)
        answer_headers = [
            (APPLIED_HEADER.encode(), b"1" if ack.applied else b"0"),
            (EXISTED_HEADER.encode(), b"1" if ack.existed else b"0"),
        ]
        if ack.newer is not None:
            answer_headers.append((NEWER_HEADER.encode(), ack.newer.encode().encode()))
        return Reply(200, headers=answer_headers)

    # -- coalesced single-key calls ---------------------------------------------------

    async def writes(self, node: Node, scope: Scope, receive: Receive, method: str) -> Reply:
        allow(method, scope["path"], ("POST",))
        writes = _decoded_calls(codec.decode_writes, await read_body(scope, receive, self.max_coalesced))
        for key, record, _ in writes:
            validate_key(key)
            if record.value is not None:
                check_value_size(record.value, self.max_value)
        node.metrics.internal_writes.inc(len(writes))
        acks = await node.replica.write_many(writes)
        return Reply(200, codec.encode_acks((ack.applied, ack.existed, ack.newer) for ack in acks), OCTETS)

    async def reads(self, node: Node, scope: Scope, receive: Receive, method: str) -> Reply:
        allow(method, scope["path"], ("POST",))
        body = await read_body(scope, receive, COALESCE_MAX_CALLS * FRAME_OVERHEAD + COALESCE_MAX_BYTES)
        keys = _decoded_calls(codec.decode_keys, body)
        for key in keys:
            validate_key(key)
        node.metrics.internal_reads.inc(len(keys))
        answers = node.replica.read_many(keys)
        return Reply(
            200,
            codec.encode_read_answers(
                (key, answer.record, not answer.authoritative) for key, answer in zip(keys, answers, strict=True)
            ),
            OCTETS,
        )

    # -- the clock ---------------------------------------------------------------------

    async def clock(self, node: Node, scope: Scope, receive: Receive, method: str) -> Reply:
        """This node's wall clock, for its peers' offset probes."""
        allow(method, scope["path"], ("GET",))
        return Reply(200, orjson.dumps({"node_id": node.config.node_id, "wall_ms": wall_ms()}))

    # -- bulk: anti-entropy, rebalancing, hints, membership -----------------------------

    async def batch(self, node: Node, scope: Scope, receive: Receive, method: str) -> Reply:
        """Apply many replica records, last writer wins; how many were newer."""
        allow(method, scope["path"], ("POST",))
        records: list[tuple[bytes, Record]] = _decoded(
            codec.decode_records, await read_body(scope, receive, BULK_MAX_BYTES), "record batch"
        )
        return Reply(200, orjson.dumps({"applied": await node.replica.write_batch(records)}))

    async def digests(self, node: Node, scope: Scope, receive: Receive, method: str) -> Reply:
        """The digest of this node's records in each arc (a thread: it reads them)."""
        allow(method, scope["path"], ("POST",))
        arcs = _decoded(codec.decode_arcs, await read_body(scope, receive, BULK_MAX_BYTES), "arc list")
        return Reply(200, codec.encode_digests(await asyncio.to_thread(node.replica.digests, arcs)), OCTETS)

    async def shared_digest(self, node: Node, scope: Scope, receive: Receive, method: str) -> Reply:
        """One digest over every arc this node and the asker both replicate,
        on the ring the asker names (409 when this node's ring is another or
        its digest index is still building)."""
        allow(method, scope["path"], ("POST",))
        body = _decoded(orjson.loads, await read_body(scope, receive, BULK_MAX_BYTES), "JSON body")
        asker = body.get("asker") if isinstance(body, dict) else None
        ring = body.get("ring") if isinstance(body, dict) else None
        if not isinstance(asker, str) or not isinstance(ring, str):
            raise InvalidRequestError('the body must be {"asker": "<node id>", "ring": "<ring fingerprint>"}')
        digest = await node.anti_entropy.answer_shared_digest(asker, ring)
        return Reply(200, orjson.dumps({"digest": digest.hex()}), JSON)

    async def range(self, node: Node, scope: Scope, receive: Receive, method: str) -> Reply:
        """Every record this node holds in the arcs."""
        allow(method, scope["path"], ("POST",))
        arcs = _decoded(codec.decode_arcs, await read_body(scope, receive, BULK_MAX_BYTES), "arc list")
        # Read and framed in a worker thread: a rebalancing batch is tens of
        # thousands of records, too long a stretch for the event loop.
        body = await asyncio.to_thread(lambda: codec.encode_records(node.replica.records_in_arcs(arcs)))
        return Reply(200, body, OCTETS)

    async def syncing(self, node: Node, scope: Scope, receive: Receive, method: str) -> Reply:
        """The arcs this node is still pulling (a peer waits before handing it surplus)."""
        allow(method, scope["path"], ("POST",))
        return Reply(200, codec.encode_arcs(node.replica.syncing_arcs()), OCTETS)

    async def membership(self, node: Node, scope: Scope, receive: Receive, method: str) -> Reply:
        """Take a new member list from another node, without telling anyone else."""
        allow(method, scope["path"], ("POST",))
        body = _decoded(orjson.loads, await read_body(scope, receive, BULK_MAX_BYTES), "JSON body")
        members = requested_members(body.get("peers") if isinstance(body, dict) else None)
        view, _ = await node.apply_membership(members, propagate=False)
        return Reply(200, orjson.dumps({"epoch": view.epoch, "members": sorted(view.peers)}), JSON)


def _decoded(decode: Callable[[bytes], T], body: bytes, what: str) -> T:
    try:
        return decode(body)
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"bad {what}: {exc}") from None


def _decoded_calls(decode: Callable[[bytes], list[T]], body: bytes) -> list[T]:
    try:
        calls = decode(body)
    except (ValueError, IndexError, UnicodeDecodeError):
        raise InvalidRequestError("malformed coalesced call frames") from None
    if len(calls) > COALESCE_MAX_CALLS:
        raise InvalidRequestError(f"{len(calls)} coalesced calls; the limit is {COALESCE_MAX_CALLS}")
    return calls


def _encode_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in headers.items()]
