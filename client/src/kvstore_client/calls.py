"""Each operation as data: the request to send and how to read its answer,
with the client-side checks of keys and values. Pure; the clients
(kvstore_client.sync, kvstore_client.aio) send a Call and hand the answer
back to it. The routes are the nodes' public ones (README: HTTP API):
/kv/{key}, /batch/get, /batch/put, /ring, /ring/tokens.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote

from kvstore_client.errors import BadRequest, KvstoreError, from_answer
from kvstore_client.ring import MAX_KEY_BYTES, RingFormatError, RingView

T = TypeVar("T")
Key = str | bytes
Value = str | bytes
CONSISTENCIES = ("one", "quorum", "all")
VERSION_HEADER = "x-kvstore-version"


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request, and what its answer means.

    idempotent: may be sent again after a connection error or a 503 without
    changing the outcome. Every operation of this client is: a PUT carries the
    whole value (sending it twice leaves the same value, with a later version);
    a DELETE of a deleted key is still deleted; reads change nothing."""

    method: str
    path: str
    read: Callable[[int, Mapping[str, str], bytes], T]  # the answer of a status in `ok`
    ok: tuple[int, ...]
    params: dict[str, str] | None = None
    content: bytes | None = None
    headers: dict[str, str] | None = None
    idempotent: bool = True

    def answer(self, status: int, headers: Mapping[str, str], body: bytes, *, node: str) -> T:
        """The call's result, or the error the answer stands for."""
        if status in self.ok:
            return self.read(status, headers, body)
        raise from_answer(status, body, node=node)


def key_bytes(key: Key) -> bytes:
    """A key as the nodes take it: 1..1024 bytes of UTF-8 (BadRequest otherwise)."""
    if isinstance(key, str):
        raw = key.encode("utf-8")
    elif isinstance(key, bytes):
        raw = key
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("key is not valid UTF-8") from None
    else:
        raise BadRequest(f"key must be str or bytes, not {type(key).__name__}")
    if not raw:
        raise BadRequest("key is empty")
    if len(raw) > MAX_KEY_BYTES:
        raise BadRequest(f"key is {len(raw)} bytes; the limit is {MAX_KEY_BYTES}")
    return raw


def value_bytes(value: Value) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise BadRequest(f"value must be str or bytes, not {type(value).__name__}")


def _params(consistency: str | None, ttl: float | None = None) -> dict[str, str] | None:
    params: dict[str, str] = {}
    if consistency is not None:
        if consistency not in CONSISTENCIES:
            raise BadRequest(f"consistency must be one of {', '.join(CONSISTENCIES)}, not {consistency!r}")
        params["consistency"] = consistency
    if ttl is not None:
        if not ttl > 0:
            raise BadRequest("ttl must be a positive number of seconds")
        params["ttl"] = repr(float(ttl))
    return params or None


def _path(key: bytes) -> str:
    return "/kv/" + quote(key, safe="")


def json_body(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise KvstoreError("the node answered with malformed JSON") from None


def get(key: bytes, consistency: str | None) -> Call[bytes | None]:
    return Call(
        "GET",
        _path(key),
        lambda status, _h, body: body if status == 200 else None,
        (200, 404),
        params=_params(consistency),
    )


def put(key: bytes, value: bytes, *, ttl: float | None, consistency: str | None) -> Call[str]:
    return Call(
        "PUT",
        _path(key),
        lambda _s, headers, _b: headers.get(VERSION_HEADER, ""),
        (204, 200),
        params=_params(consistency, ttl),
        content=value,
    )


def delete(key: bytes, consistency: str | None) -> Call[None]:
    return Call("DELETE", _path(key), lambda _s, _h, _b: None, (204, 200, 404), params=_params(consistency))


def get_many(keys: Iterable[bytes], consistency: str | None) -> Call[dict[bytes, bytes]]:
    def read(_status: int, _headers: Mapping[str, str], body: bytes) -> dict[bytes, bytes]:
        values = json_body(body).get("values", {})
        return {key.encode("utf-8"): base64.b64decode(value) for key, value in values.items()}

    content = json.dumps({"keys": [key.decode("utf-8") for key in keys]}).encode()
    return Call(
        "POST",
        "/batch/get",
        read,
        (200,),
        params=_params(consistency),
        content=content,
        headers={"content-type": "application/json"},
    )


def put_many(items: Mapping[bytes, bytes], *, ttl: float | None, consistency: str | None) -> Call[dict[bytes, str]]:
    def read(_status: int, _headers: Mapping[str, str], body: bytes) -> dict[bytes, str]:
        return {key.encode("utf-8"): str(version) for key, version in json_body(body).get("versions", {}).items()}

    doc: dict[str, Any] = {
        "items": {key.decode("utf-8"): base64.b64encode(value).decode("ascii") for key, value in items.items()}
    }
    if ttl is not None:
        _params(None, ttl)  # the same check as a single put's
        doc["ttl"] = ttl
    return Call(
        "POST",
        "/batch/put",
        read,
        (200,),
        params=_params(consistency),
        content=json.dumps(doc).encode(),
        headers={"content-type": "application/json"},
    )


def ring() -> Call[dict[str, Any]]:
    return Call("GET", "/ring", lambda _s, _h, body: dict(json_body(body)), (200,))


def ring_tokens() -> Call[RingView]:
    def read(_status: int, _headers: Mapping[str, str], body: bytes) -> RingView:
        try:
            return RingView.parse(json_body(body))
        except RingFormatError as exc:
            raise KvstoreError(str(exc)) from None

    return Call("GET", "/ring/tokens", read, (200,))


def chunks(keys: list[bytes], size: int) -> list[list[bytes]]:
    """A group of keys cut to the nodes' batch limit."""
    return [keys[i : i + size] for i in range(0, len(keys), size)]
