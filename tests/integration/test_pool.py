"""The lean peer-client pool against a real loopback server that we script.

Integration, not unit: what is tested is how real sockets behave (an idle
connection the peer closed, an RST arriving before or after the loop hears of
it, a silent peer), so it needs the kernel's TCP and the loop's timing; the
short sleeps here let a close or a reset reach the client side."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from app.transport.pool import PeerPool
from tests.integration.scripted_server import ScriptedServer, ok


async def echo(request: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(ok(request.split(b"\r\n\r\n", 1)[1]))


def pool_for(server: ScriptedServer, *, limit: int = 8, timeout_s: float = 2.0) -> PeerPool:
    return PeerPool("127.0.0.1", server.port, host_header=f"node-2:{server.port}", limit=limit, timeout_s=timeout_s)


async def test_reuses_one_connection_for_sequential_requests() -> None:
    async with ScriptedServer(echo) as server:
        pool = pool_for(server)
        for i in range(20):
            status, headers, body = await pool.request(
                b"PUT", "/internal/v1/kv/k", headers=b"X-A: 1\r\n", body=b"v%d" % i
            )
            assert (status, body, headers["x-answer"]) == (200, b"v%d" % i, "yes")
        assert server.connections == 1
        assert server.heads[0].startswith(b"PUT /internal/v1/kv/k HTTP/1.1\r\n")
        assert f"Host: node-2:{server.port}".encode() in server.heads[0]
        assert b"X-A: 1" in server.heads[0]
        pool.close()


async def test_concurrency_is_bounded_by_the_limit() -> None:
    async def slow(request: bytes, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.02)
        writer.write(ok(b"x"))

    async with ScriptedServer(slow) as server:
        pool = pool_for(server, limit=3)
        answers = await asyncio.gather(*(pool.request(b"GET", "/x") for _ in range(30)))
        assert [a[0] for a in answers] == [200] * 30
        assert server.max_open <= 3
        pool.close()


async def test_a_connection_the_peer_closed_while_idle_is_replaced() -> None:
    async def answer_then_close(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(ok(b"x"))
        await writer.drain()
        writer.close()

    async with ScriptedServer(answer_then_close) as server:
        pool = pool_for(server)
        assert (await pool.request(b"GET", "/a"))[0] == 200
        await asyncio.sleep(0.05)  # the close reaches the idle connection
        assert (await pool.request(b"GET", "/b"))[0] == 200
        assert server.connections == 2


async def test_connection_close_header_is_honoured() -> None:
    async def close_header(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(ok(b"x", b"Connection: close\r\n"))

    async with ScriptedServer(close_header) as server:
        pool = pool_for(server)
        for _ in range(3):
            assert (await pool.request(b"GET", "/a"))[0] == 200
        assert server.connections == 3


async def test_chunked_answer_is_reassembled() -> None:
    async def chunked(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")

    async with ScriptedServer(chunked) as server:
        status, _, body = await pool_for(server).request(b"GET", "/a")
        assert (status, body) == (404, b"abcde")


async def test_a_silent_peer_times_out_and_its_connection_is_dropped() -> None:
    calls = 0

    async def silent_once(request: bytes, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            writer.write(ok(b"late but fine"))

    async with ScriptedServer(silent_once) as server:
        pool = pool_for(server, timeout_s=0.2)
        with pytest.raises(asyncio.TimeoutError):
            await pool.request(b"GET", "/a")
        status, _, body = await pool.request(b"GET", "/b")
        assert (status, body) == (200, b"late but fine")
        assert server.connections == 2  # the timed-out stream was not reused


async def test_a_cancelled_request_frees_its_slot_and_closes_its_stream() -> None:
    release = asyncio.Event()

    async def wait_for_release(request: bytes, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.write(ok(b"x"))

    async with ScriptedServer(wait_for_release) as server:
        pool = pool_for(server, limit=1)
        first = asyncio.create_task(pool.request(b"GET", "/a"))
        queued = asyncio.create_task(pool.request(b"GET", "/b"))
        await asyncio.sleep(0.05)
        first.cancel()
        release.set()
        assert (await asyncio.wait_for(queued, 2))[0] == 200
        assert server.connections == 2


async def test_a_refused_connection_raises_oserror() -> None:
    async with ScriptedServer(echo) as server:
        port = server.port
    await asyncio.sleep(0.01)
    pool = PeerPool("127.0.0.1", port, host_header="x", limit=2, timeout_s=1.0)
    with pytest.raises(OSError):
        await pool.request(b"GET", "/a")


async def test_forgetting_a_peer_closes_its_connections_and_a_later_call_reconnects() -> None:
    from app.transport.base import Peer
    from app.transport.http import HttpPeerClient

    async def not_found(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")

    async with ScriptedServer(not_found) as server:
        client = HttpPeerClient(timeout_s=2.0)
        peer = Peer("n2", f"http://127.0.0.1:{server.port}")
        try:
            assert (await client.read(peer, b"k")).record is None
            assert server.open_now == 1
            client.forget(peer)
            for _ in range(50):
                if server.open_now == 0:
                    break
                await asyncio.sleep(0.01)
            assert server.open_now == 0
            assert (await client.read(peer, b"k")).record is None
            assert server.connections == 2
        finally:
            await client.close()


# -- resets: the pool never hands out a dead connection ------------------------------


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST, as a crashed peer or a middlebox that drops the flow does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def on_uvloop(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """The nodes run uvloop, whose closed transports raise where asyncio's only log."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(test())


