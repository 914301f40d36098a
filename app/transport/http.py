"""The real peer client: single-key reads and writes over a lean keep-alive
pool per peer (app.transport.pool), coalesced per event-loop iteration
(app.coalesce); everything else over one aiohttp session.

Node-to-node calls are the hot path: httpx measured ~4 ms of CPU per request
here under concurrency, aiohttp ~120 us, the lean pool ~30 us (BENCHMARKS.md).
aiohttp stays for bulk transfers and probes, where its generality is worth
its cost. Every request carries the protocol header (app.transport.protocol)
and every answer's is reported to the node (PeerClient.protocol_sink).
Foreign errors and unexpected statuses are translated here, into the
PeerError kinds: only network errors, timeouts and a peer's own 503 make
it unavailable (app.errors draws the tree); a failed TLS handshake is
PeerTLSError, a kind of unavailable that says why.

https peers: both clients take the newest client context from the node's
TlsMaterial (app.transport.tls) for every new connection. After a rotation
the lean pools close their idle connections and retire busy ones when their
call ends; aiohttp keys its pool by context, so it never reuses a connection
of the old one, and closes those within its keep-alive timeout.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Mapping, Sized
from contextlib import asynccontextmanager
from typing import TypeVar
from urllib.parse import urlsplit

import aiohttp
import httptools
import orjson
from aiohttp.abc import ResolveResult
from yarl import URL

from app.clock import Version
from app.coalesce import Coalescer
from app.errors import PeerError, PeerRefusedError, PeerTLSError, PeerUnavailableError
from app.storage.base import Record
from app.transport import codec
from app.transport.base import (
    APPLIED_HEADER,
    BATCH_PATH,
    CLOCK_PATH,
    COALESCE_MAX_BYTES,
    COALESCE_MAX_CALLS,
    DIGESTS_PATH,
    EXISTED_HEADER,
    FROM_HEADER,
    HINT_HEADER,
    KV_PATH,
    MEMBERSHIP_PATH,
    NEWER_HEADER,
    RANGE_PATH,
    READS_PATH,
    RING_PATH,
    SHARED_DIGEST_PATH,
    SYNCING_HEADER,
    SYNCING_PATH,
    TOKEN_HEADER,
    WRITES_PATH,
    Peer,
    PeerClient,
    ReadAnswer,
    WriteAck,
    quote_key,
    record_from_headers,
    record_headers,
)
from app.transport.pool import PeerPool
from app.transport.protocol import OWN, PROTOCOL_HEADER
from app.transport.tls import TlsMaterial

Write = tuple[bytes, Record, "str | None"]  # key, record, hint_for
T = TypeVar("T")

CONNECTIONS_PER_PEER = 64  # keep-alive pool per peer: enough for a fan-out under load, bounded
PROBE_TIMEOUT_S = 1.0  # a health probe that takes longer than this counts as down
AIOHTTP_KEEPALIVE_S = 60  # idle aiohttp connections close after this (old-context ones too, after a rotation)
DECODE_IN_THREAD_BYTES = 256 * 1024  # range answers above this are decoded in a worker thread
BULK_TIMEOUT_S = 60.0  # range fetches and batches move many records: allow more than one request's time
# What says "no answer came": the network, a timeout, or bytes that are no
# HTTP at all. A malformed body or a local bug is not in this list.
_FAILURES = (aiohttp.ClientError, asyncio.TimeoutError, OSError, httptools.HttpParserError)


class OverrideResolver(aiohttp.abc.AbstractResolver):
    """DNS with fixed answers for some names (--resolve NAME=ADDRESS), the way
    curl's --resolve works: lets tests and developers run pods' DNS names on
    loopback addresses without touching /etc/hosts."""

    def __init__(self, overrides: dict[str, str]) -> None:
        self._overrides = overrides
        self._fallback = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        address = self._overrides.get(host)
        if address is None:
            return await self._fallback.resolve(host, port, family)
        return [
            ResolveResult(
                hostname=host, host=address, port=port, family=socket.AF_INET, proto=0, flags=socket.AI_NUMERICHOST
            )
        ]

    async def close(self) -> None:
        await self._fallback.close()


class HttpPeerClient(PeerClient):
    """Must be created inside the running event loop (aiohttp binds to it)."""

    def __init__(
        self,
        *,
        timeout_s: float,
        token: str | None = None,
        resolve: dict[str, str] | None = None,
        self_id: str | None = None,
        tls: TlsMaterial | None = None,
    ) -> None:
        self._tls = tls
        traces = []
        if tls is not None:  # only then: a trace config costs every request a little
            trace = aiohttp.TraceConfig()
            trace.on_connection_create_end.append(self._count_aiohttp_connection)
            traces.append(trace)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0,
                limit_per_host=CONNECTIONS_PER_PEER,
                keepalive_timeout=AIOHTTP_KEEPALIVE_S,
                resolver=OverrideResolver(resolve) if resolve else None,
            ),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            trace_configs=traces or None,
        )
        if tls is not None:
            tls.on_rotate(self.cycle_connections)
        # Every internal request carries the token (when set), names its
        # sender, so the peer learns this node is up from the request itself,
        # and says what it speaks (app.transport.protocol).
        self._token_headers = (
            ({TOKEN_HEADER: token} if token else {})
            | ({FROM_HEADER: self_id} if self_id else {})
            | {PROTOCOL_HEADER: OWN.render()}
        )
        self._probe_headers = {PROTOCOL_HEADER: OWN.render()}
        self._bulk_timeout = aiohttp.ClientTimeout(total=max(BULK_TIMEOUT_S, timeout_s))
        self._token_line = "".join(f"{name}: {value}\r\n" for name, value in self._token_headers.items()).encode()
        self._timeout_s = timeout_s
        self._resolve = resolve or {}
        self._pools: dict[str, PeerPool | None] = {}
        self._writes: dict[str, Coalescer[Write, WriteAck]] = {}
        self._reads: dict[str, Coalescer[bytes, ReadAnswer]] = {}
        self._octets_line = b"content-type: application/octet-stream\r\n" + self._token_line

    async def _count_aiohttp_connection(self, *_: object) -> None:
        if self._tls is not None:
            self._tls.count_client_handshake()

    def _ssl(self) -> ssl.SSLContext | bool:
        """aiohttp's ssl argument: the newest client context, or its default (plain peers)."""
        return self._tls.client_context() if self._tls is not None else True

    def _pool(self, peer: Peer) -> PeerPool | None:
        """The peer's keep-alive pool; None for an https peer when this node
        has no TLS material (aiohttp then verifies against the system CAs)."""
        try:
            return self._pools[peer.url]
        except KeyError:
            pass
        parts = urlsplit(peer.url)
        hostname = parts.hostname or "127.0.0.1"
        tls = self._tls if parts.scheme == "https" else None
        pool = None
        if parts.scheme == "http" or tls is not None:
            pool = PeerPool(
                self._resolve.get(hostname, hostname),
                parts.port or (443 if tls else 80),
                host_header=parts.netloc,
                limit=CONNECTIONS_PER_PEER,
                timeout_s=self._timeout_s,
                ssl_context=tls.client_context if tls else None,
                server_hostname=hostname if tls else None,
                on_connect=tls.count_client_handshake if tls else None,
            )
        self._pools[peer.url] = pool
        return pool

    def cycle_connections(self) -> None:
        """After a certificate rotation: retire every pooled connection made before it."""
        for pool in self._pools.values():
            if pool is not None:
                pool.cycle()

    def _url(self, peer: Peer, key: bytes) -> URL:
        return URL(peer.url + KV_PATH + quote_key(key), encoded=True)

    @asynccontextmanager
    async def _call(self, peer: Peer, what: str) -> AsyncIterator[None]:
        """Translate every failure to get an answer into PeerUnavailableError."""
        try:
            yield
        except PeerError:
            raise
        except _FAILURES as exc:
            raise _unreachable(peer, what, exc) from exc

    async def read(self, peer: Peer, key: bytes) -> ReadAnswer:
        pool = self._pool(peer)
        if pool is None:
            return await self._read_aiohttp(peer, key)
        return await self._read_coalescer(peer, pool).enqueue(key)

    def read_soon(self, peer: Peer, key: bytes) -> asyncio.Future[ReadAnswer]:
        """The coalesced batch's own future (no task) on a pooled peer."""
        pool = self._pool(peer)
        if pool is None:
            return super().read_soon(peer, key)
        return self._read_coalescer(peer, pool).enqueue(key)

    def _read_coalescer(self, peer: Peer, pool: PeerPool) -> Coalescer[bytes, ReadAnswer]:
        reads = self._reads.get(peer.url)
        if reads is None:
            reads = self._reads[peer.url] = Coalescer(
                lambda keys: self._send_reads(peer, pool, keys),
                max_items=COALESCE_MAX_CALLS,
                max_bytes=COALESCE_MAX_BYTES,
                size_of=len,
            )
        return reads

    async def write(self, peer: Peer, key: bytes, record: Record, *, hint_for: str | None = None) -> WriteAck:
        pool = self._pool(peer)
        if pool is None:
            headers = record_headers(record) | self._token_headers
            if hint_for is not None:
                headers[HINT_HEADER] = hint_for
            return await self._write_aiohttp(peer, key, record, headers)
        return await self._write_coalescer(peer, pool).enqueue((key, record, hint_for))

    def write_soon(self, peer: Peer, key: bytes, record: Record) -> asyncio.Future[WriteAck]:
        """The coalesced batch's own future (no task) on a pooled peer."""
        pool = self._pool(peer)
        if pool is None:
            return super().write_soon(peer, key, record)
        return self._write_coalescer(peer, pool).enqueue((key, record, None))

    def _write_coalescer(self, peer: Peer, pool: PeerPool) -> Coalescer[Write, WriteAck]:
        writes = self._writes.get(peer.url)
        if writes is None:
            writes = self._writes[peer.url] = Coalescer(
                lambda items: self._send_writes(peer, pool, items),
                max_items=COALESCE_MAX_CALLS,
                max_bytes=COALESCE_MAX_BYTES,
                size_of=_write_size,
            )
        return writes

    async def _send_reads(self, peer: Peer, pool: PeerPool, keys: list[bytes]) -> list[ReadAnswer]:
        if len(keys) == 1:
            return [await self._read_one(peer, pool, keys[0])]
        answer = await self._exchange(
            peer, pool, b"POST", READS_PATH, self._octets_line, codec.encode_keys(keys), "read"
        )
        decoded = _decoded(lambda: codec.decode_read_answers(answer), peer)
        _expect_count(decoded, keys, peer)
        return [ReadAnswer(record, authoritative=not syncing) for record, syncing in decoded]

    async def _send_writes(self, peer: Peer, pool: PeerPool, items: list[Write]) -> list[WriteAck]:
        if len(items) == 1:
            return [await self._write_one(peer, pool, *items[0])]
        answer = await self._exchange(
            peer, pool, b"POST", WRITES_PATH, self._octets_line, codec.encode_writes(items), "write"
        )
        decoded = _decoded(lambda: codec.decode_acks(answer), peer)
        _expect_count(decoded, items, peer)
        return [WriteAck(applied, existed, newer) for applied, existed, newer in decoded]

    async def _read_one(self, peer: Peer, pool: PeerPool, key: bytes) -> ReadAnswer:
        status, headers, body = await self._request(
            peer, pool, b"GET", KV_PATH + quote_key(key), self._token_line, b"", "read"
        )
        syncing = headers.get(SYNCING_HEADER) == "1"
        if status == 404:
            return ReadAnswer(None, authoritative=not syncing)
        if status != 200:
            raise _answer_error(peer, status, body, "read")
        return ReadAnswer(_decoded(lambda: record_from_headers(headers, body), peer), authoritative=not syncing)

    async def _write_one(
        self, peer: Peer, pool: PeerPool, key: bytes, record: Record, hint_for: str | None
    ) -> WriteAck:
        headers = record_headers(record)
        if hint_for is not None:
            headers[HINT_HEADER] = hint_for
        lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode() + self._token_line
        status, answer, body = await self._request(
            peer, pool, b"PUT", KV_PATH + quote_key(key), lines, record.value or b"", "write"
        )
        if status != 200:
            raise _answer_error(peer, status, body, "write")
        return _decoded(lambda: _ack_from_headers(answer), peer)

    async def _exchange(
        self, peer: Peer, pool: PeerPool, method: bytes, path: str, headers: bytes, body: bytes, what: str
    ) -> bytes:
        """One coalesced call; its body, or a PeerError."""
        status, _, answer = await self._request(peer, pool, method, path, headers, body, f"coalesced {what}")
        if status != 200:
            raise _answer_error(peer, status, answer, f"coalesced {what}")
        return answer

    async def _request(
        self, peer: Peer, pool: PeerPool, method: bytes, path: str, headers: bytes, body: bytes, what: str
    ) -> tuple[int, dict[str, str], bytes]:
        try:
            answer = await pool.request(method, path, headers=headers, body=body)
        except _FAILURES as exc:  # a try, not _call(): this is the hot path, and a context manager costs ~2 us
            raise _unreachable(peer, what, exc) from exc
        self._heard(peer, answer[0], answer[1])
        return answer

    def _heard(self, peer: Peer, status: int, headers: Mapping[str, str]) -> None:
        """An answer came: report its protocol header (only a route's own
        answer, 200 or 404, is sure to be the node's and not a proxy's)."""
        if self.protocol_sink is not None and status in (200, 404):
            self.protocol_sink(peer.node_id, headers.get(PROTOCOL_HEADER))

    async def _read_aiohttp(self, peer: Peer, key: bytes) -> ReadAnswer:
        async with (
            self._call(peer, "read"),
            self._session.get(self._url(peer, key), headers=self._token_headers, ssl=self._ssl()) as resp,
        ):
            body = await resp.read()
            self._heard(peer, resp.status, resp.headers)
            syncing = resp.headers.get(SYNCING_HEADER) == "1"
            if resp.status == 404:
                return ReadAnswer(None, authoritative=not syncing)
            _expect(resp.status, body, peer, "read")
            return ReadAnswer(
                _decoded(lambda: record_from_headers(resp.headers, body), peer), authoritative=not syncing
            )

    async def _write_aiohttp(self, peer: Peer, key: bytes, record: Record, headers: dict[str, str]) -> WriteAck:
        async with (
            self._call(peer, "write"),
            self._session.put(self._url(peer, key), data=record.value or b"", headers=headers, ssl=self._ssl()) as resp,
        ):
            _expect(resp.status, await resp.read(), peer, "write")
            self._heard(peer, resp.status, resp.headers)
            return _decoded(lambda: _ack_from_headers(resp.headers), peer)

    async def _post(
        self, peer: Peer, path: str, body: bytes, what: str, content_type: str = "application/octet-stream"
    ) -> bytes:
        url = URL(peer.url + path, encoded=True)
        headers = {"content-type": content_type} | self._token_headers
        async with (
            self._call(peer, what),
            self._session.post(url, data=body, headers=headers, timeout=self._bulk_timeout, ssl=self._ssl()) as resp,
        ):
            data = await resp.read()
            _expect(resp.status, data, peer, what)
            self._heard(peer, resp.status, resp.headers)
            return data

    async def write_batch(self, peer: Peer, records: list[tuple[bytes, Record]]) -> int:
        answer = await self._post(peer, BATCH_PATH, codec.encode_records(records), "batch write")
        return _decoded(lambda: int(orjson.loads(answer)["applied"]), peer)

    async def digests(self, peer: Peer, arcs: list[tuple[int, int]]) -> list[bytes]:
        answer = await self._post(peer, DIGESTS_PATH, codec.encode_arcs(arcs), "digests")
        return _decoded(lambda: codec.decode_digests(answer), peer)

    async def shared_digest(self, peer: Peer, *, asker: str, ring: str) -> bytes:
        body = orjson.dumps({"asker": asker, "ring": ring})
        answer = await self._post(peer, SHARED_DIGEST_PATH, body, "shared digest", "application/json")
        return _decoded(lambda: bytes.fromhex(orjson.loads(answer)["digest"]), peer)

    async def records_in_arcs(self, peer: Peer, arcs: list[tuple[int, int]]) -> list[tuple[bytes, Record]]:
        answer = await self._post(peer, RANGE_PATH, codec.encode_arcs(arcs), "range fetch")
        if len(answer) < DECODE_IN_THREAD_BYTES:
            return _decoded(lambda: codec.decode_records(answer), peer)
        # A rebalancing batch is megabytes: decoding it off the event loop keeps
        # client requests moving meanwhile (the codec releases no GIL, but the
        # interpreter switches threads every few ms instead of stalling the loop).
        try:
            return await asyncio.to_thread(codec.decode_records, answer)
        except (KeyError, ValueError, TypeError) as exc:
            raise _malformed(peer, exc) from exc

    async def syncing_arcs(self, peer: Peer) -> list[tuple[int, int]]:
        answer = await self._post(peer, SYNCING_PATH, b"", "syncing arcs")
        return _decoded(lambda: codec.decode_arcs(answer), peer)

    async def wall_clock(self, peer: Peer) -> int:
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        url = URL(peer.url + CLOCK_PATH, encoded=True)
        async with (
            self._call(peer, "clock"),
            self._session.get(url, headers=self._token_headers, timeout=timeout, ssl=self._ssl()) as resp,
        ):
            body = await resp.read()
            _expect(resp.status, body, peer, "clock probe")
            self._heard(peer, resp.status, resp.headers)
            return _decoded(lambda: int(orjson.loads(body)["wall_ms"]), peer)

    async def set_membership(self, peer: Peer, members: dict[str, str]) -> None:
        await self._post(peer, MEMBERSHIP_PATH, orjson.dumps({"peers": members}), "membership", "application/json")

    async def probe(self, peer: Peer) -> bool:
        try:
            timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
            async with self._session.get(
                URL(peer.url + "/health", encoded=True), headers=self._probe_headers, timeout=timeout, ssl=self._ssl()
            ) as resp:
                await resp.read()
                self._heard(peer, resp.status, resp.headers)
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            if _tls_failure(exc) is not None:
                raise _unreachable(peer, "probe", exc) from exc  # a PeerTLSError: the prober records why
            return False

    async def ring_view(self, peer: Peer, *, authorization: str | None) -> dict[str, object]:
        # The session's timeout, --peer-timeout: the console marks a peer down
        # when this gets no answer, so it must wait as long as a replica call would.
        headers = {"authorization": authorization} if authorization else {}
        async with (
            self._call(peer, "ring view"),
            self._session.get(URL(peer.url + RING_PATH, encoded=True), headers=headers, ssl=self._ssl()) as resp,
        ):
            body = await resp.read()
            _expect(resp.status, body, peer, "ring view")
            view = _decoded(lambda: orjson.loads(body), peer)
            if not isinstance(view, dict):
                raise _malformed(peer, TypeError(f"/ring answered a JSON {type(view).__name__}, not an object"))
            return view

    def forget(self, peer: Peer) -> None:
        pool = self._pools.pop(peer.url, None)
        self._reads.pop(peer.url, None)
        self._writes.pop(peer.url, None)
        if pool is not None:
            pool.close()  # idle connections now; busy ones when their call ends

    async def close(self) -> None:
        for pool in self._pools.values():
            if pool is not None:
                pool.close()
        await self._session.close()


