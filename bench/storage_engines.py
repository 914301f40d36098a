"""The storage engines in-process: LMDB (the shipped engine) against
SQLite in WAL mode (the alternative, measured here only), per operation.

Both engines do the same work per op: a write reads the stored record,
compares versions (last writer wins) and writes the encoded record in one
transaction; a read fetches and decodes one record; a scan walks one ring
arc (1/16 of the circle) by the 8-byte hash prefix of the key. Keys are 16
bytes, values 100 bytes. Then: group-commit throughput under --fsync always
with 1/8/64 concurrent writers on one asyncio loop (as the coordinator drives
it), and, at 1,000,000 keys, load time, file size, RSS and time to reopen.

    .venv/bin/python -m bench storage_engines [--keys 20000] [--big-keys 1000000] [--markdown]

--big-keys 0 skips the 1M-key part (the longest: ~30-60 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from app.clock import LOGICAL_BITS, Version
from app.config import LMDB_WRITEMAP
from app.ring import HASH_SPACE
from app.storage.base import ApplyResult, Record
from app.storage.lmdb_store import LmdbStore, _data_key, _decode, _encode
from bench.lib.common import REPO, format_table

VALUE = b"v" * 100  # 100-byte values, as in every bench
ARC = (0, HASH_SPACE // 16)  # one slice of the ring: ~1/16 of the keys
ALWAYS_PUTS = 400  # single-writer synced puts: each one waits a whole fsync
GROUP_COMMIT_SECONDS = 1.5  # per concurrency level
WRITERS = (1, 8, 64)


def key_of(i: int) -> bytes:
    return f"key-{i:012d}".encode()  # 16 bytes


def record_at(i: int) -> Record:
    return Record(version=Version((1_700_000_000_000 + i) << LOGICAL_BITS, "n1"), value=VALUE)


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


# -- SQLite WAL, doing what the LMDB engine does --------------------------------


class SqliteWal:
    """The same record layout in one WITHOUT ROWID table keyed by (hash + key)."""

    def __init__(self, path: str, *, synchronous: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={synchronous}")
        self.db.execute("CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID")
        self.lock = threading.Lock()  # one connection shared by threads: serialize like LMDB's writer lock

    def apply(self, key: bytes, record: Record) -> ApplyResult:
        data_key = _data_key(key)
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            row = self.db.execute("SELECT v FROM kv WHERE k = ?", (data_key,)).fetchone()
            previous = None if row is None else _decode(row[0])
            if previous is not None and previous.version >= record.version:
                self.db.execute("ROLLBACK")
                return ApplyResult(applied=False, previous=previous)
            self.db.execute("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)", (data_key, _encode(record)))
            self.db.execute("COMMIT")
        return ApplyResult(applied=True, previous=previous)

    def get(self, key: bytes) -> Record | None:
        row = self.db.execute("SELECT v FROM kv WHERE k = ?", (_data_key(key),)).fetchone()
        return None if row is None else _decode(row[0])

    def iter_range(self, start: int, end: int) -> list[tuple[bytes, Record]]:
        low, high = (start + 1).to_bytes(8, "big"), (end + 1).to_bytes(8, "big")
        rows = self.db.execute("SELECT k, v FROM kv WHERE k >= ? AND k < ? ORDER BY k", (low, high))
        return [(k[8:], _decode(v)) for k, v in rows]

    def close(self) -> None:
        self.db.close()


def bare_fsync_us(directory: str) -> float:
    path = os.path.join(directory, "fsync-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        start = time.perf_counter()
        for _ in range(200):
            os.write(fd, b"x" * 128)
            os.fsync(fd)
        return (time.perf_counter() - start) / 200 * 1e6
    finally:
        os.close(fd)


# -- per-op comparison --------------------------------------------------------------


def measure_lmdb(directory: str, keys: int, fsync: str, *, writemap: bool = LMDB_WRITEMAP) -> dict[str, float]:
    store = LmdbStore(
        path=directory, node_id="n1", fsync=fsync, fsync_window_ms=10, tombstone_grace_s=86_400, writemap=writemap
    )
    try:
        result: dict[str, float] = {}
        if fsync == "always":

            def synced_put(i: int) -> None:
                store.apply(key_of(i), record_at(i))
                waiter = store.wait_durable()
                assert waiter is not None
                waiter.result()

            result["put"] = per_op_us(ALWAYS_PUTS, synced_put)
            return result
        result["put"] = per_op_us(keys, lambda i: store.apply(key_of(i), record_at(i)))
        if fsync == "never":
            order = random.Random(1).sample(range(keys), keys)
            result["overwrite"] = per_op_us(keys, lambda i: store.apply(key_of(order[i]), record_at(keys + i)))
            result["get"] = per_op_us(keys, lambda i: store.get(key_of(order[i])))
            result["get_miss"] = per_op_us(keys, lambda i: store.get(b"absent-%d" % i))
            start = time.perf_counter()
            scanned = sum(1 for _ in store.iter_range(*ARC))
            result["scan_per_record"] = (time.perf_counter() - start) / max(scanned, 1) * 1e6
            start = time.perf_counter()
            store.digest(*ARC)
            result["digest_per_record"] = (time.perf_counter() - start) / max(scanned, 1) * 1e6
            start = time.perf_counter()
            store.live_count()
            result["live_count"] = (time.perf_counter() - start) * 1e6
        return result
    finally:
        store.close()


def measure_sqlite(path: str, keys: int, synchronous: str) -> dict[str, float]:
    store = SqliteWal(path, synchronous=synchronous)
    try:
        result: dict[str, float] = {}
        if synchronous == "FULL":
            result["put"] = per_op_us(ALWAYS_PUTS, lambda i: store.apply(key_of(i), record_at(i)))
            return result
        result["put"] = per_op_us(keys, lambda i: store.apply(key_of(i), record_at(i)))
        if synchronous == "OFF":
            order = random.Random(1).sample(range(keys), keys)
            result["overwrite"] = per_op_us(keys, lambda i: store.apply(key_of(order[i]), record_at(keys + i)))
            result["get"] = per_op_us(keys, lambda i: store.get(key_of(order[i])))
            result["get_miss"] = per_op_us(keys, lambda i: store.get(b"absent-%d" % i))
            start = time.perf_counter()
            scanned = len(store.iter_range(*ARC))
            result["scan_per_record"] = (time.perf_counter() - start) / max(scanned, 1) * 1e6
        return result
    finally:
        store.close()


# -- group commit -------------------------------------------------------------------


def group_commit(directory: str, writers: int) -> tuple[float, float, float]:
    """(writes/s, mean writes per fsync, p99 ms) for `writers` concurrent
    asyncio tasks each doing apply + await wait_durable(), on one loop."""
    store = LmdbStore(path=directory, node_id="n1", fsync="always", fsync_window_ms=10, tombstone_grace_s=86_400)
    syncs = 0
    real_sync = store.sync

    def counted_sync() -> None:
        nonlocal syncs
        syncs += 1
        real_sync()

    store.sync = counted_sync
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


def sqlite_full_concurrent(path: str, writers: int) -> float:
    """SQLite FULL has no group commit across connections: writes/s with threads."""
    SqliteWal(path, synchronous="FULL").close()
    count = 0
    lock = threading.Lock()
    deadline = time.perf_counter() + GROUP_COMMIT_SECONDS

    def writer(n: int) -> None:
        nonlocal count
        store = SqliteWal(path, synchronous="FULL")
        store.db.execute("PRAGMA busy_timeout=10000")
        done = 0
        while time.perf_counter() < deadline:
            i = n * 10_000_000 + done
            store.apply(key_of(i), record_at(i))
            done += 1
        store.close()
        with lock:
            count += done

    started = time.perf_counter()
    threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return count / (time.perf_counter() - started)


# -- 1M keys: load, size, RSS, reopen ------------------------------------------------

_CHILD_LOAD = """
import json, sys, time
from bench.storage_engines import key_of, record_at, rss
from app.storage.lmdb_store import LmdbStore
store = LmdbStore(path={path!r}, node_id="n1", fsync="batch", fsync_window_ms=10, tombstone_grace_s=86400)
start = time.perf_counter()
for i in range({n}):
    store.apply(key_of(i), record_at(i))
