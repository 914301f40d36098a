"""In-test TCP proxies for network partitions between real node processes.

A Proxy listens on a free loopback port and forwards every connection to one
target. `cut()` partitions it, `heal()` restores it. A ProxyMesh puts one proxy
on every ordered pair of nodes, so node i reaches node j only through P[i, j]:
`partition("node3")` cuts node3 off from everyone (both directions) while the
clients, which talk to the nodes directly, still reach every node.

All proxies run on one asyncio loop in a background thread; their methods are
called from the test's thread. `close()` (the fixtures call it) stops
everything. Imports nothing from app.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

CutMode = Literal["blackhole", "reset"]
CALL_TIMEOUT_S = 10.0  # a proxy operation is local and quick; longer means the loop is stuck
CHUNK = 64 * 1024

T = TypeVar("T")


class ProxyLoop:
    """One asyncio event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-proxy-loop", daemon=True)
        self._thread.start()

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

        with contextlib.suppress(Exception):
            self.call(cancel_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(CALL_TIMEOUT_S)
        self.loop.close()


class _Connection:
    """One client connection and (while healthy) its upstream twin."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.frozen = False  # blackholed: bytes are read and dropped, nothing forwarded
        self.tasks: list[asyncio.Task[None]] = []

    def close(self, *, reset: bool = False) -> None:
        for writer in (self.client, self.upstream):
            if writer is None:
                continue
            if reset:
                _set_linger_zero(writer)  # close() then sends RST, not FIN
            writer.close()
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()


class Proxy:
    """Forwards 127.0.0.1:<port> to target_url's host:port until cut.

    cut(mode="blackhole"): a silent partition, like dropped packets. Open
    connections go quiet (bytes in either direction are read and dropped) and
    new connections are accepted and then ignored; the peer on the other side
    only finds out by timing out. cut(mode="reset"): open connections are
    reset and new ones are reset on arrival, like a refused connection.
    heal(): new connections are forwarded again; connections held during the
    cut are closed (their requests were lost in the partition).
    """

    def __init__(self, *, loop: ProxyLoop, target_url: str) -> None:
        parts = urlsplit(target_url)
        assert parts.hostname and parts.port, target_url
        self._loop = loop
        self.target = (parts.hostname, parts.port)
        self.mode: CutMode | None = None  # None: healthy
        self.connections_total = 0  # connections accepted since start, for "traffic really goes through me"
        self._open: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self.port = loop.call(self._start())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    def cut(self, mode: CutMode = "blackhole") -> None:
        self._loop.call(self._cut(mode))

    def heal(self) -> None:
        self._loop.call(self._heal())

    def close(self) -> None:
        if self._server is not None:
            self._loop.call(self._close())

    async def _cut(self, mode: CutMode) -> None:
        self.mode = mode
        for conn in list(self._open):
            if mode == "reset":
                self._drop(conn, reset=True)
            else:
                conn.frozen = True

    async def _heal(self) -> None:
        self.mode = None
        for conn in list(self._open):
            if conn.frozen or conn.upstream is None:
                self._drop(conn, reset=True)

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        for conn in list(self._open):
            self._drop(conn, reset=True)
        await self._server.wait_closed()
        self._server = None

    def _drop(self, conn: _Connection, *, reset: bool = False) -> None:
        self._open.discard(conn)
        conn.close(reset=reset)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_total += 1
        conn = _Connection(writer)
        self._open.add(conn)
        try:
            if self.mode == "reset":
                return self._drop(conn, reset=True)
            if self.mode == "blackhole":
                conn.frozen = True
                return await self._pump(reader, None, conn)
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                return self._drop(conn, reset=True)  # target down: the caller sees a refused connection
            if conn not in self._open:  # cut (reset) or closed while we were connecting
                up_writer.close()
                return None
            conn.upstream = up_writer
            back = asyncio.create_task(self._pump(up_reader, writer, conn))
            conn.tasks.append(back)
            await self._pump(reader, up_writer, conn)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._drop(conn)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter | None, conn: _Connection) -> None:
        """Copy src to dst until EOF; a frozen connection reads and drops."""
        try:
            while data := await src.read(CHUNK):
                if conn.frozen or dst is None:
                    continue
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            if not conn.frozen:  # a frozen connection stays open until heal() or close()
                self._drop(conn)


def _set_linger_zero(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


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
            with contextlib.suppress(Exception):
                proxy.close()
        self._loop.close()
