"""The one error tree of kvstore. Every error below the web layer is one of these;
`app.web.errors` alone maps them to HTTP statuses.

    KvstoreError
    ├── ConfigError            bad flag, env var or peer list (startup refuses)
    ├── InvalidRequestError    a client sent something we cannot accept (400)
    │   ├── ValueTooLargeError value over the configured limit (413)
    │   ├── MethodNotAllowedError  the route exists, the method does not (405)
    │   └── BackupFormatError  a backup stream or chunk that is corrupt, truncated or of another format (400)
    ├── AccessError            a request without the credentials its route needs
    │   ├── TokenMissingError   no cluster token sent to an internal or admin route (401)
    │   ├── TokenWrongError     a wrong cluster token sent (403)
    │   ├── PeerCertificateRequiredError  an internal route without a verified node certificate (403)
    │   ├── UnauthenticatedError  no user credentials, or unknown ones, under --auth-file (401)
    │   └── ForbiddenError      a known user without the permission the key or route needs (403)
    ├── NodeStartingError      the node's stores are not open yet (503)
    ├── NotComparableError     this node cannot compare digests with the asking peer right now (409)
    │   ├── RingDiffersError    the peer asked about a ring this node does not have
    │   └── DigestsBuildingError  the digest index is still being built
    ├── StorageError           the local engine failed or refused
    │   ├── NodeIdMismatchError data dir belongs to another node id
    │   └── StorageFullError    the LMDB map or the volume is full: writes refused, reads served (507)
    ├── ClockError             clocks too far apart to order writes safely
    │   ├── ClockOffsetError    this node's clock is off from most peers' (503: it will not coordinate)
    │   └── FutureVersionError  a version from further ahead than --max-clock-offset (409)
    ├── WriteNotWonError       replicas kept a newer version; re-stamping did not win in time (503)
    ├── BackupCommandError     `kvstore backup` or `restore` was refused or failed (the CLI's; exit 1)
    └── PeerError              talking to another node failed (it answered wrongly: 500 or garbage)
        ├── PeerUnavailableError  could not reach it, it timed out, or it said 503 (marks it down)
        │   └── PeerTLSError      the TLS handshake failed: a certificate from another CA, a wrong name
        ├── PeerRefusedError      it answered and refused the call (409, other 4xx)
        └── QuorumError           too few replicas answered
            └── MembershipChangedError  the ring changed under a backup that was reading it

Only PeerUnavailableError makes a node count a peer as unreachable: a refusal
or a garbled answer comes from a peer that is up, and a local bug is no outage.
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


class MethodNotAllowedError(InvalidRequestError):
    """The route does not take this method; `allowed` lists those it takes."""

    def __init__(self, message: str, *, allowed: tuple[str, ...]) -> None:
        super().__init__(message)
        self.allowed = allowed


class BackupFormatError(InvalidRequestError):
    """A backup file or chunk failed its checks: wrong magic or format
    version, a checksum mismatch, a truncation. The message names the chunk."""


class AccessError(KvstoreError):
    """A request came without the credentials its route needs."""


class TokenMissingError(AccessError):
    """No cluster token was sent."""


class TokenWrongError(AccessError):
    """The cluster token sent is not this cluster's."""


class PeerCertificateRequiredError(AccessError):
    """Under --peer-tls an internal route was called on a connection that
    presented no verified client certificate (a client, not a node)."""


class UnauthenticatedError(AccessError):
    """Under --auth-file: no bearer token or mapped client certificate, or one
    no user has. Answered 401 with `WWW-Authenticate: Bearer`. `reason`:
    no_credentials or unknown_credentials (kvstore_auth_denied_total's label)."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ForbiddenError(AccessError):
    """Under --auth-file: the user is known, but no role of theirs grants the
    permission over the key (or the route). Nothing was read or written."""


class NodeStartingError(KvstoreError):
    """The node is still opening its stores; nothing can be served yet."""


class NotComparableError(KvstoreError):
    """This node cannot compare digests with the asking peer right now; the
    peer tries again later or another way. The node is up: a refusal, not an outage."""


class RingDiffersError(NotComparableError):
    """A peer asked for the digest of the arcs both replicate on a ring this
    node does not have (a membership change is still spreading)."""


class DigestsBuildingError(NotComparableError):
    """Digests over many arcs were asked for while this node's digest index is
    still being built (after a crash, at open). Answering would read the whole
    store once per request; the caller (anti-entropy, a surplus hand-off)
    skips this node and asks again later."""


class StorageError(KvstoreError):
    """The local storage engine failed."""


class NodeIdMismatchError(StorageError):
    """The data directory was created by a different node id."""


class StorageFullError(StorageError):
    """The store has no room for a write (its --map-size or its volume is full).
    Nothing was written; everything acknowledged before stays readable."""


class ClockError(KvstoreError):
    """Clocks are too far apart for versions to order writes safely."""


class ClockOffsetError(ClockError):
    """This node's clock is further from most of its peers' than --max-clock-offset."""


class FutureVersionError(ClockError):
    """A version stamped further ahead of this node's clock than --max-clock-offset."""


class WriteNotWonError(KvstoreError):
    """Replicas kept a newer version than the write's, and re-stamping it above
    theirs did not win within the attempts allowed. Some replicas may hold it."""


class PeerError(KvstoreError):
    """A call to another node failed."""

    def __init__(self, message: str, *, peer: str = "") -> None:
        super().__init__(message)
        self.peer = peer


class PeerUnavailableError(PeerError):
    """The peer could not be reached, refused, or did not answer in time."""


class PeerTLSError(PeerUnavailableError):
    """The TLS handshake with the peer failed: its certificate is not signed by
    our CA or names another host, or it refused ours. Down, and says why."""


class PeerRefusedError(PeerError):
    """The peer answered and refused the call (a clock offset, a token, a bad request)."""


class QuorumError(PeerError):
    """Fewer replicas than required acknowledged an operation."""

    def __init__(self, message: str, *, required: int, answered: int) -> None:
        super().__init__(message)
        self.required = required
        self.answered = answered


class MembershipChangedError(QuorumError):
    """The ring changed while a backup was reading it: arcs moved between nodes."""


class BackupCommandError(KvstoreError):
    """`kvstore backup` or `kvstore restore` was refused or failed (the server's
    answer, a file it cannot open, a terminal where a file belongs)."""
