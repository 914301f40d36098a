"""The one place where kvstore errors become HTTP statuses and JSON bodies."""

from __future__ import annotations

import orjson

from app.errors import (
    ClockError,
    FutureVersionError,
    InvalidRequestError,
    KvstoreError,
    PeerError,
    ValueTooLargeError,
    WriteNotWonError,
)


def status_for(exc: KvstoreError) -> int:
    if isinstance(exc, ValueTooLargeError):
        return 413
    if isinstance(exc, InvalidRequestError):
        return 400
    if isinstance(exc, FutureVersionError):
        return 409  # the sender's version is from too far ahead: its clock, not this request, must change
    if isinstance(exc, (PeerError, ClockError, WriteNotWonError)):
        return 503  # the cluster cannot answer right now; the client may retry
    return 500


def error_body(message: str, **extra: object) -> bytes:
    """The JSON body of every error answer: {"error": "<what was wrong>", ...}."""
    return orjson.dumps({"error": message, **extra})
