"""A small ASGI toolkit for the routes the data plane answers without
FastAPI: the ASGI types, a finished answer (Reply), reading a bounded body,
error answers, the method check and the cluster-token check.

Used by app.web.dataplane and the raw routes (routes_data, routes_peer);
errors become answers through app.web.errors alone.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from app.errors import (
    KvstoreError,
    MethodNotAllowedError,
    PeerCertificateRequiredError,
    TokenMissingError,
    TokenWrongError,
    ValueTooLargeError,
)
from app.transport.base import TOKEN_HEADER
from app.web.errors import error_body, headers_for, status_for

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON = b"application/json"
OCTETS = b"application/octet-stream"
TEXT = b"text/plain; charset=utf-8"
TOKEN_HEADER_BYTES = TOKEN_HEADER.encode()
# On every answer to a client: the ring's version (Topology.client_epoch), so a
# ring-aware client notices a membership change on its next call (GET /ring/tokens).
EPOCH_HEADER = b"x-kvstore-epoch"


class Disconnected(Exception):  # noqa: N818 - an event, not a failure: the client went away
    """The client went away before sending its whole body."""


class Reply:
    """A finished answer: status, body, content type, extra headers."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        content_type: bytes = JSON,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers

    async def send(self, send: Send, *, head: bool = False, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        """extra: headers added to this answer only (the data plane's protocol header on internal routes)."""
        headers = [(b"content-type", self.content_type), (b"content-length", str(len(self.body)).encode())]
        if self.headers:
            headers.extend(self.headers)
        if extra:
            headers.extend(extra)
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else self.body})


def json_error(status: int, message: str, **extra: object) -> Reply:
    """An error answer that is no exception: a key not found, say."""
    return Reply(status, error_body(message, **extra))


def reply_for(exc: KvstoreError) -> Reply:
    status = status_for(exc)
    headers = [(name.encode(), value.encode()) for name, value in headers_for(exc, status).items()]
    return Reply(status, error_body(str(exc)), headers=headers or None)


def allow(method: str, path: str, allowed: tuple[str, ...]) -> None:
    """MethodNotAllowedError unless the route takes the method."""
    if method not in allowed:
        raise MethodNotAllowedError(
            f"method {method} is not allowed on {path}; use {' or '.join(allowed)}", allowed=allowed
        )


def header(scope: Scope, name: bytes) -> bytes | None:
    """A request header's value (names are lower-case in ASGI), or None."""
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]  # ASGI header values are bytes
    return None


def check_token(scope: Scope, token: bytes | None) -> None:
    """Internal and admin routes need the cluster token when one is set."""
    verify_cluster_token(header(scope, TOKEN_HEADER_BYTES), token)


def verify_cluster_token(sent: bytes | None, token: bytes | None) -> None:
    """TokenMissingError or TokenWrongError unless `sent` is the cluster token (when one is set)."""
    if token is None:
        return
    if sent is None:
        raise TokenMissingError(f"internal and admin routes need the cluster token ({TOKEN_HEADER})")
    if not hmac.compare_digest(sent, token):
        raise TokenWrongError("wrong cluster token")


def check_peer_certificate(scope: Scope) -> None:
    """Under --peer-tls, internal routes need a connection that presented a
    client certificate. The handshake already verified it against the CA (a
    foreign one fails there); the serving protocol (app.web.server) puts it in the
    ASGI TLS extension, scope["extensions"]["tls"]["client_cert_chain"]."""
    tls = (scope.get("extensions") or {}).get("tls") or {}
    if not tls.get("client_cert_chain"):
        raise PeerCertificateRequiredError(
            "internal routes need a node certificate under --peer-tls; this connection presented none"
        )


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body, refusing (413) as soon as it exceeds limit."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > limit:
                raise ValueTooLargeError(f"body of {int(value)} bytes exceeds the limit of {limit} bytes")
            break
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ValueTooLargeError(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def raw_path_after(scope: Scope, prefix: bytes) -> bytes:
    """The still percent-encoded path after a route prefix."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    return raw[len(prefix) :].split(b"?", 1)[0]
