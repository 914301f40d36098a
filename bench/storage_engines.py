"""The durable storage engines in-process: LMDB (the shipped default) against
RocksDB (the log-structured engine, --storage rocksdb), on our workload.

Both engines do the same work per op through the Store interface: a write
reads the stored record, compares versions (last writer wins) and writes the
encoded record with its index and meta changes in one transaction (LMDB) or
one WriteBatch (RocksDB); a read fetches and decodes one record; an arc
iteration walks 1/16 of the ring by the 8-byte hash prefix of the key. Keys
are 16 bytes, values 100 random bytes. (SQLite-WAL, measured here before LMDB was
chosen, is in BENCHMARKS.md's history.)

1. Per op, over --keys preloaded keys (default 100,000), --fsync never (the
   engine's CPU alone) unless said: PUT as random overwrites of preloaded
   keys, PUT at --fsync batch, GET (hits in random order, misses), arc
   iteration and the arc's digest per record (best of 3 walks), live_count().
2. --fsync always: one writer's synced PUT, and group commit with 8 and 64
   concurrent writers on one asyncio loop (as the coordinator drives it).
3. At --big-keys (default 1,000,000), each in its own child process:
   filling (apply_many, 1,000 per batch), start to ready (open_store +
   live_count + the saved digest index restored: what a node waits for
   before /ready), RSS (VmRSS, RssAnon, RssFile) after GETs over every key,
   disk use (`du` of the data dir) after --overwrites rounds of overwriting
   every key: right after, after the engine's own compaction settles
   (RocksDB: no compaction pending or running), and after a manual full
   compaction; then recovery after SIGKILL at --fsync always: 8 writer
   threads acknowledge writes on top of the big store, the child is killed,
   and a fresh process reopens it: acknowledged writes lost (must be 0) and
   restart-to-ready time.

    flock /tmp/kvstore-bench.lock .venv/bin/python -m bench storage_engines [--keys 100000] [--big-keys 1000000]
        [--overwrites 10] [--markdown]

--big-keys 0 skips part 3 (the longest: a few minutes per engine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from app.clock import LOGICAL_BITS, Version
from app.ring import HASH_SPACE
from app.storage import LmdbStore, RocksDbStore, Store
from app.storage.base import Record
from bench.lib.common import REPO, format_table

ENGINES = ("lmdb", "rocksdb")
# 100-byte values, as in every bench, but random (a pool of distinct ones): a repeated
# value would compress to nothing in RocksDB's blocks and flatter its disk use.
VALUES = [random.Random(7 + i).randbytes(100) for i in range(4096)]
VALUE = VALUES[0]
ARC = (0, HASH_SPACE // 16)  # one slice of the ring: ~1/16 of the keys
ALWAYS_PUTS = 300  # single-writer synced puts: each one waits a whole fsync
GROUP_COMMIT_SECONDS = 1.5  # per concurrency level
WRITERS = (8, 64)
BATCH = 1000  # records per apply_many when filling
CRASH_WRITERS = 8
CRASH_ACKS = 3000  # acknowledged writes before the SIGKILL


def key_of(i: int) -> bytes:
    return f"key-{i:012d}".encode()  # 16 bytes


def record_at(i: int) -> Record:
    return Record(version=Version((1_700_000_000_000 + i) << LOGICAL_BITS, "n1"), value=VALUES[i % len(VALUES)])


def open_engine(engine: str, path: str, fsync: str) -> Store:
    kind = {"lmdb": LmdbStore, "rocksdb": RocksDbStore}[engine]
    return kind(path=path, node_id="n1", fsync=fsync, fsync_window_ms=10, tombstone_grace_s=86_400)


def per_op_us(count: int, op: Callable[[int], object], *, rounds: int = 5) -> float:
    """Mean µs per op over the best of `rounds` consecutive slices of the
    count: the machine is shared, and the best slice is the least disturbed."""
    size = max(count // rounds, 1)
    best = float("inf")
    for first in range(0, count, size):
        start = time.perf_counter()
        for i in range(first, min(first + size, count)):
            op(i)
        best = min(best, (time.perf_counter() - start) / (min(first + size, count) - first))
    return best * 1e6


def best_of(rounds: int, op: Callable[[], object]) -> float:
    """The fastest of `rounds` runs of op, in seconds (the first warms the caches)."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        op()
        best = min(best, time.perf_counter() - start)
    return best


