"""The lean peer-client pool against a real loopback server that we script."""

from __future__ import annotations

import asyncio

import pytest

from app.transport.wire import PeerPool
from tests.unit.scripted_server import ScriptedServer, ok

async def echo(request: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(ok(request.split(b"\r\n\r\n", 1)[1]))


def pool_for(server: ScriptedServer, *, limit: int = 8, timeout_s: float = 2.0) -> PeerPool:
    return PeerPool("127.0.0.1", server.port, host_header=f"node-2:{server.port}", limit=limit, timeout_s=timeout_s)


async def test_reuses_one_connection_for_sequential_requests() -> None:
    async with ScriptedServer(echo) as server:
        pool = pool_for(server)
        for i in range(20):
            status, headers, body = await pool.request(b"PUT", "/internal/v1/kv/k", headers=b"X-A: 1\r\n", body=b"v%d" % i)
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