def test_a_connection_reset_while_idle_is_not_reused_and_the_request_succeeds() -> None:
    async def main() -> None:
        answered = 0

        async def answer_then_reset(request: bytes, writer: asyncio.StreamWriter) -> None:
            nonlocal answered
            answered += 1
            writer.write(ok(b"fine"))
            await writer.drain()
            reset(writer)

        async with ScriptedServer(answer_then_reset) as server:
            pool = pool_for(server)
            for _ in range(20):
                assert (await pool.request(b"GET", "/a"))[2] == b"fine"
                await asyncio.sleep(0.005 if answered % 2 else 0)  # sometimes the loop has seen the RST, sometimes not
            assert server.connections == 20

    on_uvloop(main)


def test_resets_under_load_fail_only_as_oserrors() -> None:
    async def main() -> None:
        seen = 0

        async def flaky(request: bytes, writer: asyncio.StreamWriter) -> None:
            nonlocal seen
            seen += 1
            if seen % 3 == 0:
                reset(writer)
                return
            writer.write(ok(b"fine"))

        async with ScriptedServer(flaky) as server:
            pool = pool_for(server, limit=16)

            async def one() -> str:
                try:
                    return (await pool.request(b"PUT", "/kv/k", body=b"v"))[2].decode()
                except OSError as exc:
                    return type(exc).__name__

            outcomes = await asyncio.gather(*(one() for _ in range(300)))
        # Fine answers, or OSErrors the caller turns into "peer unavailable";
        # never a RuntimeError from a closed transport (an HTTP 500 upstream).
        assert set(outcomes) <= {"fine", "ConnectionResetError", "BrokenPipeError", "ConnectionAbortedError"}
        assert outcomes.count("fine") > 150

    on_uvloop(main)


def test_a_reset_before_any_byte_of_the_answer_is_retried_once_on_a_fresh_connection() -> None:
    async def main() -> None:
        answered_once: set[asyncio.StreamWriter] = set()

        async def once_per_connection(request: bytes, writer: asyncio.StreamWriter) -> None:
            if writer in answered_once:
                reset(writer)  # the request arrived; no byte of an answer left
                return
            answered_once.add(writer)
            writer.write(ok(b"fine"))

        async with ScriptedServer(once_per_connection) as server:
            pool = pool_for(server)
            for _ in range(10):
                assert (await pool.request(b"PUT", "/kv/k", body=b"v"))[2] == b"fine"
            assert server.connections == 10  # every reuse was reset and retried on a new connection

    on_uvloop(main)


def test_a_reset_after_the_answer_began_is_not_retried() -> None:
    async def main() -> None:
        async def half_then_reset(request: bytes, writer: asyncio.StreamWriter) -> None:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhal")
            await writer.drain()
            await asyncio.sleep(0.01)
            reset(writer)

        async with ScriptedServer(half_then_reset) as server:
            pool = pool_for(server)
            with pytest.raises(ConnectionError):
                await pool.request(b"GET", "/a")
            assert server.connections == 1  # the peer had begun to answer: no second try

    on_uvloop(main)


def test_an_idle_connection_whose_transport_closed_before_the_pool_heard_is_not_used() -> None:
    """The window a reset leaves: the loop has closed the transport, and the
    connection_lost callback that would drop it from the idle list has not run."""

    async def main() -> None:
        async with ScriptedServer(echo) as server:
            pool = pool_for(server)
            assert (await pool.request(b"PUT", "/a", body=b"one"))[2] == b"one"
            idle = pool._idle[0]
            assert idle.transport is not None
            idle.transport.abort()  # closed at once (as on a reset); connection_lost is only scheduled
            assert (await pool.request(b"PUT", "/a", body=b"two"))[2] == b"two"
            assert server.connections == 2

    on_uvloop(main)


def test_a_fresh_connection_the_peer_closed_before_the_first_write_fails_as_an_oserror() -> None:
    """What a dropping proxy or a crashing peer does under load: the
    connection is accepted, then closed, and the loop has delivered
    connection_lost by the time the request is written."""

    async def main() -> None:
        async with ScriptedServer(echo) as server:
            pool = pool_for(server)
            connect = pool._connect

            async def connect_then_lose_it() -> Any:  # the pool's private connection type
                conn = await connect()
                assert conn.transport is not None
                conn.transport.abort()
                await asyncio.sleep(0)  # connection_lost runs: the transport is now closed for good
                return conn

            pool._connect = connect_then_lose_it
            with pytest.raises(ConnectionResetError, match="closed under the request"):
                await pool.request(b"PUT", "/kv/k", body=b"v")

    on_uvloop(main)


async def test_cycle_closes_idle_connections_now_and_busy_ones_after_their_request() -> None:
    """What a certificate rotation asks of the pool: no connection made before it is reused."""
    release = asyncio.Event()

    async def held(request: bytes, writer: asyncio.StreamWriter) -> None:
        if b"/slow" in request:
            await release.wait()
        writer.write(ok(b"x"))

    async with ScriptedServer(held) as server:
        pool = pool_for(server)
        await asyncio.gather(pool.request(b"GET", "/a"), pool.request(b"GET", "/b"))  # two idle connections
        busy = asyncio.ensure_future(pool.request(b"GET", "/slow"))  # takes one of them
        await asyncio.sleep(0.05)
        assert server.connections == 2
        pool.cycle()
        release.set()
        assert (await busy)[0] == 200  # the call in flight finishes on its old connection
        for _ in range(3):
            assert (await pool.request(b"GET", "/c"))[0] == 200
        assert server.connections == 3, "both old connections retired, one new one reused"
        pool.close()
