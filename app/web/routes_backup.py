"""The backup and restore routes, under /admin/ and behind require_admin
(`kvstore backup` and `kvstore restore` call them; app.cli.backup). Thin:
GET /admin/backup streams app.storage.backup_format frames built from
app.cluster.backup's batches, one batch at a time (uvicorn's send waits
while the client is slow: that is the back-pressure); POST /admin/restore
takes one verified chunk frame and writes it through app.cluster.restore.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from app import __version__
from app.cluster.backup import DEFAULT_PACE, BackupSource
from app.cluster.context import ClusterContext
from app.cluster.node import Node
from app.cluster.restore import RestoreWriter
from app.errors import BackupFormatError, KvstoreError, ValueTooLargeError
from app.storage.backup_format import (
    COMPRESSIONS,
    DEFAULT_COMPRESSION,
    MAX_CHUNK_BYTES,
    BackupWriter,
    error_frame,
    parse_chunk_frame,
)
from app.storage.base import Record
from app.web.routes_admin import require_admin
from app.web.slot import node_of

log = logging.getLogger(__name__)

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])

COMPRESSION_HELP = f"how chunks are compressed: {' or '.join(COMPRESSIONS)}"
PACE_HELP = "the share of time the backup works (it rests the rest, for client traffic); 1: full speed"


def context_of(node: Node) -> ClusterContext:
    return ClusterContext(
        node_id=node.config.node_id,
        replica=node.replica,
        peer_client=node.peer_client,
        health=node.health,
        topology=node.topology,
        metrics=node.metrics,
        replication_factor=node.config.replication_factor,
    )


def _check_compression(compression: str) -> None:
    if compression not in COMPRESSIONS:
        raise BackupFormatError(f"backup: compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")


@router.get(
    "/backup",
    summary="Stream a backup of the whole cluster: every write acknowledged before it started is in it",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def backup(
    request: Request,
    compression: str = Query(DEFAULT_COMPRESSION, description=COMPRESSION_HELP),
    pace: float = Query(DEFAULT_PACE, gt=0, le=1, description=PACE_HELP),
) -> StreamingResponse:
    _check_compression(compression)
    node = node_of(request)
    source = BackupSource(context_of(node))
    plan = source.plan()  # too few reachable replicas: a 503 now, before any byte is sent
    writer = BackupWriter(compression=compression)
    view = node.topology.current
    header = writer.header(
        {
            "created_ms": int(time.time() * 1000),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "kvstore": __version__,
            "cluster": {
                "served_by": node.config.node_id,
                "members": sorted(view.peers),
                "replication_factor": node.config.replication_factor,
                "vnodes": node.config.vnodes,
            },
            "nodes": len(view.peers),
            "arcs": sum(len(arcs) for _, arcs in plan),
            "estimated_records": source.estimated_records(),
        }
    )

    async def frames() -> AsyncIterator[bytes]:
        yield header
        try:
            async for batch in source.batches(plan, pace=pace):
                # Encoding and compressing ~1 MB is a few ms of CPU: off the event loop.
                started = time.monotonic()
                frames = await asyncio.to_thread(_encode, writer, batch)
                source.note_busy(time.monotonic() - started)
                for frame in frames:
                    yield frame
        except KvstoreError as exc:
            log.warning("backup stopped: %s", exc)
            yield error_frame(str(exc))
            return
        yield writer.trailer()
        log.info("backup sent: %d records in %d chunks", writer.records, writer.chunks)

    return StreamingResponse(frames(), media_type="application/octet-stream")


@router.post(
    "/restore",
    summary="Write one backup chunk frame's records with their original versions (newer versions win)",
    openapi_extra={"requestBody": {"content": {"application/octet-stream": {}}, "required": True}},
)
async def restore(
    request: Request, compression: str = Query(DEFAULT_COMPRESSION, description=COMPRESSION_HELP)
) -> dict[str, int]:
    _check_compression(compression)
    node = node_of(request)
    frame = await _bounded_body(request, MAX_CHUNK_BYTES + 64)
    records = await asyncio.to_thread(parse_chunk_frame, frame, compression=compression)
    result = await RestoreWriter(context_of(node)).restore(records)
    return {
        "records": result.records,
        "applied": result.applied,
        "unchanged": result.unchanged,
        "replica_writes_applied": result.replica_writes_applied,
    }


def _encode(writer: BackupWriter, batch: list[tuple[bytes, Record]]) -> list[bytes]:
    return list(writer.chunks_of(batch))


async def _bounded_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ValueTooLargeError(f"restore: a chunk of {declared} bytes exceeds the limit of {limit} bytes")
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise ValueTooLargeError(f"restore: a chunk exceeds the limit of {limit} bytes")
        parts.append(part)
    return b"".join(parts)
