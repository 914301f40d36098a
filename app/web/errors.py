"""The one place where kvstore errors become HTTP statuses and JSON bodies."""

from __future__ import annotations

import orjson

from app.errors import (
    InvalidRequestError,
    KvstoreError,
    PeerError,
    ValueTooLargeError,
)


def status_for(exc: KvstoreError) -> int:
    if isinstance(exc, ValueTooLargeError):
        return 413
    if isinstance(exc, InvalidRequestError):
        return 400
    if isinstance(exc, PeerError):
        return 503  # the cluster cannot answer right now; the client may retry
    return 500


def error_body(message: str, **extra: object) -> bytes:
    """The JSON body of every error answer: {"error": "<what was wrong>", ...}."""
    return orjson.dumps({"error": message, **extra})
