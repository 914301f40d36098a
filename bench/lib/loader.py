"""A small async HTTP/1.1 loader for setting up the cluster benchmark: the
preloads, and the 100,000 writes the converge section makes while a node is
down. Keep-alive connections spread over the given nodes, each write retried
on a fresh connection. Not what is measured (wrk is). Stdlib only.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import Counter
from collections.abc import Sequence

from bench.lib.cluster_nodes import SPREAD_KEYS, VALUE

LOADER_CONNECTIONS = 64  # as many as wrk uses: the nodes see the same concurrency
WRITE_ATTEMPTS = 5  # per write, each on a fresh connection: rides out a node's restart or a refused write
ANSWER_TIMEOUT_S = 10  # a quorum write answers in milliseconds; 10 s means the connection is stuck


async def _put_all(
    urls: Sequence[str], paths: Sequence[str], body: bytes, connections: int, context: ssl.SSLContext | None = None
) -> tuple[int, int]:
    """PUT body to every path, over `connections` keep-alive connections spread
    over urls; each write is tried (a new connection each time) up to WRITE_ATTEMPTS times.
    Returns (acknowledged, failed)."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for path in paths:
        queue.put_nowait(path)
    acked = failed = 0
    reasons: Counter[str] = Counter()

    async def worker(url: str) -> None:
        nonlocal acked, failed
        tls = context if url.startswith("https://") else None
        host, _, port = url.removeprefix("https://").removeprefix("http://").partition(":")
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while not queue.empty():
            path = queue.get_nowait()
            request = (f"PUT {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
            for _attempt in range(WRITE_ATTEMPTS):
                try:
                    if conn is None:
                        conn = await asyncio.open_connection(host, int(port), ssl=tls)
                    reader, writer = conn
                    writer.write(request)
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), ANSWER_TIMEOUT_S)
                    status = int(head.split(b" ", 2)[1])
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    if length:
                        await reader.readexactly(length)
                    if 200 <= status < 300:
                        acked += 1
                        break
                    reasons[f"HTTP {status}"] += 1
                except (
                    OSError,
                    asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError,
                    ValueError,
                ) as exc:  # OSError: timeouts too
                    reasons[type(exc).__name__] += 1
                    if conn is not None:
                        conn[1].close()
                    conn = None
                    await asyncio.sleep(0.05)
            else:
                failed += 1
        if conn is not None:
            conn[1].close()

    await asyncio.gather(*(worker(urls[i % len(urls)]) for i in range(connections)))
    if reasons:
        print(f"    loader: {sum(reasons.values())} failed attempts: {dict(reasons.most_common(5))}", flush=True)
    return acked, failed


def put_all(
    urls: Sequence[str],
    paths: Sequence[str],
    body: bytes = VALUE,
    connections: int = LOADER_CONNECTIONS,
    context: ssl.SSLContext | None = None,
) -> tuple[int, int, float]:
    started = time.monotonic()
    acked, failed = asyncio.run(_put_all(urls, paths, body, connections, context))
    return acked, failed, time.monotonic() - started


def preload(url: str, count: int = SPREAD_KEYS, context: ssl.SSLContext | None = None) -> None:
    acked, failed, _ = put_all([url], [f"/kv/s{i}" for i in range(count)], connections=16, context=context)
    if failed or acked != count:
        raise RuntimeError(f"bench: preloading {count} keys through {url}: {acked} acknowledged, {failed} failed")
