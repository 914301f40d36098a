"""The harness's TCP proxy (tests/harness/proxy.py) against a loopback echo
server: it forwards, its delay holds only the bytes sent towards the target,
and its cuts drop (blackhole) or refuse (reset) until healed. The fault tests
rely on the cuts, bench/lib/cluster_slow.py on the delay."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from tests.harness.proxy import Proxy, ProxyLoop

DELAY_S = 0.2  # long against loopback's microseconds, short for a test
QUIET_S = 0.3  # a blackholed request gets no answer in this long


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(data)


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    loop = ProxyLoop()
    try:
        yield Proxy(loop=loop, target_url=f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        loop.close()
        server.shutdown()
        server.server_close()


def round_trip(proxy: Proxy, payload: bytes = b"ping", *, timeout: float = 5.0) -> tuple[bytes, float]:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout) as sock:
        started = time.monotonic()
        sock.sendall(payload)
        answer = sock.recv(4096)
        return answer, time.monotonic() - started


def test_forwards_both_ways_and_counts_connections(proxy: Proxy) -> None:
    assert round_trip(proxy)[0] == b"ping"
    assert round_trip(proxy, b"pong")[0] == b"pong"
    assert proxy.connections_total == 2


def test_delay_holds_only_what_goes_to_the_target(proxy: Proxy) -> None:
    proxy.delay = DELAY_S
    answer, took = round_trip(proxy)
    assert answer == b"ping"
    assert DELAY_S <= took < 2 * DELAY_S, took  # once, on the way there; answers come straight back
    proxy.delay = 0.0
    assert round_trip(proxy)[1] < DELAY_S


def test_blackhole_drops_silently_and_heal_restores(proxy: Proxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5.0) as held:
        held.sendall(b"before")
        assert held.recv(4096) == b"before"
        proxy.cut("blackhole")
        held.sendall(b"during")
        held.settimeout(QUIET_S)
        with pytest.raises(TimeoutError):
            held.recv(4096)  # no answer, and no close either: only a timeout tells
    with pytest.raises(TimeoutError):
        round_trip(proxy, timeout=QUIET_S)  # new connections are accepted and ignored
    proxy.heal()
    assert round_trip(proxy)[0] == b"ping"


def test_reset_refuses_until_healed(proxy: Proxy) -> None:
    proxy.cut("reset")
    with pytest.raises((ConnectionResetError, ConnectionRefusedError, BrokenPipeError)):
        answer, _ = round_trip(proxy)
        if not answer:  # a reset can surface as an empty read on some kernels
            raise ConnectionResetError
    proxy.heal()
    assert round_trip(proxy)[0] == b"ping"
