"""The public key-value routes, answered by the data plane without FastAPI
(they are the hot path): the JSON routes `/get`, `/put`, `/delete` (the
first API, kept verbatim) and the REST route `/kv/{key}` (raw, binary-safe
values). Each parses and validates, calls the coordinator, shapes the answer;
errors are raised as app.errors types and answered by app.web.asgi. Each
checks the user's permission on its key (app.web.access.require_key) before
reading or writing anything.
"""

from __future__ import annotations

import orjson

from app.access import Permission
from app.clock import Version
from app.cluster.coordinator import Consistency
from app.cluster.node import Node
from app.errors import InvalidRequestError
from app.web.access import require_key
from app.web.asgi import OCTETS, Receive, Reply, Scope, allow, json_error, raw_path_after, read_body
from app.web.keys import check_value_size, key_from_path, key_from_query, parse_query, ttl_from, validate_key

JSON_BODY_OVERHEAD = 64 * 1024  # room for the /put body's key, quotes and escapes around the value
REST_PREFIX = "/kv/"
REST_PREFIX_BYTES = REST_PREFIX.encode()
REST_OPS = {"GET": "get", "HEAD": "get", "PUT": "put", "DELETE": "delete"}  # metric op label per method


def version_header(version: Version) -> list[tuple[bytes, bytes]]:
    return [(b"x-kvstore-version", version.encode().encode())]


async def json_get(node: Node, scope: Scope, receive: Receive, method: str) -> Reply:
    allow(method, "/get", ("GET",))
    query = parse_query(scope["query_string"])
    key = key_from_query(query)
    require_key(scope, Permission.READ, key)
    record = await node.coordinator.get(key, consistency=query.get("consistency", Consistency.QUORUM))
    if record is None or record.value is None:
        return json_error(404, "key not found", key=key.decode())
    try:
        value = record.value.decode("utf-8")
    except UnicodeDecodeError:
        return json_error(406, "the value is binary; read it with GET /kv/{key}", key=key.decode())
    return Reply(200, orjson.dumps({"key": key.decode(), "value": value}), headers=version_header(record.version))


async def json_put(node: Node, scope: Scope, receive: Receive, method: str) -> Reply:
    allow(method, "/put", ("PUT", "POST"))
    query = parse_query(scope["query_string"])
    limit = node.config.max_value_bytes
    body = await read_body(scope, receive, limit + JSON_BODY_OVERHEAD)
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
    check_value_size(value_bytes, limit)
    require_key(scope, Permission.WRITE, key_bytes)
    version = await node.coordinator.put(
        key_bytes, value_bytes, ttl_s=ttl_from(doc.get("ttl")), consistency=query.get("consistency", Consistency.QUORUM)
    )
    return Reply(200, orjson.dumps({"key": key, "status": "stored", "version": version.encode()}))


async def json_delete(node: Node, scope: Scope, receive: Receive, method: str) -> Reply:
    allow(method, "/delete", ("DELETE",))
    query = parse_query(scope["query_string"])
    key = key_from_query(query)
    require_key(scope, Permission.WRITE, key)
    existed = await node.coordinator.delete(key, consistency=query.get("consistency", Consistency.QUORUM))
    if not existed:
        return json_error(404, "key not found", key=key.decode())
    return Reply(200, orjson.dumps({"key": key.decode(), "status": "deleted"}))


async def rest(node: Node, scope: Scope, receive: Receive, method: str) -> Reply:
    allow(method, "/kv/{key}", ("GET", "HEAD", "PUT", "DELETE"))
    key = key_from_path(raw_path_after(scope, REST_PREFIX_BYTES))
    query = parse_query(scope["query_string"])
    consistency = query.get("consistency", Consistency.QUORUM)
    coordinator = node.coordinator
    require_key(scope, Permission.READ if method in ("GET", "HEAD") else Permission.WRITE, key)
    if method == "PUT":
        value = await read_body(scope, receive, node.config.max_value_bytes)
        version = await coordinator.put(key, value, ttl_s=ttl_from(query.get("ttl")), consistency=consistency)
        return Reply(204, headers=version_header(version))
    if method == "DELETE":
        await coordinator.delete(key, consistency=consistency)
        return Reply(204)
    record = await coordinator.get(key, consistency=consistency)
    if record is None:
        return json_error(404, "key not found", key=key.decode())
    return Reply(200, record.value or b"", OCTETS, version_header(record.version))
