"""The one error tree of kvstore. Every error below the web layer is one of these;
`app.web.errors` alone maps them to HTTP statuses.

    KvstoreError
    ├── ConfigError            bad flag, env var or peer list (startup refuses)
    ├── InvalidRequestError    a client sent something we cannot accept (4xx)
    │   └── ValueTooLargeError value over the configured limit (413)
    ├── StorageError           the local engine failed or refused
    │   └── NodeIdMismatchError data dir belongs to another node id
    └── PeerError              talking to another node failed
        ├── PeerUnavailableError  could not reach it, or it timed out
        └── QuorumError           too few replicas answered
"""

from __future__ import annotations


class KvstoreError(Exception):
    """Root of every error kvstore raises on purpose."""


class ConfigError(KvstoreError):
    """A setting is missing or invalid; the process should not start."""


class InvalidRequestError(KvstoreError):
    """The client's request is malformed; answer 4xx and change nothing."""


class ValueTooLargeError(InvalidRequestError):
    """The value exceeds the configured maximum size."""


class StorageError(KvstoreError):
    """The local storage engine failed."""


class NodeIdMismatchError(StorageError):
    """The data directory was created by a different node id."""


class PeerError(KvstoreError):
    """A call to another node failed."""

    def __init__(self, message: str, *, peer: str = "") -> None:
        super().__init__(message)
        self.peer = peer


class PeerUnavailableError(PeerError):
    """The peer could not be reached, refused, or did not answer in time."""


class QuorumError(PeerError):
    """Fewer replicas than required acknowledged an operation."""

    def __init__(self, message: str, *, required: int, answered: int) -> None:
        super().__init__(message)
        self.required = required
        self.answered = answered
