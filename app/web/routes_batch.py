"""The public batch routes: many keys in one request, for clients that group
keys by replica (kvstore_client's get_many and put_many).

    POST /batch/get?consistency=C  {"keys": [K, ...]}
        -> 200 {"values": {K: base64(V), ...}}         absent keys are left out
    POST /batch/put?consistency=C  {"items": {K: base64(V), ...}[, "ttl": S]}
        -> 200 {"versions": {K: VERSION, ...}}

Bounded (MAX_BATCH_KEYS keys, MAX_BATCH_BODY_BYTES of body) and validated as
the single-key routes are (app.web.keys), and each key's permission checked
(app.web.access.require_key), every key before anything is read or written:
one refused key refuses the batch. Each key then goes through the coordinator
as a single-key call would (replica calls to one peer still coalesce). A batch is not atomic: if
any key fails, the answer is that key's error (a put may have stored the
others; a whole-value put is idempotent, so retrying the batch is safe).
Answered by the data plane (app.web.dataplane), like routes_data.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

import orjson

from app.access import Permission
from app.clock import Version
from app.cluster.coordinator import Consistency
from app.cluster.node import Node
from app.config import MAX_BATCH_BODY_BYTES, MAX_BATCH_KEYS
from app.errors import InvalidRequestError
from app.storage.base import Record
from app.web.access import require_key
from app.web.asgi import Receive, Reply, Scope, allow, read_body
from app.web.keys import check_value_size, parse_query, ttl_from, validate_key

T = TypeVar("T")
GET_PATH = "/batch/get"
PUT_PATH = "/batch/put"


async def get_many(node: Node, scope: Scope, receive: Receive, method: str) -> Reply:
    allow(method, GET_PATH, ("POST",))
    query = parse_query(scope["query_string"])
    doc = _json_object(await read_body(scope, receive, MAX_BATCH_BODY_BYTES))
    raw_keys = doc.get("keys")
    if not isinstance(raw_keys, list) or not all(isinstance(key, str) for key in raw_keys):
        raise InvalidRequestError('body field "keys" must be a list of strings')
    keys = [validate_key(key.encode("utf-8")) for key in dict.fromkeys(raw_keys)]
    _check_count(len(keys))
    for key in keys:
        require_key(scope, Permission.READ, key)
    consistency = query.get("consistency", Consistency.QUORUM)
    records: list[Record | None] = await _all(node.coordinator.get(key, consistency=consistency) for key in keys)
    values = {
        key.decode(): base64.b64encode(record.value).decode("ascii")
        for key, record in zip(keys, records, strict=True)
        if record is not None and record.value is not None
    }
    return Reply(200, orjson.dumps({"values": values}))


async def put_many(node: Node, scope: Scope, receive: Receive, method: str) -> Reply:
    allow(method, PUT_PATH, ("POST", "PUT"))
    query = parse_query(scope["query_string"])
    doc = _json_object(await read_body(scope, receive, MAX_BATCH_BODY_BYTES))
    items = doc.get("items")
    if not isinstance(items, dict) or not all(isinstance(value, str) for value in items.values()):
        raise InvalidRequestError('body field "items" must be an object of key: base64 value')
    _check_count(len(items))
    limit = node.config.max_value_bytes
    decoded: list[tuple[bytes, bytes]] = []
    for key, encoded in items.items():
        key_bytes = validate_key(key.encode("utf-8"))
        try:
            value = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequestError(f"the value of key {key!r} is not valid base64") from None
        check_value_size(value, limit)
        decoded.append((key_bytes, value))
    for key_bytes, _ in decoded:
        require_key(scope, Permission.WRITE, key_bytes)
    ttl_s = ttl_from(doc.get("ttl"))
    consistency = query.get("consistency", Consistency.QUORUM)
    versions: list[Version] = await _all(
        node.coordinator.put(key, value, ttl_s=ttl_s, consistency=consistency) for key, value in decoded
    )
    answer = {key.decode(): version.encode() for (key, _), version in zip(decoded, versions, strict=True)}
    return Reply(200, orjson.dumps({"versions": answer}))


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequestError("body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise InvalidRequestError("body must be a JSON object")
    return doc


def _check_count(count: int) -> None:
    if count > MAX_BATCH_KEYS:
        raise InvalidRequestError(f"{count} keys in one batch; the limit is {MAX_BATCH_KEYS}")


async def _all(calls: Iterable[Awaitable[T]]) -> list[T]:
    """Run every call; if any failed, raise the first failure once all have
    ended (none is left running behind the answer)."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    done: list[T] = []
    for result in results:
        if isinstance(result, BaseException):
            raise result
        done.append(result)
    return done
