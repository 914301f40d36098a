"""How a node serves: uvicorn over the composition root (app.web.app), on
uvloop and httptools, with the TLS protocol that tells routes which client
certificate a connection presented and retires connections at a certificate
rotation, and the --ops-listen listener beside it. The CLI (`kvstore node`)
builds the config and calls `serve`; this is the only module of the web layer
importing uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import uvicorn

from app.config import GC_THRESHOLDS, NodeConfig
from app.errors import ConfigError
from app.metrics import NodeMetrics
from app.transport.tls import TlsMaterial
from app.web.access import CERT_NAMES
from app.web.app import create_app
from app.web.ops import OpsPlane

ROTATION_GRACE_S = 1.0  # after a TLS rotation, how long an idle connection may still send its next request


def serve(config: NodeConfig) -> int:
    """Run the node until SIGTERM or SIGINT; 0 once it served, 1 if it never started."""
    logging.basicConfig(
        level=config.log_level.upper(), format=f"%(asctime)s {config.node_id} %(levelname)s %(name)s: %(message)s"
    )
    metrics = NodeMetrics()
    tls = None
    if config.tls is not None:
        tls = TlsMaterial(config.tls, on_handshake=metrics.count_tls_handshake, on_reload=metrics.count_tls_reload)
    app = create_app(config, metrics=metrics, tls=tls)
    ops_socket = _bind_ops_listener(config)  # before anything starts: a taken port is a config error
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            loop="uvloop",
            http="httptools" if tls is None else _tls_protocol(tls),
            # uvicorn listens with our context: its sni_callback swaps in rotated certificates.
            ssl_context_factory=None if tls is None else (lambda _config, _default: tls.server_context),
            workers=1,  # the store lives in the process: exactly one worker
            lifespan="on",
            access_log=False,
            log_level=config.log_level,
            timeout_graceful_shutdown=3,
            server_header=False,
            proxy_headers=False,  # nothing reads the client address; saves a middleware per request
        )
    )
    # The memory engine keeps every record as Python objects, and each request
    # allocates more: with default thresholds, full collections walk the whole
    # store and put 40-60 ms into PUT p99. Freezing what start-up built and
    # collecting the young generation less often cut p99 to ~7 ms (BENCHMARKS.md).
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    if ops_socket is None:
        server.run()
    else:
        ops = _ops_server(OpsPlane(slot=app.slot, metrics=metrics), log_level=config.log_level)
        with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
            runner.run(_serve_with_ops(server, ops, ops_socket))
    return 0 if server.started else 1


def _ops_server(app: Any, *, log_level: str) -> uvicorn.Server:
    """A uvicorn server for the ops listener that leaves signals to the node's
    server (uvicorn's own restores and re-raises them; two would race)."""

    class OpsServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return OpsServer(
        uvicorn.Config(
            app,
            http="httptools",
            lifespan="off",
            access_log=False,
            log_level=log_level,
            server_header=False,
            proxy_headers=False,
        )
    )


def _bind_ops_listener(config: NodeConfig) -> socket.socket | None:
    """The --ops-listen socket, bound and listening, or None without the flag."""
    if config.ops_listen is None:
        return None
    host, port = config.ops_listen
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        raise ConfigError(f"config: cannot listen on --ops-listen {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


async def _serve_with_ops(server: uvicorn.Server, ops: uvicorn.Server, ops_socket: socket.socket) -> None:
    """The node's server and the ops listener in one loop. The ops listener
    starts first, so probes get /health (and /ready's 503) while the node
    opens; it stops once the node's server has shut down."""
    ops_task = asyncio.create_task(ops.serve(sockets=[ops_socket]))
    try:
        await server.serve()
    finally:
        ops.should_exit = True
        await ops_task


def _tls_protocol(tls: TlsMaterial) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, over TLS, with two additions.

    It tells the app what client certificate the connection presented, in
    the ASGI TLS extension (scope["extensions"]["tls"]): under --peer-tls,
    internal routes need one (app.web.asgi.check_peer_certificate). The
    handshake has verified it against the CA before connection_made runs, so
    it is read once per connection, not per request.

    And it ends the connections accepted before a certificate rotation, so a
    certificate or CA that was withdrawn stops being trusted within one
    request, not at the client's leisure: each answers the request it is
    serving or the next one to arrive, then closes; one that sends nothing
    within ROTATION_GRACE_S is closed then. Not at once when idle (uvicorn's
    own shutdown): a connection just accepted is idle until its first request
    is parsed, so closing it dropped a request already sent (seen in CI, as
    "Server disconnected without sending a response").
    """
    import weakref

    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class TlsHttpToolsProtocol(HttpToolsProtocol):
        tls_extension: dict[object, object]  # set in connection_made, before any request
        retiring = False  # a rotation happened since it was accepted: close after the next response

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn's own
            super().connection_made(transport)
            open_connections.add(self)
            ssl_object = transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            names = _certificate_names(ssl_object.getpeercert()) if der else ()
            self.tls_extension = {
                "server_cert": None,
                "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
                "client_cert_name": None,
                "client_cert_error": None,
                "tls_version": None,
                "cipher_suite": None,
                CERT_NAMES: names,  # what --auth-file's cert_cn is matched against (app.web.access)
            }

        def connection_lost(self, exc: Exception | None) -> None:
            open_connections.discard(self)
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.scope["extensions"] = {"tls": self.tls_extension}  # the ASGI TLS extension

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            if self.retiring and self.cycle is not None:
                self.cycle.keep_alive = False  # answer this request, then close

        def retire(self) -> None:
            self.retiring = True
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.keep_alive = False
            else:
                self.loop.call_later(ROTATION_GRACE_S, self.shutdown)  # closes it if still idle then

    open_connections: weakref.WeakSet[TlsHttpToolsProtocol] = weakref.WeakSet()

    def end_connections_of_old_certificates() -> None:
        for connection in list(open_connections):
            connection.retire()

    tls.on_rotate(end_connections_of_old_certificates)
    return TlsHttpToolsProtocol


def _certificate_names(cert: dict[str, Any] | None) -> tuple[str, ...]:
    """A verified certificate's subject CN, then its SANs (DNS, URI, email, IP),
    from ssl's decoded form: the names a users file's cert_cn can match."""
    if not cert:
        return ()
    names = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    names += [value for _kind, value in cert.get("subjectAltName", ())]
    return tuple(dict.fromkeys(names))
