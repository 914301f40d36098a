"""The client library (client/, kvstore_client) on five nodes, N=3.

1. Routing: GET at `one` and PUT at `quorum`, throughput and p99, through the
   ring-aware AsyncClient (each key straight to one of its replicas) against
   the same client forced through one node (ring_aware=False with node1 as
   its only URL: node1 coordinates every call, forwarding what it does not
   replicate). Same keys, same concurrency, back to back in one run.
2. The client's own CPU per request (this process's CPU time / requests,
   nodes excluded): Client and AsyncClient against plain httpx.Client and
   httpx.AsyncClient sending the same GETs to the same node.

The nodes run on the server core, this process on the load core (as the
other benches: BENCH_SERVER_CORE, BENCH_LOAD_CORE). Results are ratios
within one run; the absolute numbers depend on the machine and its load.

    .venv/bin/python -m bench client [--duration 5] [--concurrency 32] [--markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path

import httpx

from bench.lib.common import APP_DIR, LOAD_CORE, SERVER_CORE, format_table, tempdir
from kvstore_client import AsyncClient, Client
from tests.harness.processes import Cluster

NODES = 5
N = 3
KEYS = [f"bench-{i:05d}" for i in range(2000)]
VALUE = b"v" * 100  # a 100-byte value, as in the other benches
CPU_REQUESTS = 2000  # per client in the CPU comparison


def start(stack: ExitStack, logdir: Path) -> Cluster:
    cluster = Cluster(
        size=NODES,
        log_dir=logdir,
        args=["--replication-factor", str(N), "--log-level", "warning"],
        env_for={f"node{i + 1}": {"PYTHONPATH": str(APP_DIR)} for i in range(NODES)},
        launcher=["taskset", "-c", SERVER_CORE],
        cwd=APP_DIR,
    )
    stack.callback(cluster.stop)
    return cluster.start()


async def load(
    call: Callable[[int], Awaitable[object]], *, concurrency: int, duration_s: float
) -> tuple[float, float, float]:
    """Run `call(i)` from `concurrency` tasks for duration_s: (ops/s, p50 ms, p99 ms)."""
    latencies: list[float] = []
    stop_at = time.monotonic() + duration_s

    async def worker(offset: int) -> None:
        i = offset
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - started)
            i += concurrency

    started = time.monotonic()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    elapsed = time.monotonic() - started
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return len(latencies) / elapsed, statistics.median(latencies) * 1000, p99 * 1000


async def routing(cluster: Cluster, args: argparse.Namespace) -> list[list[str]]:
    seed = cluster.node("node1").url
    rows = []
    results: dict[tuple[str, str], tuple[float, float, float]] = {}
    async with AsyncClient([seed]) as ring_aware, AsyncClient([seed], ring_aware=False) as one_node:
        await ring_aware.put_many({key: VALUE for key in KEYS})
        assert ring_aware.router.view is not None and len(ring_aware.router.view.urls) == NODES
        for op, consistency in (("GET", "one"), ("PUT", "quorum")):
            for name, kv in (("ring-aware", ring_aware), ("through node1", one_node)):

                def call(
                    i: int, kv: AsyncClient = kv, op: str = op, consistency: str = consistency
                ) -> Awaitable[object]:
                    key = KEYS[i % len(KEYS)]
                    if op == "GET":
                        return kv.get(key, consistency=consistency)
                    return kv.put(key, VALUE, consistency=consistency)

                await load(call, concurrency=args.concurrency, duration_s=args.warmup)
                results[op, name] = await load(call, concurrency=args.concurrency, duration_s=args.duration)
                rate, p50, p99 = results[op, name]
                print(f"  {op} at {consistency}, {name}: {rate:,.0f} ops/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms")
            base = results[op, "through node1"][0]
            for name in ("ring-aware", "through node1"):
                rate, p50, p99 = results[op, name]
                rows.append([f"{op} at `{consistency}`", name, f"{rate:,.0f}", f"{p50:.1f}", f"{p99:.1f}",
                             f"{rate / base:.2f}x"])  # fmt: skip
    return rows


def cpu_per_request(cluster: Cluster, args: argparse.Namespace) -> list[list[str]]:
    """This process's CPU time per GET, each client alone, sequential (sync)
    or at the run's concurrency (async), the same key-spread on the same node."""
    url = cluster.node("node1").url
    keys = [KEYS[i % len(KEYS)] for i in range(CPU_REQUESTS)]
    rows: list[list[str]] = []

    def measure(name: str, run: Callable[[], object]) -> float:
        run()  # warm: connections, the ring
        cpu, wall = time.process_time(), time.monotonic()
        run()
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        per = cpu / CPU_REQUESTS * 1e6
        print(f"  {name}: {per:.0f} us CPU per request ({CPU_REQUESTS / wall:,.0f} requests/s)")
        return per

    with Client([url]) as kv, httpx.Client() as plain:
        sync_client = measure("Client (sync)", lambda: [kv.get(key, consistency="one") for key in keys] and None)
        sync_plain = measure(
            "httpx.Client",
            lambda: [plain.get(f"{url}/kv/{key}", params={"consistency": "one"}) for key in keys] and None,
        )

    async def gather_all(get: Callable[[str], Awaitable[object]]) -> None:
        gate = asyncio.Semaphore(args.concurrency)

        async def one(key: str) -> None:
            async with gate:
                await get(key)

        await asyncio.gather(*(one(key) for key in keys))

    async def async_runs() -> tuple[float, float]:
        async with AsyncClient([url]) as akv, httpx.AsyncClient(limits=httpx.Limits(max_connections=16)) as aplain:
            loop_runs: list[float] = []
            for name, get in (
                ("AsyncClient", lambda key: akv.get(key, consistency="one")),
                ("httpx.AsyncClient", lambda key: aplain.get(f"{url}/kv/{key}", params={"consistency": "one"})),
            ):
                await gather_all(get)
                cpu, wall = time.process_time(), time.monotonic()
                await gather_all(get)
                cpu, wall = time.process_time() - cpu, time.monotonic() - wall
                per = cpu / CPU_REQUESTS * 1e6
                print(f"  {name}: {per:.0f} us CPU per request ({CPU_REQUESTS / wall:,.0f} requests/s)")
                loop_runs.append(per)
            return loop_runs[0], loop_runs[1]

    async_client, async_plain = asyncio.run(async_runs())
    rows.append(["sync", f"{sync_client:.0f}", f"{sync_plain:.0f}", f"{sync_client / sync_plain:.2f}x"])
    rows.append(["async", f"{async_client:.0f}", f"{async_plain:.0f}", f"{async_client / async_plain:.2f}x"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each measured run")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent calls of the async load")
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    args = parser.parse_args()
    os.sched_setaffinity(0, {int(LOAD_CORE)})  # this process (the client) on the load core
    with tempdir("kvstore-bench-client-") as tmp, ExitStack() as stack:
        print(f"[client] {NODES} nodes, N={N}, on core {SERVER_CORE}; the client on core {LOAD_CORE}", flush=True)
        cluster = start(stack, Path(tmp))
        print("\n[routing] AsyncClient, ring-aware against forced through node1", flush=True)
        routing_rows = asyncio.run(routing(cluster, args))
        print("\n[cpu] the client's own CPU per GET against plain httpx (node1, consistency=one)", flush=True)
        cpu_rows = cpu_per_request(cluster, args)
    print()
    print(
        format_table(
            ["operation", "client", "ops/s", "p50 ms", "p99 ms", "vs through node1"],
            routing_rows,
            markdown=args.markdown,
        )
    )
    print()
    print(format_table(["mode", "kvstore_client us/req", "httpx us/req", "ratio"], cpu_rows, markdown=args.markdown))


if __name__ == "__main__":
    main()