loaded = time.perf_counter() - start
resident = rss()  # before close: close unmaps the file
store.close()
print(json.dumps({{"load_s": loaded, **resident}}))
"""

_CHILD_OPEN = """
import json, sys, time
start = time.perf_counter()
from bench.storage_engines import key_of, rss
from app.config import NodeConfig
from app.storage import open_store
imported = time.perf_counter()
store = open_store(NodeConfig.from_options({{"node_id": "n1", "data_dir": {path!r}}}))
count = store.live_count()
ready = time.perf_counter()
after_open = rss()
for i in range(0, {n}, 97):
    store.get(key_of(i))
sampled = rss()
scanned = sum(1 for _ in store.iter_range(0, 0))
scan_s = time.perf_counter() - ready
full = rss()
store.close()
print(json.dumps({{"import_s": imported - start, "open_s": ready - imported, "count": count,
                  "rss_open": after_open, "rss_after_gets": sampled, "rss_after_scan": full,
                  "scanned": scanned, "full_scan_s": scan_s}}))
"""


def rss() -> dict[str, int]:
    """This process's resident set, split into anonymous and file-mapped, in KiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0])
    return fields


def run_child(code: str) -> dict:
    # From the repository root: `python -c` puts the working directory first on sys.path, so `bench` imports.
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600, cwd=REPO
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def big(directory: str, n: int) -> dict:
    path = os.path.join(directory, "big")
    load = run_child(_CHILD_LOAD.format(path=path, n=n))
    on_disk = os.stat(os.path.join(path, "data.mdb"))
    opened = run_child(_CHILD_OPEN.format(path=path, n=n))
    return {"load": load, "open": opened, "file_bytes": on_disk.st_size, "disk_bytes": on_disk.st_blocks * 512}


