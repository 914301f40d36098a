"""TCP proxies between real node processes: partitions for the fault tests,
added latency for the benches.

A Proxy listens on a free loopback port and forwards every connection to one
target. `cut()` partitions it, `heal()` restores it, and `delay` (seconds,
settable at any time) holds every chunk sent towards the target that long,
in order: latency grows without capping throughput; answers flow back at
once. A ProxyMesh puts one proxy on every ordered pair of nodes, so node i
reaches node j only through P[i, j]: `partition("node3")` cuts node3 off from
everyone (both directions) while clients, talking to the nodes directly,
still reach every node.

Cheap by construction, because bench/lib/cluster_slow.py measures a node behind
one and must not measure the proxy: protocol callbacks (no stream tasks), one
timer per connection, on its own event loop (uvloop when installed) in a
daemon thread of the caller's process, so a bench's proxy runs on the load
core, not the servers'. The loop's thread does all the work; methods are
called from the caller's thread, and `close()` (the fixtures call it) stops
everything. Used by tests/integration (the proxy_mesh fixture) and
bench/lib/cluster_slow.py. Imports nothing from app.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar, cast
from urllib.parse import urlsplit

CutMode = Literal["blackhole", "reset"]
CALL_TIMEOUT_S = 10.0  # a proxy operation is local and quick; longer means the loop is stuck
# What closing a proxy can raise at teardown: a socket that will not close
# (OSError), a loop already stopped (RuntimeError), a loop stuck past
# CALL_TIMEOUT_S (TimeoutError). Teardown goes on past them, so one proxy that
# fails to close leaves no other proxy, nor the loop's thread, running.
TEARDOWN_ERRORS = (OSError, RuntimeError, TimeoutError)
HOST = "127.0.0.1"

T = TypeVar("T")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # the nodes' own loop (uvicorn[standard]): a few microseconds less per chunk
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class ProxyLoop:
    """One event loop running in a daemon thread; close() closes its proxies too."""

    def __init__(self) -> None:
        self.loop = _new_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="harness-proxy-loop", daemon=True)
        self._thread.start()
        self.proxies: list[Proxy] = []  # closed by close(): an event loop with a server still open cannot close

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(CALL_TIMEOUT_S)

    def close(self) -> None:
        if self.loop.is_closed():
            return

        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        for proxy in self.proxies:
            with contextlib.suppress(*TEARDOWN_ERRORS):  # the rest still close, and the loop stops
                proxy.close()
        with contextlib.suppress(*TEARDOWN_ERRORS):  # cancel_rest raises nothing itself (return_exceptions)
            self.call(cancel_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(CALL_TIMEOUT_S)
        self.loop.close()


class _Upstream(asyncio.Protocol):
    """The proxy's connection to the target: its bytes go straight back to the client."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn

    def data_received(self, data: bytes) -> None:
        if not self.conn.frozen:
            self.conn.transport.write(data)

    def pause_writing(self) -> None:  # the target reads slower than the client sends
        self.conn.transport.pause_reading()

    def resume_writing(self) -> None:
        self.conn.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.lost()