def _write_size(item: Write) -> int:
    key, record, _ = item
    return len(key) + len(record.value or b"")


def _decoded(parse: Callable[[], T], peer: Peer) -> T:
    """parse() a peer's answer; a malformed one is the peer's error, not an outage."""
    try:
        return parse()
    except (KeyError, ValueError, TypeError) as exc:
        raise _malformed(peer, exc) from exc


def _malformed(peer: Peer, exc: Exception) -> PeerError:
    return PeerError(f"peer {peer} sent a malformed answer: {type(exc).__name__}: {exc}", peer=peer.node_id)


def _ack_from_headers(headers: Mapping[str, str]) -> WriteAck:
    newer = headers.get(NEWER_HEADER)
    return WriteAck(
        applied=headers.get(APPLIED_HEADER) == "1",
        existed=headers.get(EXISTED_HEADER) == "1",
        newer=Version.decode(newer) if newer else None,
    )


def _expect_count(answers: Sized, calls: Sized, peer: Peer) -> None:
    if len(answers) != len(calls):
        raise PeerError(f"peer {peer} answered {len(answers)} of {len(calls)} coalesced calls", peer=peer.node_id)


def _expect(status: int, body: bytes, peer: Peer, what: str) -> None:
    if status != 200:
        raise _answer_error(peer, status, body, what)