def fill(store: Store, n: int, *, offset: int = 0, order: list[int] | None = None) -> None:
    """Every key 0..n-1 written once, at versions offset + i, BATCH per apply_many."""
    keys = order if order is not None else range(n)
    batch: list[tuple[bytes, Record]] = []
    for i in keys:
        batch.append((key_of(i), record_at(offset + i)))
        if len(batch) == BATCH:
            store.apply_many(batch)
            batch = []
    if batch:
        store.apply_many(batch)


# -- 1. per op ---------------------------------------------------------------------------


def measure_ops(engine: str, directory: str, keys: int) -> dict[str, float]:
    store = open_engine(engine, os.path.join(directory, f"{engine}-ops"), "never")
    result: dict[str, float] = {}
    try:
        fill(store, keys)
        rng = random.Random(1)
        order = [rng.randrange(keys) for _ in range(keys)]
        result["put"] = per_op_us(keys, lambda i: store.apply(key_of(order[i]), record_at(keys + i)))
        result["get"] = per_op_us(keys, lambda i: store.get(key_of(order[-i - 1])))
        result["get_miss"] = per_op_us(keys, lambda i: store.get(b"absent-%09d" % i))
        scanned = sum(1 for _ in store.iter_range(*ARC))
        result["scan_per_record"] = best_of(3, lambda: sum(1 for _ in store.iter_range(*ARC))) / scanned * 1e6
        result["digest_per_record"] = best_of(3, lambda: store.scan_digest(*ARC)) / scanned * 1e6
        start = time.perf_counter()
        for _ in range(1000):
            store.live_count()
        result["live_count"] = (time.perf_counter() - start) / 1000 * 1e6
    finally:
        store.close()
    batch_store = open_engine(engine, os.path.join(directory, f"{engine}-batch"), "batch")
    try:
        fill(batch_store, keys)
        rng = random.Random(2)
        order = [rng.randrange(keys) for _ in range(keys)]
        result["put_batch"] = per_op_us(keys, lambda i: batch_store.apply(key_of(order[i]), record_at(keys + i)))
    finally:
        batch_store.close()
    return result


# -- 2. fsync always ----------------------------------------------------------------------


def synced_put_us(engine: str, directory: str) -> float:
    store = open_engine(engine, os.path.join(directory, f"{engine}-always-1"), "always")

    def synced_put(i: int) -> None:
        store.apply(key_of(i), record_at(i))
        waiter = store.wait_durable()
        assert waiter is not None
        waiter.result()

    try:
        return per_op_us(ALWAYS_PUTS, synced_put)
    finally:
        store.close()


def group_commit(engine: str, directory: str, writers: int) -> tuple[float, float, float]:
    """(writes/s, mean writes per fsync, p99 ms) for `writers` concurrent
    asyncio tasks each doing apply + await wait_durable(), on one loop."""
    store = open_engine(engine, os.path.join(directory, f"{engine}-group-{writers}"), "always")
    flusher = store._flusher  # type: ignore[attr-defined] # both durable engines keep one; its sync is counted
    syncs = 0
    real_sync = flusher._sync

    def counted_sync() -> None:
        nonlocal syncs
        syncs += 1
        real_sync()

    flusher._sync = counted_sync
    latencies: list[float] = []

    async def writer(n: int, deadline: float) -> int:
        done = 0
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            i = n * 10_000_000 + done
            store.apply(key_of(i), record_at(i))
            waiter = store.wait_durable()
            assert waiter is not None
            await asyncio.wrap_future(waiter)
            latencies.append(time.perf_counter() - began)
            done += 1
        return done

    async def run() -> int:
        deadline = time.perf_counter() + GROUP_COMMIT_SECONDS
        return sum(await asyncio.gather(*(writer(n, deadline) for n in range(writers))))

    try:
        started = time.perf_counter()
        total = asyncio.run(run())
        elapsed = time.perf_counter() - started
    finally:
        store.close()
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)] * 1000 if latencies else 0.0
    return total / elapsed, total / max(syncs, 1), p99


# -- 3. big: each step in a child process (RSS and start-up are a process's own) ----------

