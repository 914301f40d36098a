"""The one place where kvstore errors become HTTP statuses, headers and JSON
bodies; the data plane and the FastAPI routes both answer through it."""

from __future__ import annotations

import orjson

from app.errors import (
    AccessError,
    ClockError,
    FutureVersionError,
    InvalidRequestError,
    KvstoreError,
    MethodNotAllowedError,
    NodeStartingError,
    NotComparableError,
    PeerError,
    StorageFullError,
    TokenMissingError,
    UnauthenticatedError,
    ValueTooLargeError,
    WriteNotWonError,
)

# What a 503 tells a client to wait before retrying: a peer's reachability
# and the clock checks are re-evaluated every second (PROBE_INTERVAL_S).
RETRY_AFTER_S = 1


def status_for(exc: KvstoreError) -> int:
    if isinstance(exc, ValueTooLargeError):
        return 413
    if isinstance(exc, MethodNotAllowedError):
        return 405
    if isinstance(exc, InvalidRequestError):
        return 400
    if isinstance(exc, AccessError):
        return 401 if isinstance(exc, (TokenMissingError, UnauthenticatedError)) else 403
    if isinstance(exc, StorageFullError):
        return 507  # Insufficient Storage: this node is full; growing its volume and --map-size fixes it
    if isinstance(exc, NotComparableError):
        # Not 503: a peer's 503 marks the node down for client traffic, and
        # it serves clients fine; its peers only have to ask for digests later.
        return 409
    if isinstance(exc, FutureVersionError):
        return 409  # the sender's version is from too far ahead: its clock, not this request, must change
    if isinstance(exc, (PeerError, ClockError, WriteNotWonError, NodeStartingError)):
        return 503  # the cluster cannot answer right now; the client may retry
    return 500


def headers_for(exc: KvstoreError, status: int) -> dict[str, str]:
    """Headers an error answer carries: Allow on 405, Retry-After on 503,
    WWW-Authenticate on a user's 401 (RFC 6750: the scheme to retry with)."""
    if isinstance(exc, MethodNotAllowedError):
        return {"allow": ", ".join(exc.allowed)}
    if isinstance(exc, UnauthenticatedError):
        return {"www-authenticate": 'Bearer realm="kvstore"'}
    if status == 503:
        return {"retry-after": str(RETRY_AFTER_S)}
    return {}


def error_body(message: str, **extra: object) -> bytes:
    """The JSON body of every error answer: {"error": "<what was wrong>", ...}."""
    return orjson.dumps({"error": message, **extra})
