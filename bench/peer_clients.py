"""What the peer HTTP client costs a forwarding node, per client library.

A forwarder (a bare ASGI app under the node's uvicorn settings) answers each
GET by fetching a constant from a backend (bench/bare_asgi.py) through one
pooled keep-alive client, and returns it: the shape of a GET through a
non-owner node, minus everything else the node does. Both processes share the
server core, wrk has the other; the forwarder's CPU time per request, minus
what the bare app alone costs per request, is what the client costs.

Clients: httpx.AsyncClient, aiohttp.ClientSession (what app/transport/http.py
uses), and `raw`, a ~60-line keep-alive HTTP/1.1 client on asyncio.Protocol
with httptools' response parser (a candidate for the node's hot path).

    .venv/bin/python -m bench peer_clients [--duration 5] [--clients httpx,aiohttp,raw] [--markdown]
    .venv/bin/python -m bench peer_clients serve --client aiohttp --port P --backend http://127.0.0.1:Q
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from bench.bare_asgi import uvicorn_config

CLIENTS = ("httpx", "aiohttp", "raw")
POOL = 64  # keep-alive connections to the backend: one per wrk connection
TIMEOUT_S = 2.0  # the node's default peer timeout (app/config.py)
FORWARD_PATH = "/kv/bench"


# -- the candidate: a minimal keep-alive HTTP/1.1 client ---------------------------


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self) -> None:
        import httptools

        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[tuple[int, list[tuple[bytes, bytes]], bytes]] | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.reusable = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream connection's transport is one

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception as exc:  # noqa: BLE001 - httptools.HttpParserError and friends: any of them ends the connection
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self._fail(exc or ConnectionResetError("peer closed the connection"))

    def _fail(self, exc: BaseException) -> None:
        self.reusable = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.headers, self.body = [], []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.reusable = self.parser.should_keep_alive()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((self.parser.get_status_code(), self.headers, b"".join(self.body)))


class RawClient:
    """A pool of _Connections to one host:port; the request line is built by hand."""

    def __init__(self, base_url: str, *, timeout_s: float) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.host_header = parts.netloc.encode()
        self.timeout_s = timeout_s
        self.idle: list[_Connection] = []

    async def get(self, path: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        loop = asyncio.get_running_loop()
        conn = self.idle.pop() if self.idle else None
        if conn is None:
            _, conn = await loop.create_connection(_Connection, self.host, self.port)
        waiter = conn.waiter = loop.create_future()
        assert conn.transport is not None
        conn.transport.write(b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path.encode(), self.host_header))
        timer = loop.call_later(self.timeout_s, conn._fail, TimeoutError("peer timed out"))
        try:
            result = await waiter
        finally:
            timer.cancel()
            conn.waiter = None
        if conn.reusable:
            self.idle.append(conn)
        return result

    async def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()


# -- the forwarder --------------------------------------------------------------


def forwarder(client_name: str, backend: str) -> Any:
    state: dict[str, Any] = {}

    async def start() -> None:
        if client_name == "httpx":
            import httpx

            state["client"] = httpx.AsyncClient(
                base_url=backend,
                timeout=TIMEOUT_S,
                limits=httpx.Limits(max_connections=POOL, max_keepalive_connections=POOL),
            )
        elif client_name == "aiohttp":
            import aiohttp

            state["client"] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=POOL, keepalive_timeout=60),
                timeout=aiohttp.ClientTimeout(total=TIMEOUT_S),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
            )
        else:
            state["client"] = RawClient(backend, timeout_s=TIMEOUT_S)

    async def fetch() -> tuple[int, bytes]:
        client = state["client"]
        if client_name == "httpx":
            resp = await client.get(FORWARD_PATH)
            return resp.status_code, resp.content
        if client_name == "aiohttp":
            async with client.get(backend + FORWARD_PATH) as resp:
                return resp.status, await resp.read()
        status, _, body = await client.get(FORWARD_PATH)
        return status, body

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await start()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    client = state.get("client")
                    if client is not None:
                        await (client.aclose() if client_name == "httpx" else client.close())
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            status, body = 200, b"OK"
        else:
            status, body = await fetch()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


def serve(argv: list[str]) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="peer_clients.py serve")
    parser.add_argument("--client", choices=CLIENTS, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", required=True)
    args = parser.parse_args(argv)
    uvicorn.Server(uvicorn_config(forwarder(args.client, args.backend), host="127.0.0.1", port=args.port)).run()


# -- the driver --------------------------------------------------------------------


def bench(argv: list[str]) -> int:
    from contextlib import ExitStack

    from bench.lib.common import (
        BENCH_DIR,
        PYTHON,
        format_table,
        free_port,
        machine_summary,
        require_wrk,
        run_wrk,
        serving,
        tempdir,
        write_lua,
    )

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of discarded warm-up before each run")
    parser.add_argument("--clients", default=",".join(CLIENTS), help="comma-separated subset of " + ",".join(CLIENTS))
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    clients = [c for c in args.clients.split(",") if c]
    if unknown := set(clients) - set(CLIENTS):
        sys.exit(f"bench: unknown client(s) {', '.join(sorted(unknown))}")
    require_wrk()
    print(f"machine: {machine_summary()}", flush=True)
    rows = []
    with tempdir("kvstore-bench-peers-") as tmp:
        logdir = Path(tmp)
        lua = write_lua(logdir, "fixed", "-- fixed GET")
        backend_port = free_port()
        backend_url = f"http://127.0.0.1:{backend_port}"
        with serving(
            "backend",
            [PYTHON, str(BENCH_DIR / "bare_asgi.py"), "--port", str(backend_port)],
            health_urls=[backend_url],
            logdir=logdir,
        ) as backend:
            bare = run_wrk(
                "bare ASGI (no forwarding)",
                backend_url + FORWARD_PATH,
                lua=lua,
                duration_s=args.duration,
                warmup_s=args.warmup,
                server_pids=backend.pids(),
            )
            print(f"  {bare.label:<34} {bare.rps:>8,.0f} req/s  {bare.cpu_us_per_request:5.0f} us CPU/req", flush=True)
            rows.append(
                [
                    bare.label,
                    f"{bare.rps:,.0f}",
                    f"{bare.p50_ms:.2f}",
                    f"{bare.p99_ms:.2f}",
                    "1.00",
                    f"{bare.cpu_us_per_request:.0f}",
                    "-",
                    "-",
                    str(bare.errors),
                ]
            )
            for name in clients:
                port = free_port()
                with ExitStack() as stack:
                    fwd = stack.enter_context(
                        serving(
                            f"forwarder-{name}",
                            [
                                PYTHON,
                                "-m",  # in the server's directory (APP_DIR): a snapshot there needs bench/ too
                                "bench.peer_clients",
                                "serve",
                                "--client",
                                name,
                                "--port",
                                str(port),
                                "--backend",
                                backend_url,
                            ],
                            health_urls=[f"http://127.0.0.1:{port}"],
                            logdir=logdir,
                        )
                    )
                    result = run_wrk(
                        f"forward via {name}",
                        f"http://127.0.0.1:{port}{FORWARD_PATH}",
                        lua=lua,
                        duration_s=args.duration,
                        warmup_s=args.warmup,
                        server_pids=fwd.pids(),
                        other_pids=backend.pids(),
                    )
                forwarder_us = result.cpu_us_per_request
                client_us = forwarder_us - bare.cpu_us_per_request
                backend_us = result.other_cpu_s / result.requests * 1e6 if result.requests else 0.0
                print(
                    f"  {result.label:<34} {result.rps:>8,.0f} req/s  {forwarder_us:5.0f} us CPU/req in the forwarder"
                    f" (client ~{client_us:.0f} us)",
                    flush=True,
                )
                rows.append(
                    [
                        result.label,
                        f"{result.rps:,.0f}",
                        f"{result.p50_ms:.2f}",
                        f"{result.p99_ms:.2f}",
                        f"{result.rps / bare.rps:.3f}",
                        f"{forwarder_us:.0f}",
                        f"{client_us:.0f}",
                        f"{backend_us:.0f}",
                        str(result.errors),
                    ]
                )
    headers = [
        "server",
        "req/s",
        "p50 ms",
        "p99 ms",
        "x bare",
        "forwarder CPU us/req",
        "client us/req (fwd - bare)",
        "backend CPU us/req",
        "errors",
    ]
    print()
    print(format_table(headers, rows, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2:])
    else:
        sys.exit(bench(sys.argv[1:]))
