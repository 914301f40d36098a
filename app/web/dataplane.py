"""The data path: a small ASGI handler in front of the FastAPI application.

Measured here, a FastAPI route with a Pydantic body serves ~0.19x what a raw
ASGI app does, a Starlette route ~0.49x; the key-value routes are the hot
path, so they are answered here, by a dict lookup on the path, and every
other request (ops, admin, docs, unknown routes, lifespan) falls through to
FastAPI. The routes still appear in /openapi.json (see DATA_ROUTES_OPENAPI).

Handlers parse and validate, call the coordinator, and shape the answer;
errors are app.errors types mapped by app.web.errors.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from app.cluster.node import Node
from app.errors import InvalidRequestError, KvstoreError, ValueTooLargeError
from app.storage.base import Record
from app.transport import codec
from app.clock import wall_ms
from app.transport.base import (
    APPLIED_HEADER,
    CLOCK_PATH,
    COALESCE_MAX_BYTES,
    COALESCE_MAX_CALLS,
    EXISTED_HEADER,
    HINT_HEADER,
    KV_PATH,
    NEWER_HEADER,
    READS_PATH,
    WRITES_PATH,
    SYNCING_HEADER,
    TOKEN_HEADER,
    record_from_headers,
    record_headers,
)
from app.web.errors import error_body, status_for
from app.web.keys import key_from_path, key_from_query, parse_query, ttl_from, validate_key

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON = b"application/json"
OCTETS = b"application/octet-stream"
TEXT = b"text/plain; charset=utf-8"
JSON_BODY_OVERHEAD = 64 * 1024  # room for the seed body's key, quotes and escapes around the value
FRAME_OVERHEAD = 1024 + 300  # per coalesced call: its key, node ids and fixed fields
REST_PREFIX = "/kv/"
REST_PREFIX_BYTES = REST_PREFIX.encode()
INTERNAL_PREFIX_BYTES = KV_PATH.encode()
TOKEN_HEADER_BYTES = TOKEN_HEADER.encode()
SYNCING = (SYNCING_HEADER.encode(), b"1")


class Disconnected(Exception):
    """The client went away before sending its whole body."""


class Reply:
    """A finished answer: status, body, content type, extra headers."""

    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, status: int, body: bytes = b"", content_type: bytes = JSON, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers

    async def send(self, send: Send, *, head: bool = False) -> None:
        headers = [(b"content-type", self.content_type), (b"content-length", str(len(self.body)).encode())]
        if self.headers:
            headers.extend(self.headers)
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else self.body})


OK_HEALTH = Reply(200, b"OK", TEXT)


def error(status: int, message: str, **extra: object) -> Reply:
    return Reply(status, error_body(message, **extra))


def method_not_allowed(method: str, path: str, allowed: tuple[str, ...]) -> Reply:
    return Reply(
        405,
        error_body(f"method {method} is not allowed on {path}; use {' or '.join(allowed)}"),
        headers=[(b"allow", ", ".join(allowed).encode())],
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


def version_header(record_or_version: Any) -> list[tuple[bytes, bytes]]:
    version = record_or_version.version if isinstance(record_or_version, Record) else record_or_version
    return [(b"x-kvstore-version", version.encode().encode())]


class DataPlane:
    """ASGI entry point of a node: data routes here, everything else to FastAPI."""

    def __init__(self, *, node: Node, fallback: ASGIApp) -> None:
        self.node = node
        self.fallback = fallback
        self.max_value = node.config.max_value_bytes
        self.token = node.config.cluster_token.encode() if node.config.cluster_token else None
        self._exact: dict[str, Callable[[Scope, Receive, str], Awaitable[Reply]]] = {
            "/get": self._seed_get,
            "/put": self._seed_put,
            "/delete": self._seed_delete,
        }
        self._internal_exact: dict[str, Callable[[Scope, Receive, str], Awaitable[Reply]]] = {
            WRITES_PATH: self._internal_writes_coalesced,
            READS_PATH: self._internal_reads_coalesced,
            CLOCK_PATH: self._internal_clock,
        }
        # A coalesced body holds calls up to COALESCE_MAX_BYTES in all, or a single
        # write of any allowed size (the sender never batches a bigger one with others).
        self.max_coalesced = max(self.max_value, COALESCE_MAX_BYTES) + COALESCE_MAX_CALLS * FRAME_OVERHEAD
        self._observe = node.metrics.observe
        self._internal_reads = node.metrics.internal.labels("read")
        self._internal_writes = node.metrics.internal.labels("write")

    # The ASGI entry point. Kept flat: it runs for every request.
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.fallback(scope, receive, send)
        path: str = scope["path"]
        method: str = scope["method"]
        if path == "/health":
            if method == "GET" or method == "HEAD":
                return await OK_HEALTH.send(send, head=method == "HEAD")
            return await method_not_allowed(method, path, ("GET",)).send(send)
        handler = self._exact.get(path)
        if handler is not None:
            op = path[1:]
        elif path.startswith(REST_PREFIX):
            handler, op = self._rest, _REST_OPS.get(method, "rest")
        elif path.startswith(KV_PATH):
            handler, op = self._internal, "internal"
        elif path in self._internal_exact:
            handler, op = self._internal_exact[path], "internal"
        else:
            return await self.fallback(scope, receive, send)
        started = time.perf_counter()
        try:
            if self.node.coordinator is None:
                reply = error(503, "node is starting: store not open yet")
            else:
                reply = await handler(scope, receive, method)
        except Disconnected:
            return
        except KvstoreError as exc:
            reply = error(status_for(exc), str(exc))
        except Exception:
            log.exception("unexpected error serving %s %s", method, path)
            reply = error(500, "internal error; see the node's log")
        await reply.send(send, head=method == "HEAD")
        if op != "internal":
            self._observe(op, reply.status, time.perf_counter() - started)

    # -- the seed's API: /get, /put, /delete ---------------------------------

    async def _seed_get(self, scope: Scope, receive: Receive, method: str) -> Reply:
        if method != "GET":
            return method_not_allowed(method, "/get", ("GET",))
        query = parse_query(scope["query_string"])
        key = key_from_query(query)
        record = await self.node.coordinator.get(key, consistency=query.get("consistency", "quorum"))  # type: ignore[union-attr]
        if record is None:
            return error(404, "key not found", key=key.decode())
        try:
            value = record.value.decode("utf-8")  # type: ignore[union-attr]
        except UnicodeDecodeError:
            return error(406, "the value is binary; read it with GET /kv/{key}", key=key.decode())
        return Reply(200, orjson.dumps({"key": key.decode(), "value": value}), headers=version_header(record))

    async def _seed_put(self, scope: Scope, receive: Receive, method: str) -> Reply:
        if method != "PUT" and method != "POST":
            return method_not_allowed(method, "/put", ("PUT", "POST"))
        query = parse_query(scope["query_string"])
        body = await read_body(scope, receive, self.max_value + JSON_BODY_OVERHEAD)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise InvalidRequestError('body is not valid JSON; send {"key": "...", "value": "..."}') from None
        if not isinstance(doc, dict):
            raise InvalidRequestError('body must be a JSON object: {"key": "...", "value": "..."}')
        key, value = doc.get("key"), doc.get("value")
        if not isinstance(key, str):
            raise InvalidRequestError('body field "key" must be a string')
        if not isinstance(value, str):
            raise InvalidRequestError('body field "value" must be a string')
        key_bytes = validate_key(key.encode("utf-8"))
        value_bytes = value.encode("utf-8")
        self._check_value_size(value_bytes)
        version = await self.node.coordinator.put(  # type: ignore[union-attr]
            key_bytes, value_bytes, ttl_s=ttl_from(doc.get("ttl")), consistency=query.get("consistency", "quorum")
        )
        return Reply(200, orjson.dumps({"key": key, "status": "stored", "version": version.encode()}))

    async def _seed_delete(self, scope: Scope, receive: Receive, method: str) -> Reply:
        if method != "DELETE":
            return method_not_allowed(method, "/delete", ("DELETE",))
        query = parse_query(scope["query_string"])
        key = key_from_query(query)
        existed = await self.node.coordinator.delete(key, consistency=query.get("consistency", "quorum"))  # type: ignore[union-attr]
        if not existed:
            return error(404, "key not found", key=key.decode())
        return Reply(200, orjson.dumps({"key": key.decode(), "status": "deleted"}))

    # -- the REST API: /kv/{key} ----------------------------------------------

    async def _rest(self, scope: Scope, receive: Receive, method: str) -> Reply:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        key = key_from_path(raw_path[len(REST_PREFIX_BYTES):].split(b"?", 1)[0])
        query = parse_query(scope["query_string"])
        consistency = query.get("consistency", "quorum")
        coordinator = self.node.coordinator
        assert coordinator is not None
        if method == "GET" or method == "HEAD":
            record = await coordinator.get(key, consistency=consistency)
            if record is None:
                return error(404, "key not found", key=key.decode())
            return Reply(200, record.value or b"", OCTETS, version_header(record))
        if method == "PUT":
            value = await read_body(scope, receive, self.max_value)
            version = await coordinator.put(key, value, ttl_s=ttl_from(query.get("ttl")), consistency=consistency)
            return Reply(204, headers=version_header(version))
        if method == "DELETE":
            await coordinator.delete(key, consistency=consistency)
            return Reply(204)
        return method_not_allowed(method, "/kv/{key}", ("GET", "HEAD", "PUT", "DELETE"))

    # -- replica routes: /internal/v1/kv/{key} (never forwarded again) --------

    async def _internal(self, scope: Scope, receive: Receive, method: str) -> Reply:
        denied = check_token(scope, self.token)
        if denied is not None:
            return denied
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        key = key_from_path(raw_path[len(INTERNAL_PREFIX_BYTES):])
        replica = self.node.replica
        assert replica is not None
        if method == "GET":
            self._internal_reads.inc()
            answer = replica.read(key)
            extra = [] if answer.authoritative else [SYNCING]
            if answer.record is None:
                return Reply(404, headers=extra)
            headers = _encode_headers(record_headers(answer.record)) + extra
            return Reply(200, answer.record.value or b"", OCTETS, headers)
        if method == "PUT":
            self._internal_writes.inc()
            body = await read_body(scope, receive, self.max_value)
            headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
            try:
                record = record_from_headers(headers, body)
            except (KeyError, ValueError):
                raise InvalidRequestError("replica write needs a valid x-kvstore-version header") from None
            ack = await replica.write(key, record, hint_for=headers.get(HINT_HEADER) or None)
            answer = [
                (APPLIED_HEADER.encode(), b"1" if ack.applied else b"0"),
                (EXISTED_HEADER.encode(), b"1" if ack.existed else b"0"),
            ]
            if ack.newer is not None:
                answer.append((NEWER_HEADER.encode(), ack.newer.encode().encode()))
            return Reply(200, headers=answer)
        return method_not_allowed(method, KV_PATH + "{key}", ("GET", "PUT"))

    def _refuse_internal_post(self, scope: Scope, method: str, path: str) -> Reply | None:
        """The refusal for a coalesced-call request, or None to serve it."""
        denied = check_token(scope, self.token)
        if denied is not None:
            return denied
        if method != "POST":
            return method_not_allowed(method, path, ("POST",))
        return None

    def _check_value_size(self, value: bytes) -> None:
        if len(value) > self.max_value:
            raise ValueTooLargeError(f"value of {len(value)} bytes exceeds the limit of {self.max_value} bytes")

    async def _internal_writes_coalesced(self, scope: Scope, receive: Receive, method: str) -> Reply:
        refused = self._refuse_internal_post(scope, method, WRITES_PATH)
        if refused is not None:
            return refused
        writes = _decode_calls(codec.decode_writes, await read_body(scope, receive, self.max_coalesced))
        for key, record, _ in writes:
            validate_key(key)
            if record.value is not None:
                self._check_value_size(record.value)
        self._internal_writes.inc(len(writes))
        acks = await self.node.replica.write_many(writes)  # type: ignore[union-attr]
        return Reply(200, codec.encode_acks((ack.applied, ack.existed, ack.newer) for ack in acks), OCTETS)

    async def _internal_clock(self, scope: Scope, receive: Receive, method: str) -> Reply:
        """This node's wall clock, for its peers' offset probes."""
        denied = check_token(scope, self.token)
        if denied is not None:
            return denied
        if method != "GET":
            return method_not_allowed(method, CLOCK_PATH, ("GET",))
        return Reply(200, orjson.dumps({"node_id": self.node.config.node_id, "wall_ms": wall_ms()}))

    async def _internal_reads_coalesced(self, scope: Scope, receive: Receive, method: str) -> Reply:
        refused = self._refuse_internal_post(scope, method, READS_PATH)
        if refused is not None:
            return refused
        keys = _decode_calls(codec.decode_keys, await read_body(scope, receive, COALESCE_MAX_CALLS * FRAME_OVERHEAD + COALESCE_MAX_BYTES))
        for key in keys:
            validate_key(key)
        self._internal_reads.inc(len(keys))
        answers = self.node.replica.read_many(keys)  # type: ignore[union-attr]
        return Reply(200, codec.encode_read_answers(
            (key, answer.record, not answer.authoritative) for key, answer in zip(keys, answers)
        ), OCTETS)


def check_token(scope: Scope, token: bytes | None) -> Reply | None:
    """None when the request may use internal routes, else the refusal."""
    if token is None:
        return None
    for name, value in scope["headers"]:
        if name == TOKEN_HEADER_BYTES:
            if hmac.compare_digest(value, token):
                return None
            return error(403, "wrong cluster token on an internal route")
    return error(401, "internal routes need the cluster token (x-kvstore-token)")


_REST_OPS = {"GET": "get", "HEAD": "get", "PUT": "put", "DELETE": "delete"}


def _decode_calls(decode, body: bytes):  # type: ignore[no-untyped-def] - any codec decoder
    try:
        calls = decode(body)
    except (ValueError, IndexError, UnicodeDecodeError):
        raise InvalidRequestError("malformed coalesced call frames") from None
    if len(calls) > COALESCE_MAX_CALLS:
        raise InvalidRequestError(f"{len(calls)} coalesced calls; the limit is {COALESCE_MAX_CALLS}")
    return calls


def _encode_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in headers.items()]
