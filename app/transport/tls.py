"""A node's TLS material: the PEM files (cert-manager's Secret layout,
tls.crt / tls.key / ca.crt), the server and client SSLContexts built from
them, and their rotation without a restart.

Built once by app.web.server from app.config's TlsConfig; uvicorn
serves with `server_context`, the peer client (app.transport.http and its
pool, app.transport.pool) connects with `client_context()`. Imports only the
standard library and app.config; no network library.

Rotation: `reload()` (every --tls-reload-interval, from `watch()`) hashes the
files' bytes; when they changed, it builds fresh contexts, and only once they
load (a key that matches its certificate, a CA that parses) swaps them in.
Half-written files or a half-done symlink swap fail to load: the old contexts
stay, the failure is logged once per content and counted, and the next change
is tried again. The server side swaps per connection: `server_context`'s
sni_callback, which runs inside every handshake, moves the connection onto the
newest context, so a new certificate and a new CA bundle (a CA removed too,
which load_verify_locations alone could never do) apply to the next handshake.
The client side: new connections use the newest context, and listeners
(the peer client) cycle pooled connections made before the swap.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable

from app.config import TlsConfig
from app.errors import ConfigError
from app.watched_files import WatchedFiles

log = logging.getLogger(__name__)

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2  # nothing older is safe; TLS 1.3 where both sides speak it


class TlsMaterial:
    """The node's current TLS contexts, rebuilt when the files change."""

    def __init__(
        self,
        config: TlsConfig,
        *,
        on_handshake: Callable[[str], None] = lambda side: None,
        on_reload: Callable[[bool], None] = lambda ok: None,
    ) -> None:
        self.config = config
        self.generation = 0  # bumped at every swap: pooled client connections remember theirs
        self._on_handshake = on_handshake
        self._on_reload = on_reload
        self._listeners: list[Callable[[], None]] = []
        self._files = WatchedFiles(self._paths())
        try:
            self._server, self._client = self._build()
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"config: cannot load the TLS files: {_describe(exc)}") from exc
        # The context uvicorn listens with. Its sni_callback runs in every
        # handshake (with or without SNI) and moves the connection onto the
        # newest context; its own verify mode stays the connection's.
        self.server_context = self._server
        self.server_context.sni_callback = self._on_client_hello

    # -- what the server and the clients use ---------------------------------

    def client_context(self) -> ssl.SSLContext:
        """The newest context for a connection to a peer."""
        return self._client

    def count_client_handshake(self) -> None:
        self._on_handshake("client")

    @property
    def requires_peer_certificate(self) -> bool:
        """Internal routes need a verified client certificate (--peer-tls)."""
        return self.config.peer_tls

    def on_rotate(self, listener: Callable[[], None]) -> None:
        """Call listener() after every swap (the peer client cycles its pools)."""
        self._listeners.append(listener)

    def _on_client_hello(self, ssl_object: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        self._on_handshake("server")
        if context is not self._server:
            ssl_object.context = self._server

    # -- rotation ------------------------------------------------------------

    def reload(self) -> bool:
        """Swap in contexts built from the files if they changed and load;
        True when a swap happened."""
        fingerprint = self._files.changed()
        if fingerprint is None:
            return False
        try:
            server, client = self._build()
        except (OSError, ssl.SSLError, ValueError) as exc:
            if self._files.refused(fingerprint):  # once per content: a half-written file is retried when it changes
                log.warning("TLS files changed but do not load; keeping the previous certificate: %s", _describe(exc))
                self._on_reload(False)
            return False
        server.sni_callback = self._on_client_hello
        self._server, self._client = server, client
        self._files.accepted(fingerprint)
        self.generation += 1
        self._on_reload(True)
        log.warning(
            "TLS files changed: new connections use the new certificate and CA (generation %d)", self.generation
        )
        for listener in self._listeners:
            listener()
        return True

    async def watch(self) -> None:
        """Check the files every --tls-reload-interval until cancelled."""
        while True:
            await asyncio.sleep(self.config.reload_interval)
            try:
                self.reload()
            except Exception:  # never let the watcher die: the next tick tries again
                log.exception("checking the TLS files failed")

    def _paths(self) -> list[str]:
        server, peer = self.config.server, self.config.peer
        return [server.cert, server.key, peer.cert, peer.key, *(ca for ca in (server.ca, peer.ca) if ca)]

    def _build(self) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        config = self.config
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.minimum_version = MINIMUM_VERSION
        server.load_cert_chain(config.server.cert, config.server.key)  # refuses a key that does not match
        for ca in dict.fromkeys(ca for ca in (config.server.ca, config.peer.ca) if ca):
            server.load_verify_locations(cafile=ca)
        if config.client_cert_auth:
            server.verify_mode = ssl.CERT_REQUIRED
        elif config.peer_tls:
            # Clients may come without a certificate; a certificate that is
            # presented must verify, or the handshake fails.
            server.verify_mode = ssl.CERT_OPTIONAL
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.peer.ca)
        client.minimum_version = MINIMUM_VERSION
        # Always present our certificate: peers under --peer-tls or
        # --client-cert-auth need it, and the others ignore it.
        client.load_cert_chain(config.peer.cert, config.peer.key)
        return server, client


def client_context(*, cafile: str | None, certfile: str | None, keyfile: str | None) -> ssl.SSLContext:
    """A client's context (the CLI's): verify against cafile (else the system
    CAs), present certfile/keyfile when given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    if certfile:
        context.load_cert_chain(certfile, keyfile)
    return context


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
