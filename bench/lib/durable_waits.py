"""The group-commit mechanism alone, in-process (bench/group_commit.py
--only waits): one LMDB store at --fsync always, W asyncio writers on one
loop, each committing a 100-byte put and waiting until it is durable, either
with a future of its own (`per-write`: Store.wait_durable() awaited through
asyncio.wrap_future, as replicas did before issue 25) or sharing the loop
turn's (`per-turn`: app.coalesce.DurableWaits, as they do now). Writes/s, the
process's CPU per write and the writes per fsync. Always runs the working
tree's app (BENCH_APP_DIR does not apply).
"""

from __future__ import annotations

import asyncio
import resource
import tempfile
import time
from dataclasses import dataclass

from app.clock import HybridClock
from app.coalesce import DurableWaits
from app.storage.base import Record
from app.storage.lmdb_store import LmdbStore

MODES = ("per-write", "per-turn")
VALUE = b"v" * 100


@dataclass
class WaitResult:
    mode: str
    writers: int
    writes_per_s: float
    cpu_us_per_write: float
    writes_per_fsync: float


async def _run(mode: str, writers: int, seconds: float) -> WaitResult:
    with tempfile.TemporaryDirectory(prefix="kvstore-bench-waits-", dir="/var/tmp") as path:
        store = LmdbStore(path=path, node_id="n1", fsync="always", fsync_window_ms=5, tombstone_grace_s=60)
        try:
            clock = HybridClock("n1")
            waits = DurableWaits(store.wait_durable)
            done = 0
            stop = time.perf_counter() + seconds

            async def writer(w: int) -> None:
                nonlocal done
                i = 0
                while time.perf_counter() < stop:
                    store.apply(b"k%d-%d" % (w, i % 100), Record(clock.now(), VALUE))
                    if mode == "per-write":
                        future = store.wait_durable()
                        if future is not None:
                            await asyncio.wrap_future(future)
                    else:
                        await waits.wait()
                    done += 1
                    i += 1

            before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            await asyncio.gather(*(writer(w) for w in range(writers)))
            elapsed, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
            stats = store.sync_stats()
        finally:
            store.close()
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return WaitResult(
        mode=mode,
        writers=writers,
        writes_per_s=done / elapsed,
        cpu_us_per_write=cpu / done * 1e6 if done else 0.0,
        writes_per_fsync=stats.synced_writes / stats.syncs if stats.syncs else 0.0,
    )


def measure_waits(writers: int, seconds: float) -> list[WaitResult]:
    """Both modes at one concurrency, one after the other."""
    results = [asyncio.run(_run(mode, writers, seconds)) for mode in MODES]
    for r in results:
        print(
            f"  {r.mode:9} {r.writers:4} writers: {r.writes_per_s:8,.0f} writes/s, CPU {r.cpu_us_per_write:5.1f} "
            f"us/write, {r.writes_per_fsync:5.1f} writes/fsync",
            flush=True,
        )
    return results
