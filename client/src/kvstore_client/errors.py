"""The client's one error tree. Every failure a caller sees is one of these,
translated once at the edge (errors.from_answer for a node's answer, the
clients' transport handling for a connection that failed):

    KvstoreError          anything kvstore answered or failed with (a 5xx other than 503/507)
    ├── Unavailable       no replica answered after retries, or every answer was 503
    ├── Unauthorized      401: no token, or a token the cluster does not know
    ├── Forbidden         403: the token may not touch this key (or route)
    ├── BadRequest        any other 4xx, and input the client itself refuses (empty or oversized key)
    └── StorageFull       507: a replica's volume or LMDB map is full; reads still work

Each carries the server's message (`message`), the HTTP status (`status`,
None when the client decided) and the node that answered (`node`).
Imports nothing but the standard library.
"""

from __future__ import annotations

import json


class KvstoreError(Exception):
    """Root of every error the client raises."""

    def __init__(self, message: str, *, status: int | None = None, node: str | None = None) -> None:
        super().__init__(message)
        self.message = message  # the server's own words (its {"error": ...}), or the client's
        self.status = status
        self.node = node

    def __str__(self) -> str:
        where = f"{self.node}: " if self.node else ""
        status = f"{self.status}: " if self.status is not None else ""
        return f"{where}{status}{self.message}"


class Unavailable(KvstoreError):  # noqa: N818 - named by the issue's API, as redis-py's ConnectionError family
    """No node could serve the call within its timeout (connection errors, 503)."""


class Unauthorized(KvstoreError):  # noqa: N818 - the HTTP status name callers know
    """401: the request carried no token, or one the cluster does not know."""


class Forbidden(KvstoreError):  # noqa: N818 - the HTTP status name callers know
    """403: the token is known but may not do this."""


class BadRequest(KvstoreError):  # noqa: N818 - the HTTP status name callers know
    """A 4xx other than 401/403, or input the client refuses before sending."""


class StorageFull(KvstoreError):  # noqa: N818 - the HTTP status name callers know
    """507: a replica's store is full; writes are refused until it grows."""


def message_of(body: bytes) -> str:
    """The server's {"error": ...} message, or the body's text."""
    try:
        doc = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return str(doc["error"])
    return body.decode("utf-8", "replace").strip()


def from_answer(status: int, body: bytes, *, node: str) -> KvstoreError:
    """The error a non-success answer stands for."""
    message = message_of(body) or f"HTTP {status}"
    kind: type[KvstoreError]
    if status == 401:
        kind = Unauthorized
    elif status == 403:
        kind = Forbidden
    elif status == 503:
        kind = Unavailable
    elif status == 507:
        kind = StorageFull
    elif 400 <= status < 500:
        kind = BadRequest
    else:
        kind = KvstoreError
    return kind(message, status=status, node=node)