_CHILD_FILL = """
import json, time
from bench.storage_engines import fill, open_engine
store = open_engine({engine!r}, {path!r}, "batch")
start = time.perf_counter()
fill(store, {n})
loaded = time.perf_counter() - start
store.close()
print(json.dumps({{"fill_s": loaded}}))
"""

_CHILD_OPEN = """
import json, random, time
start = time.perf_counter()
from bench.storage_engines import key_of, rss
from app.config import NodeConfig
from app.ring import HashRing
from app.storage import open_store
imported = time.perf_counter()
store = open_store(NodeConfig.from_options({{"node_id": "n1", "data_dir": {path!r}, "fsync": "batch"}}))
count = store.live_count()
restored = store.digests_ready()
ready = time.perf_counter()
after_open = rss()
order = random.Random(3).sample(range({n}), {n})
got = time.perf_counter()
for i in order:
    store.get(key_of(i))
get_us = (time.perf_counter() - got) / {n} * 1e6
after_gets = rss()
# The digest index as a node keeps it (aligned to a 3-node ring): saved at close, restored at the next open.
store.align_digests(HashRing(["n1", "n2", "n3"]).ranges())
store.wait_digests(600)
store.close()
print(json.dumps({{"import_s": imported - start, "open_s": ready - imported, "count": count, "restored": restored,
                  "rss_open": after_open, "rss_after_gets": after_gets, "get_us": get_us}}))
"""

_CHILD_OVERWRITE = """
import json, random, subprocess, time
from bench.storage_engines import du_bytes, fill, open_engine
store = open_engine({engine!r}, {path!r}, "batch")
start = time.perf_counter()
for round in range({rounds}):
    order = random.Random(round).sample(range({n}), {n})
    fill(store, {n}, offset=(round + 1) * {n}, order=order)
elapsed = time.perf_counter() - start
right_after = du_bytes({path!r})
settle_started = time.perf_counter()
db = getattr(store, "_db", None)
if db is not None:  # RocksDB: wait until its own background compaction has nothing left to do
    busy = ("rocksdb.compaction-pending", "rocksdb.num-running-compactions", "rocksdb.num-running-flushes")
    while any(db.property_int_value(name) for name in busy):
        time.sleep(0.2)
settle_s = time.perf_counter() - settle_started
settled = du_bytes({path!r})
compacted = settled
if db is not None:
    db.compact_range(None, None)
    compacted = du_bytes({path!r})
store.close()
print(json.dumps({{"overwrite_s": elapsed, "right_after": right_after, "settled": settled, "settle_s": settle_s,
                  "compacted": compacted, "closed": du_bytes({path!r})}}))
"""

_CHILD_CRASH_WRITER = """
import sys, threading
from app.clock import HybridClock
from app.storage import Record
from bench.storage_engines import open_engine
store = open_engine({engine!r}, {path!r}, "always")
clock = HybridClock("n1")
out = threading.Lock()
print("OPEN", flush=True)

def writer(t):
    i = 0
    while True:
        key = f"crash-{{t}}-{{i}}".encode()
        store.apply(key, Record(version=clock.now(), value=b"v" * 100))  # checked after the crash
        store.wait_durable().result()
        with out:
            sys.stdout.write(key.decode() + "\\n")
            sys.stdout.flush()
        i += 1

threads = [threading.Thread(target=writer, args=(t,), daemon=True) for t in range({writers})]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
"""

_CHILD_RECOVER = """
import json, sys, time
start = time.perf_counter()
from app.config import NodeConfig
from app.storage import open_store
imported = time.perf_counter()
store = open_store(NodeConfig.from_options({{"node_id": "n1", "data_dir": {path!r}, "fsync": "always"}}))
count = store.live_count()
ready = time.perf_counter()
acked = open({acks!r}).read().split()
lost = [k for k in acked if (r := store.get(k.encode())) is None or r.value != b"v" * 100]
store.close()
print(json.dumps({{"open_s": ready - imported, "count": count, "acked": len(acked), "lost": len(lost)}}))
"""


def rss() -> dict[str, int]:
    """This process's resident set, split into anonymous and file-mapped, in KiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0])
    return fields


def du_bytes(path: str) -> int:
    """Disk use of a data dir as `du` counts it (allocated blocks; LMDB's sparse map counts only what is written)."""
    out = subprocess.run(["du", "-sk", path], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0]) * 1024