class _Connection(asyncio.Protocol):
    """A client's connection to the proxy and (once connected, while healthy)
    its upstream twin. Every chunk towards the target is queued with its due
    time (arrival + delay) and written, in order, when due."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.loop = proxy.loop.loop
        self.transport: asyncio.Transport  # set by connection_made, before any other callback
        self.upstream: asyncio.Transport | None = None
        self.queue: deque[tuple[float, bytes]] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self.frozen = False  # blackholed: bytes in either direction are read and dropped
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a TCP server's transports are Transports
        self.proxy.connections_total += 1
        self.proxy.open.add(self)
        if self.proxy.mode == "reset":
            self.close(reset=True)
        elif self.proxy.mode == "blackhole":
            self.frozen = True
        else:
            self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        try:
            upstream, _ = await self.loop.create_connection(lambda: _Upstream(self), *self.proxy.target)
        except OSError:
            self.close(reset=True)  # target down: the caller sees a refused connection
            return
        if self.closed:  # cut (reset) or closed while connecting
            upstream.close()
            return
        self.upstream = upstream
        self._flush()

    def data_received(self, data: bytes) -> None:
        if self.frozen:
            return
        delay = self.proxy.delay
        if delay <= 0 and not self.queue and self.upstream is not None:
            self.upstream.write(data)
            return
        # time.monotonic(), not loop.time(): uvloop's is libuv's cached
        # millisecond clock, which let a chunk through up to 1 ms early (CI
        # measured a 0.2 s delay as 0.1997 s).
        self.queue.append((time.monotonic() + delay, data))
        if self.timer is None and self.upstream is not None:
            self._arm()

    def _arm(self) -> None:
        self.timer = self.loop.call_later(max(0.0, self.queue[0][0] - time.monotonic()), self._flush)

    def _flush(self) -> None:
        self.timer = None
        if self.upstream is None or self.frozen:
            return
        now = time.monotonic()
        while self.queue and self.queue[0][0] <= now:
            self.upstream.write(self.queue.popleft()[1])
        if self.queue:
            self._arm()  # a timer that fired early (millisecond granularity) waits the rest

    def pause_writing(self) -> None:  # the client reads slower than the target answers
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    def freeze(self) -> None:
        self.frozen = True
        self.queue.clear()  # bytes in flight are lost in the partition
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost()

    def lost(self) -> None:
        """One side went away: close the other, unless frozen (a partition
        passes nothing, not even a close; heal() or close() ends it)."""
        if not self.frozen:
            self.close()

    def close(self, *, reset: bool = False) -> None:
        self.closed = True
        self.proxy.open.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for transport in (self.transport, self.upstream):
            if transport is None or transport.is_closing():
                continue
            if reset:
                _set_linger_zero(transport)  # the close then sends RST, not FIN
                transport.abort()
            else:
                transport.close()


def _set_linger_zero(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class Proxy:
    """Forwards 127.0.0.1:<port> to target_url's host:port, `delay` seconds late, until cut.

    cut(mode="blackhole"): a silent partition, like dropped packets. Open
    connections go quiet (bytes in either direction are read and dropped) and
    new connections are accepted and then ignored; the peer on the other side
    only finds out by timing out. cut(mode="reset"): open connections are
    reset and new ones are reset on arrival, like a refused connection.
    heal(): new connections are forwarded again; connections held during the
    cut are closed (their requests were lost in the partition).
    """

    def __init__(self, *, loop: ProxyLoop, target_url: str, delay: float = 0.0) -> None:
        parts = urlsplit(target_url)
        assert parts.hostname and parts.port, target_url
        self.loop = loop
        self.target = (parts.hostname, parts.port)
        self.delay = delay  # read on the loop's thread at every chunk; a float assignment is atomic
        self.mode: CutMode | None = None  # None: healthy
        self.connections_total = 0  # connections accepted since start, for "traffic really goes through me"
        self.open: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        self.port = loop.call(self._start())
        loop.proxies.append(self)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def _start(self) -> int:
        self._server = await self.loop.loop.create_server(lambda: _Connection(self), HOST, 0)
        return int(self._server.sockets[0].getsockname()[1])

    def cut(self, mode: CutMode = "blackhole") -> None:
        self.loop.call(self._cut(mode))

    def heal(self) -> None:
        self.loop.call(self._heal())

    def close(self) -> None:
        if self._server is not None:
            self.loop.call(self._close())

    async def _cut(self, mode: CutMode) -> None:
        self.mode = mode
        for conn in list(self.open):
            if mode == "reset":
                conn.close(reset=True)
            else:
                conn.freeze()

    async def _heal(self) -> None:
        self.mode = None
        for conn in list(self.open):
            if conn.frozen or conn.upstream is None:
                conn.close(reset=True)

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        for conn in list(self.open):
            conn.close(reset=True)
        await self._server.wait_closed()
        self._server = None


class ProxyMesh:
    """A proxy for every ordered pair of nodes: node i's peer URL for node j is
    P[i, j], which forwards to node j. Pass `route` as a Cluster's `peers_for`.
    """

    def __init__(self) -> None:
        self._loop = ProxyLoop()
        self.proxies: dict[tuple[str, str], Proxy] = {}

    def route(self, node_id: str, direct: dict[str, str]) -> dict[str, str]:
        """Node node_id's peer list: itself directly, every other node through its proxy."""
        peers = {}
        for other, url in direct.items():
            if other == node_id:
                peers[other] = url
                continue
            if (node_id, other) not in self.proxies:
                self.proxies[node_id, other] = Proxy(loop=self._loop, target_url=url)
            peers[other] = self.proxies[node_id, other].url
        return peers

    def partition(self, isolated: str, *, mode: CutMode = "blackhole") -> None:
        """Cut `isolated` off from every other node, in both directions."""
        for (src, dst), proxy in self.proxies.items():
            if isolated in (src, dst):
                proxy.cut(mode)

    def heal(self) -> None:
        for proxy in self.proxies.values():
            proxy.heal()

    def connections(self, src: str, dst: str) -> int:
        return self.proxies[src, dst].connections_total

    def close(self) -> None:
        for proxy in self.proxies.values():
            with contextlib.suppress(*TEARDOWN_ERRORS):  # the rest still close, and the loop stops
                proxy.close()
        self._loop.close()
