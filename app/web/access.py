"""Access control at the HTTP edge: who a request is, and whether they may.

The data plane (app.web.dataplane) asks the Guard to authenticate every
request a user route gets, before any handler runs, and puts the user in the
scope under USER; a handler that touches a key calls `require_key` for each
key before reading or writing anything. Without --auth-file every request is
EVERYONE (allowed everything) and nothing else changes. The rules and the
users file live in app.access (pure); here: headers, certificates, denials
counted and logged (rate-limited), and the file watcher.

Route classes (`route_class`): open (probes, metrics, the console's static
page), internal (the node-to-node guard: cluster token, peer mTLS; a user's
credentials never open it), admin (admin over every key), and the rest (any
authenticated user); key routes are checked per key by their handlers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from app.access import EVERYONE, AuthFile, Permission, User
from app.config import AUTH_RELOAD_INTERVAL_S
from app.errors import AccessError, ForbiddenError, UnauthenticatedError
from app.web.asgi import Scope, header

log = logging.getLogger(__name__)

USER = "kvstore.user"  # the scope key the authenticated user is kept under
CERT_NAMES = "kvstore.cert_names"  # in the ASGI TLS extension: a verified client certificate's CN, then SANs
AUTHORIZATION = b"authorization"
BEARER = b"bearer"
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/favicon.ico", "/ui"})
OPEN_PREFIX = "/ui/"  # the console's static files; its data is served elsewhere, behind credentials
ADMIN_PREFIX = "/admin/"
# Denials are logged at most this often on average, in bursts of DENIAL_LOG_BURST:
# a client retrying a wrong token in a loop must not flood the log.
DENIAL_LOG_PER_S = 1.0
DENIAL_LOG_BURST = 10

# Why a request was refused: the `reason` label of kvstore_auth_denied_total.
NO_CREDENTIALS = "no_credentials"
UNKNOWN_CREDENTIALS = "unknown_credentials"
FORBIDDEN = "forbidden"


def require_key(scope: Scope, permission: Permission, key: bytes) -> None:
    """ForbiddenError unless the request's user has `permission` over `key`.
    Every handler that reads or writes a key calls this first, once per key."""
    user: User = scope[USER]  # set by the data plane before any handler: a KeyError here is a bug, never an open door
    if not user.allows(permission, key):
        raise ForbiddenError(
            f"auth: user {user.name!r} lacks {permission} on key {key.decode('utf-8', 'replace')!r}",
        )


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIX)


class Guard:
    """Authenticates requests against the users file's current rules."""

    def __init__(self, auth_file: AuthFile, *, on_denied: Callable[[str], None] = lambda reason: None) -> None:
        self.auth_file = auth_file
        self._on_denied = on_denied
        self._log = DenialLog()

    def authenticate(self, scope: Scope) -> User:
        """The request's user: by its bearer token if it sent one (a wrong one
        is refused, never passed over for the certificate), else by its
        verified client certificate's names. UnauthenticatedError (401) when neither names one."""
        rules = self.auth_file.rules
        sent = header(scope, AUTHORIZATION)
        if sent is not None:
            scheme, _, token = sent.partition(b" ")
            token = token.strip()
            if scheme.lower() != BEARER or not token:
                raise UnauthenticatedError(
                    "auth: the Authorization header must be `Bearer TOKEN`", reason=UNKNOWN_CREDENTIALS
                )
            user = rules.user_for_token(token)
            if user is None:
                raise UnauthenticatedError("auth: unknown token", reason=UNKNOWN_CREDENTIALS)
            return user
        names = certificate_names(scope)
        if names:
            user = rules.user_for_certificate(names)
            if user is None:
                raise UnauthenticatedError(
                    f"auth: no user is mapped to the client certificate {names[0]!r}", reason=UNKNOWN_CREDENTIALS
                )
            return user
        raise UnauthenticatedError(
            "auth: this route needs credentials: send `Authorization: Bearer TOKEN` "
            "(or a client certificate mapped to a user)",
            reason=NO_CREDENTIALS,
        )

    def authorize_route(self, scope: Scope, path: str) -> User:
        """The user of a request for a non-key route: admin routes need admin
        over every key; the others any authenticated user."""
        user = scope[USER] = self.authenticate(scope)  # kept for the denial's log line too
        if path.startswith(ADMIN_PREFIX) and not user.allows_everywhere(Permission.ADMIN):
            raise ForbiddenError(f"auth: user {user.name!r} lacks admin, which {path} needs")
        return user

    def check_internal(self, scope: Scope) -> None:
        """A user's certificate never opens node-to-node routes, even when the
        same CA signed it as the nodes' (under --peer-tls that alone would)."""
        names = certificate_names(scope)
        if names and self.auth_file.rules.user_for_certificate(names) is not None:
            raise ForbiddenError("auth: a user's certificate does not open node-to-node routes")

    def denied(self, exc: AccessError, scope: Scope) -> None:
        """Count a refusal and log it (rate-limited), naming the user and route."""
        reason = exc.reason if isinstance(exc, UnauthenticatedError) else FORBIDDEN
        self._on_denied(reason)
        user = scope.get(USER)
        who = user.name if isinstance(user, User) and user is not EVERYONE else "-"
        self._log.record(f"auth: denied {scope['method']} {scope['path']} for user {who} ({reason}): {exc}")


def certificate_names(scope: Scope) -> tuple[str, ...]:
    """A verified client certificate's names (CN, then SANs), from the ASGI TLS extension."""
    tls = (scope.get("extensions") or {}).get("tls")
    if not tls:
        return ()
    names: tuple[str, ...] = tls.get(CERT_NAMES) or ()
    return names


class DenialLog:
    """A token bucket over log lines: DENIAL_LOG_BURST at once, then
    DENIAL_LOG_PER_S; the lines it drops are counted into the next one."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens = float(DENIAL_LOG_BURST)
        self._last = clock()
        self.suppressed = 0

    def record(self, line: str) -> None:
        now = self._clock()
        self._tokens = min(float(DENIAL_LOG_BURST), self._tokens + (now - self._last) * DENIAL_LOG_PER_S)
        self._last = now
        if self._tokens < 1:
            self.suppressed += 1
            return
        self._tokens -= 1
        if self.suppressed:
            line += f" ({self.suppressed} more denials not logged)"
            self.suppressed = 0
        log.warning("%s", line)


async def watch(auth_file: AuthFile, *, interval_s: float = AUTH_RELOAD_INTERVAL_S) -> None:
    """Re-read the users file every interval until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            auth_file.reload()
        except Exception:  # never let the watcher die: the next tick tries again
            log.exception("auth: checking the users file failed")
