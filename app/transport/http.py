"""The real peer client: one pooled, keep-alive aiohttp session per node.

aiohttp rather than httpx because node-to-node calls are the hot path and
httpx measured ~10x more CPU per request here (see BENCHMARKS.md). Foreign
errors are translated once, here, into PeerUnavailableError.
"""

from __future__ import annotations

import asyncio

import aiohttp
from yarl import URL

from app.errors import PeerUnavailableError
from app.storage.base import Record
from app.transport.base import (
    APPLIED_HEADER,
    EXISTED_HEADER,
    KV_PATH,
    TOKEN_HEADER,
    Peer,
    PeerClient,
    WriteAck,
    quote_key,
    record_from_headers,
    record_headers,
)

CONNECTIONS_PER_PEER = 64  # keep-alive pool per peer: enough for a fan-out under load, bounded
PROBE_TIMEOUT_S = 1.0  # a health probe that takes longer than this counts as down


class HttpPeerClient(PeerClient):
    """Must be created inside the running event loop (aiohttp binds to it)."""

    def __init__(self, *, timeout_s: float, token: str | None = None) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=CONNECTIONS_PER_PEER, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )
        self._token_headers = {TOKEN_HEADER: token} if token else {}

    def _url(self, peer: Peer, key: bytes) -> URL:
        return URL(peer.url + KV_PATH + quote_key(key), encoded=True)

    async def read(self, peer: Peer, key: bytes) -> Record | None:
        try:
            async with self._session.get(self._url(peer, key), headers=self._token_headers) as resp:
                body = await resp.read()
                if resp.status == 404:
                    return None
                if resp.status != 200:
                    raise PeerUnavailableError(f"peer {peer} answered {resp.status} to a read", peer=peer.node_id)
                return record_from_headers(resp.headers, body)  # type: ignore[arg-type]
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, KeyError) as exc:
            raise PeerUnavailableError(f"peer {peer} unreachable: {_describe(exc)}", peer=peer.node_id) from exc

    async def write(self, peer: Peer, key: bytes, record: Record) -> WriteAck:
        headers = record_headers(record) | self._token_headers
        try:
            async with self._session.put(self._url(peer, key), data=record.value or b"", headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise PeerUnavailableError(f"peer {peer} answered {resp.status} to a write", peer=peer.node_id)
                return WriteAck(
                    applied=resp.headers.get(APPLIED_HEADER) == "1",
                    existed=resp.headers.get(EXISTED_HEADER) == "1",
                )
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise PeerUnavailableError(f"peer {peer} unreachable: {_describe(exc)}", peer=peer.node_id) from exc

    async def probe(self, peer: Peer) -> bool:
        try:
            timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
            async with self._session.get(URL(peer.url + "/health", encoded=True), timeout=timeout) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def close(self) -> None:
        await self._session.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
