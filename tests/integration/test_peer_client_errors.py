"""How the HTTP peer client classifies a peer's answers: only no answer at
all, a timeout, or the peer's own 503 make it unavailable (and so marked
down); a refusal or a garbled answer comes from a peer that is up.
Integration, not unit: the real client over real loopback sockets, against
a scripted server (scripted_server.py) giving answers no node would give."""

from __future__ import annotations

import asyncio

import pytest

from app.clock import Version
from app.errors import PeerError, PeerRefusedError, PeerUnavailableError
from app.storage.base import Record
from app.transport.base import Peer
from app.transport.http import HttpPeerClient
from tests.integration.scripted_server import ScriptedServer, ok

RECORD = Record(Version(1 << 16, "n1"), b"v")


def answering(status_line: bytes, body: bytes) -> ScriptedServer:
    async def handler(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status_line, len(body), body))

    return ScriptedServer(handler)


@pytest.mark.parametrize(
    ("status_line", "body", "error", "says"),
    [
        (b"409 Conflict", b'{"error": "clock: version 1.n1 is 30000 ms ahead"}', PeerRefusedError, "30000 ms ahead"),
        (b"403 Forbidden", b'{"error": "wrong cluster token"}', PeerRefusedError, "wrong cluster token"),
        (b"503 Service Unavailable", b'{"error": "node is starting"}', PeerUnavailableError, "node is starting"),
        (b"507 Insufficient Storage", b'{"error": "storage: the LMDB map ... is full"}', PeerRefusedError, "is full"),
        (b"500 Internal Server Error", b"oops", PeerError, "oops"),
    ],
)
async def test_a_status_becomes_the_error_kind_it_means(
    status_line: bytes, body: bytes, error: type, says: str
) -> None:
    async with answering(status_line, body) as server:
        client = HttpPeerClient(timeout_s=2.0)
        peer = Peer("n2", f"http://127.0.0.1:{server.port}")
        try:
            for call in (
                client.write(peer, b"k", RECORD),
                client.read(peer, b"k"),
                client.write_batch(peer, [(b"k", RECORD)]),
            ):
                with pytest.raises(PeerError, match=says) as caught:
                    await call
                assert type(caught.value) is error
        finally:
            await client.close()


async def test_a_malformed_answer_is_the_peer_s_error_not_an_outage() -> None:
    async def garbled(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(ok(b"\xff\x07", b"X-Kvstore-Version: not-a-version\r\n"))

    async with ScriptedServer(garbled) as server:
        client = HttpPeerClient(timeout_s=2.0)
        peer = Peer("n2", f"http://127.0.0.1:{server.port}")
        try:
            with pytest.raises(PeerError, match="malformed answer") as caught:
                await client.read(peer, b"k")
            assert not isinstance(caught.value, PeerUnavailableError)
            with pytest.raises(PeerError, match="malformed answer") as caught:
                await client.digests(peer, [(0, 1)])
            assert not isinstance(caught.value, PeerUnavailableError)
        finally:
            await client.close()


async def test_no_answer_at_all_is_unavailable() -> None:
    async with ScriptedServer(answering(b"200 OK", b"").handler) as server:
        port = server.port  # closed on leaving: nothing listens there any more
    client = HttpPeerClient(timeout_s=1.0)
    peer = Peer("n2", f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(PeerUnavailableError, match="unreachable"):
            await client.write(peer, b"k", RECORD)
        with pytest.raises(PeerUnavailableError, match="unreachable"):
            await client.wall_clock(peer)
    finally:
        await client.close()


async def test_a_ring_view_forwards_the_callers_credentials_and_nothing_of_the_node() -> None:
    """The console asks each peer's public /ring as the user who asked it:
    their Authorization header, never the cluster token; a refusal or a
    non-object answer is the peer's error, not an outage."""
    seen: list[bytes] = []
    answers = iter([b'{"node_id": "n2", "members": []}', b"[1, 2]"])

    async def handler(request: bytes, writer: asyncio.StreamWriter) -> None:
        seen.append(request)
        writer.write(ok(next(answers)))

    async with ScriptedServer(handler) as server:
        client = HttpPeerClient(timeout_s=2.0, token="cluster-secret", self_id="n1")
        peer = Peer("n2", f"http://127.0.0.1:{server.port}")
        try:
            assert await client.ring_view(peer, authorization="Bearer user-token") == {"node_id": "n2", "members": []}
            head = seen[0].lower()
            assert head.startswith(b"get /ring ") and b"authorization: bearer user-token" in head
            assert b"cluster-secret" not in head and b"x-kvstore-from" not in head
            with pytest.raises(PeerError, match="malformed answer") as caught:
                await client.ring_view(peer, authorization=None)
            assert not isinstance(caught.value, PeerUnavailableError)
            assert b"authorization" not in seen[1].lower()
        finally:
            await client.close()

    async with answering(b"401 Unauthorized", b'{"error": "auth: unknown token"}') as server:
        client = HttpPeerClient(timeout_s=2.0)
        try:
            with pytest.raises(PeerRefusedError, match="unknown token"):
                await client.ring_view(Peer("n2", f"http://127.0.0.1:{server.port}"), authorization="Bearer x")
        finally:
            await client.close()