def run_child(code: str) -> dict:
    # From the repository root: `python -c` puts the working directory first on sys.path, so `bench` imports.
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=1800, cwd=REPO
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def crash_and_recover(engine: str, path: str, scratch: str) -> dict:
    """SIGKILL a child acknowledging --fsync always writes on the store, then reopen it in a fresh process."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD_CRASH_WRITER.format(engine=engine, path=path, writers=CRASH_WRITERS)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: killed as one, never by name
    )
    acked: list[str] = []
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "OPEN", child.stderr.read() if child.stderr else ""
        while len(acked) < CRASH_ACKS:
            line = child.stdout.readline()
            if not line:
                raise RuntimeError(
                    f"bench: the crash writer exited early: {child.stderr.read() if child.stderr else ''}"
                )
            acked.append(line.strip())
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        acked += [line.strip() for line in child.stdout.read().splitlines() if line.strip()]
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()
    acks = os.path.join(scratch, f"{engine}-acks.txt")
    Path(acks).write_text("\n".join(acked))
    return run_child(_CHILD_RECOVER.format(path=path, acks=acks))


def big(engine: str, directory: str, n: int, rounds: int) -> dict:
    path = os.path.join(directory, f"{engine}-big")
    print(f"  {engine}: filling {n:,} keys", file=sys.stderr, flush=True)
    filled = run_child(_CHILD_FILL.format(engine=engine, path=path, n=n))
    filled_du = du_bytes(path)
    run_child(_CHILD_OPEN.format(path=path, n=n))  # a first open: aligns and saves the digest index
    opened = run_child(_CHILD_OPEN.format(path=path, n=n))
    print(f"  {engine}: SIGKILL at --fsync always", file=sys.stderr, flush=True)
    crashed = crash_and_recover(engine, path, directory)
    print(f"  {engine}: {rounds} overwrites per key", file=sys.stderr, flush=True)
    overwritten = run_child(_CHILD_OVERWRITE.format(engine=engine, path=path, n=n, rounds=rounds)) if rounds else {}
    return {"fill": filled, "fill_du": filled_du, "open": opened, "crash": crashed, "overwrite": overwritten}


# -- main --------------------------------------------------------------------------------


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=100_000, help="preloaded keys for the per-op comparison")
    parser.add_argument("--big-keys", type=int, default=1_000_000, help="keys for part 3 (0: skip it)")
    parser.add_argument("--overwrites", type=int, default=10, help="overwrites of every key in part 3 (0: skip)")
    parser.add_argument("--dir", default=None, help="where the temporary databases go (default: system temp)")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    args = parser.parse_args()
    md = args.markdown

    with tempfile.TemporaryDirectory(prefix="kvstore-bench-", dir=args.dir) as tmp:
        print(
            f"# LMDB against RocksDB, in-process; {os.cpu_count()} cores, Python {sys.version.split()[0]}; "
            f"16-byte keys, 100-byte values; load average {os.getloadavg()[0]:.2f} at start\n"
        )
        ops = {engine: measure_ops(engine, tmp, args.keys) for engine in ENGINES}
        rows = []
        for label, name in (
            (f"PUT, random overwrite of {args.keys:,} keys, fsync never", "put"),
            ("PUT, random overwrite, fsync batch", "put_batch"),
            ("GET, hit, random order", "get"),
            ("GET, miss", "get_miss"),
            ("arc iteration (1/16 of the ring), per record", "scan_per_record"),
            ("arc digest by scan, per record", "digest_per_record"),
            ("live_count()", "live_count"),
        ):
            a, b = ops["lmdb"][name], ops["rocksdb"][name]
            rows.append([label, f"{a:.2f}", f"{b:.2f}", f"{a / b:.2f}x"])
        print(
            format_table(["op (µs per op)", "LMDB", "RocksDB", "LMDB/RocksDB (>1: RocksDB faster)"], rows, markdown=md)
        )

        rows = []
        synced = {engine: synced_put_us(engine, tmp) for engine in ENGINES}
        rows.append(["1 (µs per PUT)", f"{synced['lmdb']:.0f}", f"{synced['rocksdb']:.0f}", "", "", "", ""])
        for writers in WRITERS:
            gl = group_commit("lmdb", tmp, writers)
            gr = group_commit("rocksdb", tmp, writers)
            rows.append(
                [
                    f"{writers} (writes/s)",
                    f"{gl[0]:,.0f}",
                    f"{gr[0]:,.0f}",
                    f"{gl[1]:.1f}",
                    f"{gr[1]:.1f}",
                    f"{gl[2]:.2f}",
                    f"{gr[2]:.2f}",
                ]
            )
        print(
            "\n--fsync always, group commit\n"
            + format_table(
                [
                    "writers",
                    "LMDB",
                    "RocksDB",
                    "LMDB writes/fsync",
                    "RocksDB writes/fsync",
                    "LMDB p99 ms",
                    "RocksDB p99 ms",
                ],
                rows,
                markdown=md,
            )
        )

        if not args.big_keys:
            return
        n = args.big_keys
        bigs = {engine: big(engine, tmp, n, args.overwrites) for engine in ENGINES}
        lm, rx = bigs["lmdb"], bigs["rocksdb"]

        def pair(label: str, a: float, b: float, fmt: Callable[[float], str], ratio: bool = True) -> list[str]:
            return [label, fmt(a), fmt(b), f"{a / b:.2f}x" if ratio and b else ""]

        def secs(x: float) -> str:
            return f"{x:.2f}"

        rows = [
            pair(
                f"fill {n:,} keys (apply_many x{BATCH}, fsync batch), s",
                lm["fill"]["fill_s"],
                rx["fill"]["fill_s"],
                secs,
            ),
            pair("data dir after the fill, MiB (du)", lm["fill_du"], rx["fill_du"], mib),
            pair(
                "start to ready: open + live_count + digests restored, s",
                lm["open"]["open_s"],
                rx["open"]["open_s"],
                secs,
            ),
            pair(f"GET over all {n:,} keys, random order, µs each", lm["open"]["get_us"], rx["open"]["get_us"], secs),
        ]
        for field in ("VmRSS", "RssAnon", "RssFile"):
            rows.append(
                pair(
                    f"{field} after the GETs, MiB",
                    lm["open"]["rss_after_gets"][field] * 1024,
                    rx["open"]["rss_after_gets"][field] * 1024,
                    mib,
                )
            )
        rows.append(
            pair(
                "VmRSS right after open, MiB",
                lm["open"]["rss_open"]["VmRSS"] * 1024,
                rx["open"]["rss_open"]["VmRSS"] * 1024,
                mib,
            )
        )
        crash_l, crash_r = lm["crash"], rx["crash"]
        rows.append(
            [
                "SIGKILL at --fsync always: acknowledged / lost",
                f"{crash_l['acked']:,} / {crash_l['lost']}",
                f"{crash_r['acked']:,} / {crash_r['lost']}",
                "",
            ]
        )
        rows.append(
            pair("restart after SIGKILL to ready (open + live_count), s", crash_l["open_s"], crash_r["open_s"], secs)
        )
        if args.overwrites:
            ow_l, ow_r = lm["overwrite"], rx["overwrite"]
            rounds = args.overwrites
            rows += [
                pair(
                    f"{rounds} overwrites of every key (apply_many x{BATCH}), s",
                    ow_l["overwrite_s"],
                    ow_r["overwrite_s"],
                    secs,
                ),
                pair(
                    f"disk after {rounds} overwrites per key, right after, MiB (du)",
                    ow_l["right_after"],
                    ow_r["right_after"],
                    mib,
                ),
                pair("  once the engine's own compaction settled, MiB", ow_l["settled"], ow_r["settled"], mib),
                pair(
                    "  after a manual full compaction (RocksDB; LMDB: same), MiB",
                    ow_l["compacted"],
                    ow_r["compacted"],
                    mib,
                ),
                pair("  after close, MiB", ow_l["closed"], ow_r["closed"], mib),
            ]
            rows.append(["  RocksDB settling took, s", "", secs(ow_r["settle_s"]), ""])
        raw = n * (16 + len(VALUE))
        print(f"\n{n:,} keys (raw keys + values {mib(raw)} MiB); each step in a fresh child process")
        print(format_table(["measure", "LMDB", "RocksDB", "LMDB/RocksDB"], rows, markdown=md))
        for engine, result in bigs.items():
            if not result["open"]["restored"]:
                print(f"note: {engine} rebuilt its digest index at the second open (it should have restored it)")


if __name__ == "__main__":
    main()
