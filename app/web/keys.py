"""Parsing and validating the parts of a key-value request: the key (path
segment, query string, JSON body), the value's size, the TTL. Every failure
is an InvalidRequestError."""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote_to_bytes

from app.config import MAX_KEY_BYTES
from app.errors import InvalidRequestError, ValueTooLargeError


def validate_key(key: bytes) -> bytes:
    """Keys are 1..MAX_KEY_BYTES bytes of UTF-8."""
    if not key:
        raise InvalidRequestError("key is missing or empty")
    if len(key) > MAX_KEY_BYTES:
        raise InvalidRequestError(f"key is {len(key)} bytes; the limit is {MAX_KEY_BYTES}")
    try:
        key.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError("key is not valid UTF-8") from None
    return key


def key_from_path(raw: bytes) -> bytes:
    """The percent-encoded path segment after the route prefix, decoded to bytes."""
    return validate_key(unquote_to_bytes(raw))


def parse_query(query_string: bytes) -> dict[str, str]:
    if not query_string:
        return {}
    try:
        return dict(parse_qsl(query_string.decode("utf-8"), keep_blank_values=True, errors="strict"))
    except UnicodeDecodeError:
        raise InvalidRequestError("query string is not valid UTF-8") from None


def key_from_query(query: dict[str, str]) -> bytes:
    key = query.get("key")
    if key is None:
        raise InvalidRequestError("query parameter 'key' is missing")
    return validate_key(key.encode("utf-8"))


def ttl_from(raw: object) -> float | None:
    """A TTL in seconds: absent, or a positive number."""
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise InvalidRequestError("ttl must be a positive number of seconds")
    try:
        ttl = float(raw)
    except (TypeError, ValueError):
        raise InvalidRequestError("ttl must be a positive number of seconds") from None
    if not ttl > 0 or ttl == float("inf"):
        raise InvalidRequestError("ttl must be a positive number of seconds")
    return ttl


def check_value_size(value: bytes, limit: int) -> None:
    if len(value) > limit:
        raise ValueTooLargeError(f"value of {len(value)} bytes exceeds the limit of {limit} bytes")
