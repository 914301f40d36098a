"""What both clients take from their caller and hand to httpx the same way:
TLS (a CA bundle, a client certificate and key: the options of the nodes'
--tls-ca and --client-cert-auth), the token (sent as Authorization: Bearer),
the connection pool's size. Pure set-up, no I/O beyond reading PEM files.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import httpx

from kvstore_client.errors import BadRequest

DEFAULT_TIMEOUT_S = 5.0  # one operation, retries included (the nodes' peer timeout is 2 s)
# Connections (and so requests in flight) across every node; more callers queue in the
# client, against their own deadline. Small on purpose: httpcore's pool does work in
# proportion to its connections times the requests waiting, at every hand-out. 500
# concurrent async operations on 5 nodes took 14.8 s with 200 connections, 7.1 s with
# 50, 1.5-1.8 s with 10-20 (this loaded 2-core machine, tests/integration/test_client.py).
DEFAULT_MAX_CONNECTIONS = 16
USER_AGENT = "kvstore-client/0.1"


@dataclass(frozen=True)
class Options:
    verify: ssl.SSLContext | bool
    headers: dict[str, str]
    limits: httpx.Limits


def options(
    *,
    token: str | None,
    ca: str | ssl.SSLContext | None,
    cert: str | None,
    key: str | None,
    max_connections: int,
) -> Options:
    """ca: a PEM CA bundle that verifies the nodes (default: the system CAs), or
    a ready SSLContext (then cert/key must be None: it carries them).
    cert, key: PEM client certificate and key, for nodes run with --client-cert-auth."""
    if key is not None and cert is None:
        raise BadRequest("key needs cert: give the client certificate too")
    verify: ssl.SSLContext | bool
    if isinstance(ca, ssl.SSLContext):
        if cert is not None:
            raise BadRequest("cert/key with an SSLContext: load them into the context instead")
        verify = ca
    elif ca is None and cert is None:
        verify = True
    else:
        try:
            context = ssl.create_default_context(cafile=ca)
            if cert is not None:
                context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise BadRequest(f"cannot load the TLS files (ca={ca!r}, cert={cert!r}, key={key!r}): {exc}") from exc
        verify = context
    headers = {"user-agent": USER_AGENT}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return Options(verify=verify, headers=headers, limits=limits)


def timeout(total_s: float, connect_s: float) -> httpx.Timeout:
    """One attempt's httpx timeout: connect bounded apart, the rest by the attempt's share."""
    return httpx.Timeout(total_s, connect=connect_s)


def is_tls_failure(exc: BaseException) -> bool:
    """Whether a transport error was TLS refusing (an unknown CA, a wrong host
    name, a client certificate missing or refused): no retry will change that."""
    seen: BaseException | None = exc
    for _ in range(8):  # httpx -> httpcore -> ssl: a short chain
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
