"""A minimal keep-alive HTTP/1.1 client for node-to-node calls: one pool per peer.

The peer hot path (every forwarded read, every replica write) needs a client
that costs little CPU per request; aiohttp's ClientSession measured ~120 us
per request here, this ~30 us (bench/peer_clients.py). It speaks only what
our own internal routes need: HTTP/1.1, plain or over TLS, one request in flight per
connection, a Content-Length or chunked response parsed by httptools, a
timeout per call. Used by app.transport.http, which translates its errors;
nothing else imports it.

It never hands out a dead connection: one whose transport is closing (a reset
the event loop has seen) is dropped before reuse, a write on a transport that
closed under us is a ConnectionResetError like any other, and a request that
fails on a reused connection before any byte of its answer arrived is sent
once more on a fresh one (every internal call is idempotent under versions).
Every failure leaves as an OSError (ConnectionError, TimeoutError, ssl.SSLError)
or an HttpParserError, which the caller translates.

Over TLS, every new connection takes the newest client context (`ssl_context()`,
app.transport.tls), verifying the peer's certificate against the URL's host
name. `cycle()` retires the connections made before a certificate rotation:
idle ones are closed at once, busy ones when their request ends, so none
outlives a rotation by more than one request (at most the call timeout).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from typing import cast

import httptools

Response = tuple[int, dict[str, str], bytes]


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self, pool: PeerPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Response] | None = None
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.alive = True
        self.answered = False  # a byte of the current request's answer arrived
        self.epoch = pool.epoch  # the pool's certificate generation when this connection was made

    @property
    def usable(self) -> bool:
        return self.alive and self.transport is not None and not self.transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream connection's transport is a Transport

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:
            # Bytes nobody asked for (a late answer after a timeout): the
            # stream's framing can no longer be trusted.
            self.fail(ConnectionResetError("unexpected data from the peer"))
            return
        self.answered = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(exc or ConnectionResetError("connection closed by the peer"))

    def fail(self, exc: BaseException) -> None:
        """Close for good, failing the request in flight with exc."""
        self.alive = False
        self.pool.forget(self)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.headers, self.body = {}, []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if not self.parser.should_keep_alive():
            self.alive = False
        if self.waiter is not None and not self.waiter.done():
            body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
            self.waiter.set_result((self.parser.get_status_code(), self.headers, body))


class PeerPool:
    """Keep-alive connections to one host:port, at most `limit` at a time.

    host is the address to connect to (already resolved, e.g. by --resolve);
    host_header what the Host header says (the peer's URL authority).
    With ssl_context, connections speak TLS, verifying server_hostname
    (the URL's host name); on_connect() is called for every new connection.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        host_header: str,
        limit: int,
        timeout_s: float,
        ssl_context: Callable[[], ssl.SSLContext] | None = None,
        server_hostname: str | None = None,
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.host_header = host_header.encode()
        self.limit = limit
        self.timeout_s = timeout_s
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.on_connect = on_connect
        self.epoch = 0  # bumped by cycle(): connections of an older epoch are not reused
        self._idle: list[_Connection] = []
        self._busy = 0
        self._queue: deque[asyncio.Future[None]] = deque()
        self._closed = False

    def forget(self, conn: _Connection) -> None:
        if conn in self._idle:
            self._idle.remove(conn)

    async def request(self, method: bytes, path: str, *, headers: bytes = b"", body: bytes = b"") -> Response:
        """headers: preformatted b"name: value\\r\\n" lines. Retries once on a
        reused connection the peer had already closed: our internal calls are
        idempotent (a read, or a versioned write that applies at most once)."""
        if self._busy >= self.limit:
            await self._wait_for_slot()
        self._busy += 1
        try:
            head = b"%s %s HTTP/1.1\r\nHost: %s\r\n%sContent-Length: %d\r\n\r\n" % (
                method,
                path.encode("ascii"),
                self.host_header,
                headers,
                len(body),
            )
            conn = self._reusable()
            if conn is not None:
                try:
                    return await self._send(conn, head, body)
                except ConnectionError:
                    if conn.answered:
                        raise  # the peer had started answering: the failure is its, not a stale socket's
            conn = await self._connect()
            return await self._send(conn, head, body)
        finally:
            self._busy -= 1
            self._wake_one()

    def _reusable(self) -> _Connection | None:
        """An idle connection still open, or None; dead ones are dropped on the way."""
        while self._idle:
            conn = self._idle.pop()
            if conn.usable:
                return conn
            conn.fail(ConnectionResetError("connection closed while idle"))
        return None

    async def _wait_for_slot(self) -> None:
        while self._busy >= self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self._queue.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # we were handed a slot we will not use: pass it on
                raise

    def _wake_one(self) -> None:
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _connect(self) -> _Connection:
        if self._closed:
            raise ConnectionResetError("peer pool closed")
        loop = asyncio.get_running_loop()
        if self.on_connect is not None:
            self.on_connect()
        if self.ssl_context is None:
            connecting = loop.create_connection(lambda: _Connection(self), self.host, self.port)
        else:
            connecting = loop.create_connection(
                lambda: _Connection(self),
                self.host,
                self.port,
                ssl=self.ssl_context(),
                server_hostname=self.server_hostname or self.host,
            )
        _, conn = await asyncio.wait_for(connecting, self.timeout_s)
        return conn

    async def _send(self, conn: _Connection, head: bytes, body: bytes) -> Response:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Response] = loop.create_future()
        conn.waiter = waiter
        conn.answered = False
        assert conn.transport is not None
        try:
            if body:
                conn.transport.writelines((head, body))
            else:
                conn.transport.write(head)
        except RuntimeError as exc:  # uvloop: "unable to perform operation on <TCPTransport closed=True>"
            conn.waiter = None
            conn.fail(ConnectionResetError(f"connection closed under the request: {exc}"))
            raise ConnectionResetError(f"connection closed under the request: {exc}") from exc
        timer = loop.call_later(self.timeout_s, conn.fail, TimeoutError())
        try:
            response = await waiter
        except BaseException:
            conn.fail(ConnectionResetError("request abandoned"))  # cancelled or failed: the stream is unusable
            raise
        finally:
            timer.cancel()
            conn.waiter = None
        if conn.alive and not self._closed and conn.epoch == self.epoch:
            self._idle.append(conn)
        else:
            conn.fail(ConnectionResetError("connection not kept alive"))
        return response

    def cycle(self) -> None:
        """After a certificate rotation: close the idle connections now; busy
        ones are closed when their request ends (they are of an older epoch)."""
        self.epoch += 1
        for conn in list(self._idle):
            conn.fail(ConnectionResetError("connection cycled after a certificate rotation"))
        self._idle.clear()

    def close(self) -> None:
        self._closed = True
        for conn in list(self._idle):
            conn.fail(ConnectionResetError("peer pool closed"))
        self._idle.clear()