# -- main --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=20_000, help="keys for the per-op comparison")
    parser.add_argument("--big-keys", type=int, default=1_000_000, help="keys for load/RSS/reopen (0: skip)")
    parser.add_argument("--dir", default=None, help="where the temporary databases go (default: system temp)")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    args = parser.parse_args()
    md = args.markdown

    with tempfile.TemporaryDirectory(prefix="kvstore-bench-", dir=args.dir) as tmp:
        fsync_cost = bare_fsync_us(tmp)
        lmdb: dict[str, dict[str, float]] = {}
        sqlite: dict[str, dict[str, float]] = {}
        for policy in ("never", "batch", "always"):
            lmdb[policy] = measure_lmdb(os.path.join(tmp, f"lmdb-{policy}"), args.keys, policy)
        for synchronous in ("OFF", "NORMAL", "FULL"):
            sqlite[synchronous] = measure_sqlite(os.path.join(tmp, f"sqlite-{synchronous}.db"), args.keys, synchronous)
        other_map = measure_lmdb(os.path.join(tmp, "lmdb-other-map"), args.keys, "never", writemap=not LMDB_WRITEMAP)

        print(
            f"# storage engines, in-process; {os.cpu_count()} cores, Python {sys.version.split()[0]}; "
            f"{args.keys} keys of 16 B, values of 100 B; bare write+fsync of 128 B: {fsync_cost:.0f} µs\n"
        )
        rows = []

        def row(op: str, lm: float, sq: float) -> None:
            rows.append([op, f"{lm:.1f}", f"{sq:.1f}", f"{sq / lm:.2f}x"])

        row("put, fsync never (SQLite synchronous=OFF)", lmdb["never"]["put"], sqlite["OFF"]["put"])
        row("put, fsync batch (SQLite synchronous=NORMAL)", lmdb["batch"]["put"], sqlite["NORMAL"]["put"])
        row("put, fsync always, 1 writer (SQLite FULL)", lmdb["always"]["put"], sqlite["FULL"]["put"])
        row("overwrite, random order", lmdb["never"]["overwrite"], sqlite["OFF"]["overwrite"])
        row("get, hit", lmdb["never"]["get"], sqlite["OFF"]["get"])
        row("get, miss", lmdb["never"]["get_miss"], sqlite["OFF"]["get_miss"])
        row("iterate 1/16 arc, per record", lmdb["never"]["scan_per_record"], sqlite["OFF"]["scan_per_record"])
        print(format_table(["op (µs per op)", "LMDB", "SQLite WAL", "SQLite/LMDB"], rows, markdown=md))
        print(
            f"\nLMDB digest of the arc: {lmdb['never']['digest_per_record']:.2f} µs/record; "
            f"live_count(): {lmdb['never']['live_count']:.1f} µs"
        )
        print(
            f"LMDB writemap={LMDB_WRITEMAP} (shipped) vs writemap={not LMDB_WRITEMAP}: "
            f"put {lmdb['never']['put']:.1f} vs {other_map['put']:.1f} µs, "
            f"overwrite {lmdb['never']['overwrite']:.1f} vs {other_map['overwrite']:.1f} µs, "
            f"get {lmdb['never']['get']:.1f} vs {other_map['get']:.1f} µs"
        )

        rows = []
        for writers in WRITERS:
            rate, per_sync, p99 = group_commit(os.path.join(tmp, f"group-{writers}"), writers)
            sqlite_rate = (
                sqlite_full_concurrent(os.path.join(tmp, f"sqlite-group-{writers}.db"), writers)
                if writers <= 8
                else None
            )
            rows.append(
                [
                    str(writers),
                    f"{rate:,.0f}",
                    f"{per_sync:.1f}",
                    f"{p99:.2f}",
                    f"{sqlite_rate:,.0f}" if sqlite_rate is not None else "—",
                ]
            )
        print(
            "\n"
            + format_table(
                ["writers", "LMDB always: writes/s", "writes per fsync", "p99 ms", "SQLite FULL: writes/s (threads)"],
                rows,
                markdown=md,
            )
        )

        if args.big_keys:
            result = big(tmp, args.big_keys)
            raw = args.big_keys * (16 + len(VALUE))
            load, opened = result["load"], result["open"]
            print(
                f"\n{args.big_keys:,} keys: load {load['load_s']:.1f} s "
                f"({load['load_s'] / args.big_keys * 1e6:.1f} µs/put, fsync batch); "
                f"data.mdb {result['disk_bytes'] / 2**20:.0f} MiB on disk (raw keys+values {raw / 2**20:.0f} MiB; "
                f"apparent size {result['file_bytes'] / 2**30:.0f} GiB: the sparse map)"
            )
            print(
                f"  loader RSS after load: {load['VmRSS'] / 1024:.0f} MiB "
                f"(anon {load['RssAnon'] / 1024:.0f}, file-mapped {load['RssFile'] / 1024:.0f})"
            )
            print(
                f"  reopen: imports {opened['import_s'] * 1000:.0f} ms, open_store + live_count "
                f"{opened['open_s'] * 1000:.1f} ms -> {opened['count']:,} live keys"
            )
            for label, key in (
                ("after open", "rss_open"),
                ("after 1% random gets", "rss_after_gets"),
                ("after a full scan", "rss_after_scan"),
            ):
                sample = opened[key]
                print(
                    f"  RSS {label}: {sample['VmRSS'] / 1024:.0f} MiB "
                    f"(anon {sample['RssAnon'] / 1024:.0f}, file-mapped {sample['RssFile'] / 1024:.0f})"
                )
            print(f"  full scan of {opened['scanned']:,} records: {opened['full_scan_s']:.1f} s")


if __name__ == "__main__":
    main()