INSUFFICIENT_STORAGE = 507  # a replica whose map or volume is full: it still serves reads


def _answer_error(peer: Peer, status: int, body: bytes, what: str) -> PeerError:
    """The one translation of a peer's unexpected status: 503 says it cannot
    serve now (unavailable), 409, other 4xx and 507 (full) that it refused this call,
    anything else that it failed. The peer's own error message is kept."""
    try:
        reason = str(orjson.loads(body)["error"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        reason = body[:200].decode("utf-8", "replace") or "no reason given"
    message = f"peer {peer} answered {status} to a {what}: {reason}"
    if status == 503:
        return PeerUnavailableError(message, peer=peer.node_id)
    if 400 <= status < 500 or status == INSUFFICIENT_STORAGE:  # a full replica is up and refusing writes
        return PeerRefusedError(message, peer=peer.node_id)
    return PeerError(message, peer=peer.node_id)


def _unreachable(peer: Peer, what: str, exc: BaseException) -> PeerUnavailableError:
    """The one translation of a failure to get any answer (network, timeout,
    not HTTP); a failed TLS handshake says so, with OpenSSL's reason."""
    tls = _tls_failure(exc)
    if tls is not None:
        return PeerTLSError(f"peer {peer} refused over TLS ({what}): {_describe(tls)}", peer=peer.node_id)
    return PeerUnavailableError(f"peer {peer} unreachable ({what}): {_describe(exc)}", peer=peer.node_id)


def _tls_failure(exc: BaseException) -> BaseException | None:
    """The ssl.SSLError behind exc (aiohttp wraps it), or None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        if isinstance(seen, aiohttp.ClientConnectorCertificateError):
            return seen.certificate_error
        if isinstance(seen, aiohttp.ClientSSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
