"""The client library against scripted servers (real loopback sockets,
answers no node would give on cue): a connection whose answer came too late
is never reused, so the next call gets its own answer (riak-python-client
#425, "ask for key X, get value of Y"); each status is its typed error with
the server's message; connection errors and 503 fail over to the next node;
anything else does not. Both clients, sync and asyncio.
Integration, not unit: real sockets, and a server that answers late on purpose."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from kvstore_client import (
    AsyncClient,
    BadRequest,
    Client,
    Forbidden,
    KvstoreError,
    StorageFull,
    Unauthorized,
    Unavailable,
)
from tests.integration.scripted_server import ScriptedServer

LATE_S = 0.6  # the slow key's answer comes this late...
TIMEOUT_S = 0.3  # ...after the client gave up on it
REASONS = {200: b"OK", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found", 409: b"Conflict",
           413: b"Payload Too Large", 500: b"Internal Server Error", 503: b"Service Unavailable",
           507: b"Insufficient Storage"}  # fmt: skip


def answer(status: int, body: bytes) -> bytes:
    return b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\n\r\n%s" % (status, REASONS[status], len(body), body)


def key_of(request: bytes) -> str:
    return request.split(b" ", 2)[1].split(b"?")[0].decode().removeprefix("/kv/")


async def echo_key(request: bytes, writer: asyncio.StreamWriter) -> None:
    """Answers each GET /kv/KEY with KEY; the key `slow` only after LATE_S."""
    key = key_of(request)
    if key == "slow":
        await asyncio.sleep(LATE_S)
    writer.write(answer(200, key.encode()))
    await writer.drain()


async def by_status(request: bytes, writer: asyncio.StreamWriter) -> None:
    """GET /kv/sNNN answers status NNN with an error body naming it."""
    status = int(key_of(request)[1:])
    writer.write(answer(status, b'{"error": "scripted %d"}' % status))


def sync_get(kv: Client) -> Callable[[str], Awaitable[bytes | None]]:
    return lambda key: asyncio.to_thread(kv.get, key)


async def test_a_timed_out_connection_is_not_reused_sync() -> None:
    async with ScriptedServer(echo_key) as server:
        with Client(f"http://127.0.0.1:{server.port}", ring_aware=False, timeout=TIMEOUT_S) as kv:
            await late_then_own_answers(server, sync_get(kv))


async def test_a_timed_out_connection_is_not_reused_async() -> None:
    async with (
        ScriptedServer(echo_key) as server,
        AsyncClient(f"http://127.0.0.1:{server.port}", ring_aware=False, timeout=TIMEOUT_S) as kv,
    ):
        await late_then_own_answers(server, kv.get)


async def late_then_own_answers(server: ScriptedServer, get: Callable[[str], Awaitable[bytes | None]]) -> None:
    assert await get("warm") == b"warm"  # a pooled connection exists
    with pytest.raises(Unavailable, match="cannot reach"):
        await get("slow")
    connections = server.connections
    # The late answer to `slow` arrives while these run: none may read it.
    started = time.monotonic()
    while time.monotonic() - started < LATE_S + 0.3:
        for key in ("alpha", "bravo"):
            assert await get(key) == key.encode()
    assert server.connections > connections, "the connection the slow call timed out on was reused"


@pytest.mark.parametrize(
    ("status", "error"),
    [(401, Unauthorized), (403, Forbidden), (409, BadRequest), (413, BadRequest), (500, KvstoreError),
     (503, Unavailable), (507, StorageFull)],
)  # fmt: skip
async def test_each_status_raises_its_type_with_the_server_s_message(status: int, error: type[KvstoreError]) -> None:
    async with ScriptedServer(by_status) as server:
        url = f"http://127.0.0.1:{server.port}"
        with Client(url, ring_aware=False, timeout=TIMEOUT_S) as kv:
            with pytest.raises(error) as caught:
                await asyncio.to_thread(kv.get, f"s{status}")
            assert type(caught.value) is error
            assert (caught.value.message, caught.value.status, caught.value.node) == (f"scripted {status}", status, url)
        async with AsyncClient(url, ring_aware=False, timeout=TIMEOUT_S) as akv:
            with pytest.raises(error, match=f"scripted {status}"):
                await akv.get(f"s{status}")
        assert await asyncio.to_thread(absent, url) is None


def absent(url: str) -> bytes | None:
    with Client(url, ring_aware=False) as kv:
        return kv.get("s404")


def closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_connection_errors_and_503_fail_over_to_the_next_node_4xx_does_not() -> None:
    seen: list[str] = []

    def named(name: str, status: int) -> Any:
        async def handler(request: bytes, writer: asyncio.StreamWriter) -> None:
            seen.append(name)
            writer.write(answer(status, b'{"error": "from %s"}' % name.encode()))

        return handler

    async with (
        ScriptedServer(named("busy", 503)) as busy,
        ScriptedServer(named("good", 200)) as good,
        ScriptedServer(named("refusing", 403)) as refusing,
    ):
        dead = closed_port()
        busy_url, good_url = f"http://127.0.0.1:{busy.port}", f"http://127.0.0.1:{good.port}"
        async with AsyncClient([dead, busy_url, good_url], ring_aware=False, timeout=2.0) as kv:
            for _ in range(5):
                kv.router.suspect_until.clear()
                kv.router.outstanding.update({dead: 0, busy_url: 1, good_url: 2})  # this order
                assert await kv.get("k") == b'{"error": "from good"}'
        assert seen.count("busy") == 5 and seen.count("good") == 5
        async with AsyncClient([f"http://127.0.0.1:{refusing.port}", good_url], ring_aware=False) as kv:
            kv.router.outstanding[good_url] = 1  # the refusing node first
            with pytest.raises(Forbidden):
                await kv.get("k")
        assert seen.count("good") == 5, "a 403 was retried elsewhere"


async def test_when_every_node_fails_the_caller_gets_unavailable_within_its_timeout() -> None:
    async with ScriptedServer(by_status) as server:
        urls = [closed_port(), f"http://127.0.0.1:{server.port}"]
        async with AsyncClient(urls, ring_aware=False) as kv:
            started = time.monotonic()
            with pytest.raises(Unavailable, match="scripted 503"):
                await kv.get("s503", timeout=0.5)
            assert time.monotonic() - started < 2.0  # its 0.5 s, and room for a loaded machine's scheduling
        with Client(urls, ring_aware=False) as skv, pytest.raises(Unavailable):
            await asyncio.to_thread(skv.get, "s503", timeout=0.5)
