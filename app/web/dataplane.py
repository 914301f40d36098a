"""The data plane: the ASGI entry point of a node, and nothing but dispatch.

Measured here, a FastAPI route with a Pydantic body serves ~0.19x what a raw
ASGI app does, a Starlette route ~0.49x; so the key-value routes (routes_data)
and the node-to-node routes (routes_peer) are found by a dict lookup on the
path and answered here, and every other request (ops, admin, docs, unknown
routes, lifespan) falls through to FastAPI. The raw routes still appear in
/openapi.json (app.web.openapi).

Here, once for every request: the user (app.web.access; open routes and
node-to-node routes excepted), then for every raw route the node from the
slot, the cluster token on internal routes, errors turned into answers
(app.web.asgi), request metrics; the protocol header
(app.transport.protocol): read from every internal request into the node's
capabilities, added to every internal answer and to /health's (which peers'
probes read); and on every answer to a client (FastAPI's too) the ring's
epoch header, which ring-aware clients (kvstore_client) follow.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from app.access import EVERYONE
from app.cluster.node import Node
from app.cluster.topology import Topology
from app.errors import AccessError, ForbiddenError, KvstoreError, MethodNotAllowedError, UnauthenticatedError
from app.metrics import NodeMetrics
from app.transport.base import (
    BATCH_PATH,
    CLOCK_PATH,
    DIGESTS_PATH,
    FROM_HEADER,
    KV_PATH,
    MEMBERSHIP_PATH,
    RANGE_PATH,
    READS_PATH,
    SHARED_DIGEST_PATH,
    SYNCING_PATH,
    WRITES_PATH,
)
from app.transport.protocol import OWN, PROTOCOL_HEADER
from app.web import routes_batch, routes_data
from app.web.access import USER, Guard, is_open
from app.web.asgi import (
    EPOCH_HEADER,
    TEXT,
    ASGIApp,
    Disconnected,
    Message,
    Receive,
    Reply,
    Scope,
    Send,
    check_peer_certificate,
    check_token,
    header,
    json_error,
    reply_for,
)
from app.web.routes_peer import PeerRoutes
from app.web.slot import NodeSlot

log = logging.getLogger(__name__)

Handler = Callable[[Node, Scope, Receive, str], Awaitable[Reply]]
FROM_HEADER_BYTES = FROM_HEADER.encode()
PROTOCOL_HEADER_BYTES = PROTOCOL_HEADER.encode()
PROTOCOL_LINE = [(PROTOCOL_HEADER_BYTES, OWN.render().encode())]  # on every internal answer and /health's
INTERNAL = "internal"  # the op of node-to-node routes: token-checked, not counted as client requests
OK_HEALTH = Reply(200, b"OK", TEXT, headers=PROTOCOL_LINE)
HEALTH_METHODS = MethodNotAllowedError("/health answers GET (and HEAD) only", allowed=("GET",))


class DataPlane:
    """Routes raw paths to their handlers; everything else to FastAPI."""

    def __init__(
        self,
        *,
        slot: NodeSlot,
        metrics: NodeMetrics,
        cluster_token: str | None,
        max_value_bytes: int,
        fallback: ASGIApp,
        require_peer_certificate: bool = False,
        guard: Guard | None = None,
    ) -> None:
        self.slot = slot
        self.guard = guard
        self.require_peer_certificate = require_peer_certificate
        self.fallback = fallback
        self.token = cluster_token.encode() if cluster_token else None
        peer = PeerRoutes(max_value_bytes=max_value_bytes)
        self._exact: dict[str, tuple[Handler, str]] = {
            "/get": (routes_data.json_get, "get"),
            "/put": (routes_data.json_put, "put"),
            "/delete": (routes_data.json_delete, "delete"),
            routes_batch.GET_PATH: (routes_batch.get_many, "batch_get"),
            routes_batch.PUT_PATH: (routes_batch.put_many, "batch_put"),
            WRITES_PATH: (peer.writes, INTERNAL),
            READS_PATH: (peer.reads, INTERNAL),
            CLOCK_PATH: (peer.clock, INTERNAL),
            BATCH_PATH: (peer.batch, INTERNAL),
            DIGESTS_PATH: (peer.digests, INTERNAL),
            SHARED_DIGEST_PATH: (peer.shared_digest, INTERNAL),
            RANGE_PATH: (peer.range, INTERNAL),
            SYNCING_PATH: (peer.syncing, INTERNAL),
            MEMBERSHIP_PATH: (peer.membership, INTERNAL),
        }
        self._peer_kv = peer.kv
        self._observe = metrics.observe
        self._epoch_view: Topology | None = None
        self._epoch_header: list[tuple[bytes, bytes]] | None = None

    def _epoch(self) -> list[tuple[bytes, bytes]] | None:
        """The x-kvstore-epoch header of the current ring (None while the node opens)."""
        node = self.slot.node
        if node is None:
            return None
        view = node.topology.current
        if view is not self._epoch_view:
            self._epoch_view = view
            self._epoch_header = [(EPOCH_HEADER, view.client_epoch.encode())]
        return self._epoch_header

    async def _fallback_with_epoch(self, scope: Scope, receive: Receive, send: Send) -> None:
        epoch = self._epoch()
        if epoch is None:
            return await self.fallback(scope, receive, send)

        async def send_with_epoch(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *epoch]}
            await send(message)

        return await self.fallback(scope, receive, send_with_epoch)

    # The ASGI entry point. Kept flat: it runs for every request.
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.fallback(scope, receive, send)
        path: str = scope["path"]
        method: str = scope["method"]
        head = method == "HEAD"
        if path == "/health":
            reply = OK_HEALTH if method == "GET" or head else reply_for(HEALTH_METHODS)
            return await reply.send(send, head=head, extra=self._epoch())
        route = self._exact.get(path)
        if route is not None:
            handler, op = route
        elif path.startswith(routes_data.REST_PREFIX):
            handler, op = routes_data.rest, routes_data.REST_OPS.get(method, "rest")
        elif path.startswith(KV_PATH):
            handler, op = self._peer_kv, INTERNAL
        else:
            return await self._fall_back(scope, receive, send, path=path, head=head)
        started = time.perf_counter()
        guard = self.guard
        try:
            node = self.slot.require()
            if op is INTERNAL:
                if self.require_peer_certificate:
                    check_peer_certificate(scope)
                check_token(scope, self.token)
                if guard is not None:
                    guard.check_internal(scope)
                sender = header(scope, FROM_HEADER_BYTES)
                if sender is not None:
                    node_id = sender.decode("latin-1")
                    protocol = header(scope, PROTOCOL_HEADER_BYTES)
                    node.capabilities.observe(node_id, None if protocol is None else protocol.decode("latin-1"))
                    node.health.heard_from(node_id)
            else:
                scope[USER] = EVERYONE if guard is None else guard.authenticate(scope)
            reply = await handler(node, scope, receive, method)
        except Disconnected:
            return
        except KvstoreError as exc:
            if guard is not None and isinstance(exc, (UnauthenticatedError, ForbiddenError)):
                guard.denied(exc, scope)
            reply = reply_for(exc)
        except Exception:
            log.exception("unexpected error serving %s %s", method, path)
            reply = json_error(500, "internal error; see the node's log")
        if op is INTERNAL:
            return await reply.send(send, head=head, extra=PROTOCOL_LINE)
        await reply.send(send, head=head, extra=self._epoch())
        self._observe(op, reply.status, time.perf_counter() - started)

    async def _fall_back(self, scope: Scope, receive: Receive, send: Send, *, path: str, head: bool) -> None:
        """Every other route, FastAPI's: authenticated here (admin routes need
        admin) unless open, so a route added there is guarded by default."""
        guard = self.guard
        if guard is None or is_open(path):
            scope[USER] = EVERYONE if guard is None else None
        else:
            try:
                scope[USER] = guard.authorize_route(scope, path)
            except AccessError as exc:
                guard.denied(exc, scope)
                return await reply_for(exc).send(send, head=head, extra=self._epoch())
        await self._fallback_with_epoch(scope, receive, send)
