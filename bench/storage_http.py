"""The storage engines through HTTP: one node per storage engine, then 1,000,000 keys.

Part 1, throughput: one node (replication factor 1, so every key is local)
with `--storage memory`, then for each durable engine (--engines, default
lmdb and rocksdb) `--fsync batch`, then the same data dir with `--fsync
always`, then memory again (a drift check: the ratios divide by the higher of
the two memory runs; rocksdb/lmdb ratios are printed beside them). Each node first gets
--http-keys keys through `PUT /kv/{key}`, then wrk drives `GET /kv/{key}` and
`PUT /kv/{key}` (overwrites) cycling over those keys: servers pinned to one
core, wrk to the other, 64 connections. Every node here runs with
--anti-entropy-interval 2, so that its first repair round (30 s after start
by default) runs during the preload instead of inside a measured run. Before
b20d20c that round scanned every record for ones the node no longer owns;
a lone node now skips it. The engine alone, in-process,
per op, is bench/storage_engines.py.

Part 2, 1,000,000 keys (16-byte keys, 100-byte values):
- each durable engine: a child process fills a data dir through the project's own storage
  API (app.storage.open_store, node id n1, one transaction per put), the
  data dir's pages are dropped from the page cache (posix_fadvise DONTNEED),
  then a node is started on it and timed from spawn to the first 200 from
  /ready (polled every few ms): once cold, then twice warm. A last node
  (with --anti-entropy-interval 2, so that its first repair round runs now,
  not 30 s later) reports RSS at ready, after that round and any other
  start-up work has gone quiet, and after a wrk GET run over the 1M keys.
- memory: a node loaded with 1M keys through HTTP (wrk, distinct keys),
  then RSS, and the same GET run.
Raw data size is 1M x (16 + 100) bytes. The RSS target is checked on the
durable engine's VmRSS (the memory engine's is printed for information).

    flock /tmp/kvstore-bench.lock .venv/bin/python -m bench storage_http [--duration 5] [--warmup 1]
        [--big-keys 1000000] [--engines lmdb,rocksdb] [--markdown]

Exit status 0 when every storage target is met, 1 when one is missed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.lib.common import (
    APP_DIR,
    CONNECTIONS,
    PYTHON,
    Result,
    cpu_seconds,
    format_table,
    free_port,
    http_request,
    machine_summary,
    memory_kib,
    require_wrk,
    run_wrk,
    serving,
    spawned,
    tempdir,
    wait_ready,
    write_lua,
)

HOST = "127.0.0.1"
NODE_ID = "n1"
KEY_BYTES = 16  # "key-%012d": 16-byte keys, as every storage target is stated for
VALUE_BYTES = 100  # and 100-byte values
HTTP_KEYS = 100_000  # part 1: keys preloaded, then read and overwritten
BIG_KEYS = 1_000_000  # part 2
READY_POLL_S = 0.005  # start-to-ready resolution
READY_TIMEOUT_S = 60.0
WARM_READY_TRIALS = 2  # after the cold one
SCAN_INTERVAL = "2"  # --anti-entropy-interval for the RSS nodes: their first repair round runs 2 s in
QUIET_BUSY = 0.05  # the node is idle again when its CPU over a 0.5 s window is under this
LOAD_BUDGET_S = 300.0  # loading 1M keys through HTTP must finish within this

# The storage targets.
TARGET_RATIO = 0.9  # lmdb --fsync batch req/s over memory req/s, GET and PUT
DURABLE_ENGINES = ("lmdb", "rocksdb")
TARGET_READY_S = 5.0  # start to /ready with 1M keys on disk
TARGET_RSS_X_RAW = 2.0  # RSS over raw data size

# Keys are "key-" + 12 digits = 16 bytes; both scripts take (keyspace, first index) as wrk args.
LUA_GET = """
local n, i = 1, 0
init = function(args)
  n = tonumber(args[1]); i = tonumber(args[2] or "0")
end
request = function()
  local key = string.format("key-%012d", i % n)
  i = i + 1
  return wrk.format("GET", "/kv/" .. key)
end
"""
LUA_PUT = f"""
local n, i = 1, 0
local value = string.rep("v", {VALUE_BYTES})
init = function(args)
  n = tonumber(args[1]); i = tonumber(args[2] or "0")
end
request = function()
  local key = string.format("key-%012d", i % n)
  i = i + 1
  return wrk.format("PUT", "/kv/" .. key, nil, value)
end
"""

# Fills a data dir the way a node would have: open_store with the node's config.
_LOADER = """
import json, random, time
from app.clock import HybridClock
from app.config import NodeConfig
from app.storage import Record, open_store
config = {{"node_id": {node!r}, "data_dir": {path!r}, "fsync": "never", "storage": {engine!r}}}
store = open_store(NodeConfig.from_options(config))
clock = HybridClock({node!r})
# Random values from a pool of distinct ones: a repeated value would compress to nothing (RocksDB).
values = [random.Random(7 + i).randbytes({value_bytes}) for i in range(4096)]
start = time.perf_counter()
for i in range({n}):
    store.apply(b"key-%012d" % i, Record(version=clock.now(), value=values[i % 4096]))
loaded = time.perf_counter() - start
count = store.live_count()
store.close()  # syncs
print("LOADER " + json.dumps({{"load_s": loaded, "count": count, "close_s": time.perf_counter() - start - loaded}}))
"""


def node_argv(port: int, *storage: str, anti_entropy: str | None = SCAN_INTERVAL) -> list[str]:
    """A single node owning every key. anti_entropy: seconds from start to
    the node's first repair round (30 s by default). The benchmark uses 2 s
    so that it runs during the preload, never inside a measured run; None keeps the
    default (the start-to-ready trials)."""
    argv = [
        PYTHON,
        "-m",
        "app",
        "node",
        "--node-id",
        NODE_ID,
        "--listen",
        f"{HOST}:{port}",
        "--peers",
        f"{NODE_ID}=http://{HOST}:{port}",
        "--replication-factor",
        "1",
        "--log-level",
        "warning",
        *storage,
    ]
    if anti_entropy is not None:
        argv += ["--anti-entropy-interval", anti_entropy]
    return argv


def live_keys(url: str) -> int:
    """kvstore_keys from the node's /metrics (-1 if unreadable)."""
    status, body = http_request(url, "GET", "/metrics")
    for line in body.decode(errors="replace").splitlines() if status == 200 else ():
        if line.startswith("kvstore_keys "):
            return int(float(line.split()[1]))
    return -1


def mib(kib: int) -> float:
    return kib / 1024


@dataclass
class Load:
    seconds: float
    requests: int
    errors: int


def load_through_http(url: str, n: int, lua: Path, pid: int) -> Load:
    """PUT keys 0..n-1 through wrk until the node counts n live keys. Keys go
    out in order (wrapping at n), so each round resumes a little before the
    count: requests in flight when wrk stopped may not have landed."""
    started = time.monotonic()
    rate, requests, errors = 15_000.0, 0, 0
    while True:
        count = live_keys(url)
        if count < 0:
            raise RuntimeError(f"bench: cannot read kvstore_keys from {url}/metrics")
        if count >= n:
            return Load(time.monotonic() - started, requests, errors)
        if time.monotonic() - started > LOAD_BUDGET_S:
            raise RuntimeError(f"bench: loading {n:,} keys took over {LOAD_BUDGET_S:.0f} s (at {count:,})")
        duration = min(max(math.ceil((n - count) / rate * 1.02), 1), 60)  # wrk takes whole seconds
        result = run_wrk(
            "load",
            url,
            lua=lua,
            duration_s=duration,
            warmup_s=0,
            server_pids=[pid],
            script_args=[str(n), str(max(count - 2 * CONNECTIONS, 0))],
        )
        rate = max(result.rps, 1_000.0)
        requests += result.requests
        errors += result.errors


def wait_quiet(pid: int, *, after: float, limit_s: float = 60.0) -> float:
    """Wait until monotonic time `after`, then until the process's CPU over a
    0.5 s window falls under QUIET_BUSY twice in a row; return the CPU seconds
    it spent from `after` on (its background work)."""
    time.sleep(max(after - time.monotonic(), 0))
    start_cpu = cpu_seconds([pid])
    deadline = time.monotonic() + limit_s
    quiet = 0
    while quiet < 2 and time.monotonic() < deadline:
        before = cpu_seconds([pid])
        time.sleep(0.5)
        quiet = quiet + 1 if (cpu_seconds([pid]) - before) / 0.5 < QUIET_BUSY else 0
    return cpu_seconds([pid]) - start_cpu


def data_dir_bytes(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def page_cache_bytes(path: Path) -> int:
    """Bytes of the data dir's files in the page cache (util-linux fincore)."""
    files = [str(f) for f in path.rglob("*") if f.is_file()]
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", *files], capture_output=True, text=True, check=False
    )
    return sum(int(x) for x in out.stdout.split() if x.isdigit())


def drop_page_cache(path: Path) -> None:
    """Evict the data dir's (clean, synced) pages: a start as after a reboot,
    as far as this guest's page cache goes. Touches only these files."""
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


@dataclass
class ReadyTrial:
    label: str
    healthy_s: float  # spawn -> first 200 from /health (the process serves)
    ready_s: float  # spawn -> first 200 from /ready
    rss: dict[str, int]
    cache_before: int  # data dir bytes in the page cache at spawn


def time_to_ready(label: str, argv: list[str], url: str, logdir: Path, data_dir: Path) -> ReadyTrial:
    cache = page_cache_bytes(data_dir)
    healthy = None
    started = time.perf_counter()
    with spawned(f"ready-{label}", argv, logdir=logdir) as node:
        while True:
            now = time.perf_counter() - started
            if node.proc.poll() is not None:
                raise RuntimeError(f"bench: node exited with {node.proc.returncode}:\n{node.log_tail()}")
            if now > READY_TIMEOUT_S:
                raise RuntimeError(f"bench: node not ready {READY_TIMEOUT_S:.0f} s after spawn:\n{node.log_tail()}")
            if healthy is None and http_request(url, "GET", "/health")[0] == 200:
                healthy = now
            if healthy is not None and http_request(url, "GET", "/ready")[0] == 200:
                ready = time.perf_counter() - started
                break
            time.sleep(READY_POLL_S)
        rss = memory_kib(node.proc.pid)
        count = live_keys(url)
    print(
        f"  start to ready, {label:<30} process serving {healthy:5.2f} s, ready {ready:5.2f} s, "
        f"{count:,} keys, RSS {mib(rss.get('VmRSS', 0)):.0f} MiB",
        flush=True,
    )
    return ReadyTrial(label, healthy, ready, rss, cache)


@dataclass
class BigRun:
    engine: str
    rss: dict[str, dict[str, int]] = field(default_factory=dict)  # moment -> memory_kib
    get: Result | None = None
    load: Load | None = None
    background_cpu_s: float = 0.0
    disk_bytes: int = 0
    fill_s: float = 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of discarded warm-up before each run")
    parser.add_argument("--http-keys", type=int, default=HTTP_KEYS, help="keys preloaded for the throughput runs")
    parser.add_argument(
        "--big-keys", type=int, default=BIG_KEYS, help="keys for the RSS and start-to-ready part (0: skip)"
    )
    parser.add_argument("--dir", default=None, help="where the temporary data dirs go (default: system temp)")
    parser.add_argument(
        "--engines", default=",".join(DURABLE_ENGINES), help="durable engines to measure, comma-separated"
    )
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown (for BENCHMARKS.md)")
    args = parser.parse_args()
    engines = [engine for engine in args.engines.split(",") if engine]
    require_wrk()
    print(f"machine: {machine_summary()}", flush=True)
    print(f"app under test: {APP_DIR / 'app'}", flush=True)
    results: dict[str, Result] = {}
    bigs: dict[str, BigRun] = {}
    trials: list[ReadyTrial] = []
    started = time.monotonic()

    def measure(key: str, label: str, url: str, lua: Path, pids: list[int], n: int) -> Result:
        result = run_wrk(
            label, url, lua=lua, duration_s=args.duration, warmup_s=args.warmup, server_pids=pids, script_args=[str(n)]
        )
        results[key] = result
        print(
            f"  {label:<40} {result.rps:>9,.0f} req/s  p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms"
            f"  CPU {result.cpu_us_per_request:4.0f} us/req  errors {result.errors}",
            flush=True,
        )
        return result

    with tempdir("kvstore-bench-storage-") as tmp_logs, tempdir_in(args.dir) as tmp_data:
        logdir, datadir = Path(tmp_logs), Path(tmp_data)
        get_lua = write_lua(logdir, "get", LUA_GET)
        put_lua = write_lua(logdir, "put", LUA_PUT)
        n = args.http_keys

        # -- part 1: throughput through HTTP --------------------------------------
        print(f"\npart 1: GET/PUT /kv/{{key}} over {n:,} preloaded keys", flush=True)
        runs: list[tuple[str, str, list[str], bool, bool]] = [("memory", "memory", ["--storage", "memory"], True, True)]
        for engine in engines:
            engine_dir = datadir / f"http-{engine}"
            runs += [
                (
                    f"{engine}_batch",
                    f"{engine} --fsync batch",
                    ["--storage", engine, "--data-dir", str(engine_dir), "--fsync", "batch"],
                    True,
                    True,
                ),
                # the same data dir, already holding the keys: PUT only (reads do not depend on the policy)
                (
                    f"{engine}_always",
                    f"{engine} --fsync always",
                    ["--storage", engine, "--data-dir", str(engine_dir), "--fsync", "always"],
                    False,
                    False,
                ),
            ]
        runs.append(("memory_again", "memory (again: drift check)", ["--storage", "memory"], True, True))
        for key, label, storage, preload, do_get in runs:
            port = free_port()
            url = f"http://{HOST}:{port}"
            with serving(key, node_argv(port, *storage), health_urls=[url], logdir=logdir) as node:
                wait_ready([url], servers=[node])
                if preload:
                    load = load_through_http(url, n, put_lua, node.proc.pid)
                    print(f"  {label}: {n:,} keys loaded in {load.seconds:.1f} s", flush=True)
                if do_get:
                    measure(f"{key}_get", f"{label} GET", url, get_lua, node.pids(), n)
                measure(f"{key}_put", f"{label} PUT", url, put_lua, node.pids(), n)

        # -- part 2: 1M keys ----------------------------------------------------------
        big = args.big_keys
        if big:
            print(f"\npart 2: {big:,} keys", flush=True)
            for engine in engines:
                bigs[engine] = durable_big(engine, big, datadir / f"big-{engine}", logdir, get_lua, trials, args)
            bigs["memory"] = memory_big(big, logdir, get_lua, put_lua, args)

    print(f"\n(whole run: {time.monotonic() - started:.0f} s)")
    print_report(results, bigs, trials, big=args.big_keys, markdown=args.markdown, duration=args.duration)
    return 0 if check_targets(results, bigs, trials, big=args.big_keys) else 1


def tempdir_in(parent: str | None) -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="kvstore-bench-data-", dir=parent)


def durable_big(
    engine: str,
    n: int,
    data_dir: Path,
    logdir: Path,
    get_lua: Path,
    trials: list[ReadyTrial],
    args: argparse.Namespace,
) -> BigRun:
    run = BigRun(engine)
    # Fill through the storage API in a child (own process group: killed on Ctrl-C).
    code = _LOADER.format(node=NODE_ID, path=str(data_dir), n=n, value_bytes=VALUE_BYTES, engine=engine)
    with spawned(f"{engine}-loader", [PYTHON, "-c", code], logdir=logdir) as loader:
        try:
            loader.proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"bench: the {engine} loader took over 600 s") from None
        lines = reversed(loader.log_path.read_text().splitlines())
        line = next((text for text in lines if text.startswith("LOADER ")), None)
        if loader.proc.returncode != 0 or line is None:
            raise RuntimeError(f"bench: the {engine} loader failed ({loader.proc.returncode}):\n{loader.log_tail()}")
    filled = json.loads(line.removeprefix("LOADER "))
    run.fill_s = filled["load_s"]
    run.disk_bytes = data_dir_bytes(data_dir)
    print(
        f"  {engine}: {filled['count']:,} keys written in-process in {filled['load_s']:.1f} s "
        f"({filled['load_s'] / n * 1e6:.1f} us/put, one transaction each); data dir {run.disk_bytes / 2**20:.0f} MiB",
        flush=True,
    )

    # Start to ready: once with the data dir out of the page cache, then warm.
    port = free_port()
    url = f"http://{HOST}:{port}"
    drop_page_cache(data_dir)
    trials.append(
        time_to_ready(
            f"{engine}, cold (dropped from page cache)",
            node_argv(port, "--data-dir", str(data_dir), anti_entropy=None),
            url,
            logdir,
            data_dir,
        )
    )
    for i in range(WARM_READY_TRIALS):
        port = free_port()
        url = f"http://{HOST}:{port}"
        trials.append(
            time_to_ready(
                f"{engine}, warm #{i + 1}",
                node_argv(port, "--data-dir", str(data_dir), anti_entropy=None),
                url,
                logdir,
                data_dir,
            )
        )

    # RSS: at ready, once start-up background work is quiet, after GETs over all keys.
    port = free_port()
    url = f"http://{HOST}:{port}"
    argv = node_argv(port, "--data-dir", str(data_dir))
    with serving(f"big-{engine}", argv, health_urls=[url], logdir=logdir) as node:
        wait_ready([url], servers=[node])
        pid = node.proc.pid
        run.rss["at ready"] = memory_kib(pid)
        # the first repair round starts SCAN_INTERVAL after start-up (~ready): wait it out, then for idle
        run.background_cpu_s = wait_quiet(pid, after=time.monotonic() + float(SCAN_INTERVAL) + 0.5)
        run.rss["after start-up background work"] = memory_kib(pid)
        run.get = run_wrk(
            f"{engine} GET, {n:,} keys",
            url,
            lua=get_lua,
            duration_s=args.duration,
            warmup_s=args.warmup,
            server_pids=node.pids(),
            script_args=[str(n)],
        )
        run.rss["after GETs over the keys"] = memory_kib(pid)
        print(
            f"  {engine}: start-up background work {run.background_cpu_s:.1f} s CPU; GET {run.get.rps:,.0f} req/s, "
            f"p99 {run.get.p99_ms:.2f} ms, errors {run.get.errors}",
            flush=True,
        )
    return run


def memory_big(n: int, logdir: Path, get_lua: Path, put_lua: Path, args: argparse.Namespace) -> BigRun:
    run = BigRun("memory")
    port = free_port()
    url = f"http://{HOST}:{port}"
    argv = node_argv(port, "--storage", "memory")
    with serving("big-memory", argv, health_urls=[url], logdir=logdir) as node:
        wait_ready([url], servers=[node])
        pid = node.proc.pid
        run.rss["at ready"] = memory_kib(pid)
        run.load = load_through_http(url, n, put_lua, pid)
        print(
            f"  memory: {n:,} keys loaded through HTTP in {run.load.seconds:.1f} s "
            f"({run.load.requests / run.load.seconds:,.0f} PUT/s, {run.load.errors} errors)",
            flush=True,
        )
        run.background_cpu_s = wait_quiet(pid, after=time.monotonic())
        run.rss["after loading through HTTP"] = memory_kib(pid)
        run.get = run_wrk(
            f"memory GET, {n:,} keys",
            url,
            lua=get_lua,
            duration_s=args.duration,
            warmup_s=args.warmup,
            server_pids=node.pids(),
            script_args=[str(n)],
        )
        run.rss["after GETs over the keys"] = memory_kib(pid)
        print(
            f"  memory: GET {run.get.rps:,.0f} req/s, p99 {run.get.p99_ms:.2f} ms, errors {run.get.errors}", flush=True
        )
    return run


# -- report -----------------------------------------------------------------------------


def reference(results: dict[str, Result], method: str) -> Result:
    """The faster of the two memory runs: drift during the run can only lower the ratios."""
    runs = [results[k] for k in (f"memory_{method}", f"memory_again_{method}") if k in results]
    return max(runs, key=lambda r: r.rps)


def print_report(
    results: dict[str, Result],
    bigs: dict[str, BigRun],
    trials: list[ReadyTrial],
    *,
    big: int,
    markdown: bool,
    duration: float,
) -> None:
    headers = [
        "scenario",
        "req/s",
        "p50 ms",
        "p99 ms",
        "x memory",
        "server CPU us/req",
        "CPU x memory",
        "server core busy",
        "errors",
    ]
    rows = []
    for key, result in results.items():
        ref = reference(results, "put" if key.endswith("_put") else "get")
        cpu_ratio = ref.cpu_us_per_request / result.cpu_us_per_request if result.cpu_us_per_request else 0.0
        rows.append(
            [
                result.label,
                f"{result.rps:,.0f}",
                f"{result.p50_ms:.2f}",
                f"{result.p99_ms:.2f}",
                f"{result.rps / ref.rps:.2f}",
                f"{result.cpu_us_per_request:.0f}",
                f"{cpu_ratio:.2f}",
                f"{result.server_core_busy:.0%}",
                str(result.errors),
            ]
        )
    for run in bigs.values():
        if run.get is not None:
            r = run.get
            rows.append(
                [
                    r.label,
                    f"{r.rps:,.0f}",
                    f"{r.p50_ms:.2f}",
                    f"{r.p99_ms:.2f}",
                    "-",
                    f"{r.cpu_us_per_request:.0f}",
                    "-",
                    f"{r.server_core_busy:.0%}",
                    str(r.errors),
                ]
            )
    print()
    print(format_table(headers, rows, markdown=markdown))
    print(
        f"\n({duration:g} s per run after a warm-up. 'x memory' divides by the faster of the two memory runs of the"
        " same method; 'CPU x memory' = memory CPU per request / this CPU per request, steadier when other work"
        " shares the machine)"
    )
    if not big:
        return
    raw = big * (KEY_BYTES + VALUE_BYTES)
    memory = bigs["memory"]
    print(f"\n{big:,} keys of {KEY_BYTES} B with {VALUE_BYTES} B values: raw data {raw / 2**20:.1f} MiB.")
    for engine, run in bigs.items():
        if engine != "memory":
            print(
                f"{engine}: filled in-process in {run.fill_s:.1f} s, "
                f"data dir {run.disk_bytes / 2**20:.0f} MiB on disk, "
                f"background work after start-up took {run.background_cpu_s:.1f} s of CPU."
            )
    if memory.load:
        print(
            f"memory: loaded through HTTP in {memory.load.seconds:.1f} s "
            f"({memory.load.requests / memory.load.seconds:,.0f} PUT/s)\n"
        )
    headers = [
        "start to ready",
        "data dir in page cache at spawn",
        "process serving /health s",
        "/ready s",
        "RSS at ready MiB",
    ]
    rows = [
        [
            t.label,
            f"{t.cache_before / 2**20:.1f} MiB",
            f"{t.healthy_s:.2f}",
            f"{t.ready_s:.2f}",
            f"{mib(t.rss.get('VmRSS', 0)):.0f}",
        ]
        for t in trials
    ]
    print(format_table(headers, rows, markdown=markdown))
    headers = [
        "engine",
        "when",
        "VmRSS MiB",
        "RssAnon MiB",
        "RssFile MiB",
        "VmRSS x raw",
        "RssAnon x raw",
        "VmRSS growth since ready x raw",
    ]
    rows = []
    for run in bigs.values():
        base = run.rss["at ready"].get("VmRSS", 0)
        for moment, rss in run.rss.items():
            rows.append(
                [
                    run.engine,
                    moment,
                    f"{mib(rss.get('VmRSS', 0)):.0f}",
                    f"{mib(rss.get('RssAnon', 0)):.0f}",
                    f"{mib(rss.get('RssFile', 0)):.0f}",
                    f"{rss.get('VmRSS', 0) * 1024 / raw:.2f}",
                    f"{rss.get('RssAnon', 0) * 1024 / raw:.2f}",
                    f"{(rss.get('VmRSS', 0) - base) * 1024 / raw:.2f}",
                ]
            )
    print()
    print(format_table(headers, rows, markdown=markdown))
    print_engine_ratios(results, bigs, trials, markdown=markdown)
    print(
        "\n(RssFile of an lmdb node is data.mdb's pages mapped read-only: page cache, shared and clean once"
        " synced, reclaimable by the kernel; RssAnon is the process's private memory)"
    )


def print_engine_ratios(
    results: dict[str, Result], bigs: dict[str, BigRun], trials: list[ReadyTrial], *, markdown: bool
) -> None:
    """rocksdb against lmdb, same run: req/s and CPU per request, start to ready, RSS."""
    if "rocksdb_batch_get" not in results or "lmdb_batch_get" not in results:
        return
    rows = []
    for key, label in (
        ("batch_get", "GET, --fsync batch"),
        ("batch_put", "PUT (overwrites), --fsync batch"),
        ("always_put", "PUT (overwrites), --fsync always"),
    ):
        lm, rx = results[f"lmdb_{key}"], results[f"rocksdb_{key}"]
        cpu = lm.cpu_us_per_request / rx.cpu_us_per_request if rx.cpu_us_per_request else 0.0
        rows.append([label, f"{lm.rps:,.0f}", f"{rx.rps:,.0f}", f"{rx.rps / lm.rps:.2f}x", f"{cpu:.2f}x"])
    by_engine = {engine: [t for t in trials if t.label.startswith(engine + ",")] for engine in ("lmdb", "rocksdb")}
    if by_engine["lmdb"] and by_engine["rocksdb"]:
        lm_ready = max(t.ready_s for t in by_engine["lmdb"])
        rx_ready = max(t.ready_s for t in by_engine["rocksdb"])
        rows.append(
            [
                "start to /ready, slowest trial, s",
                f"{lm_ready:.2f}",
                f"{rx_ready:.2f}",
                f"{rx_ready / lm_ready:.2f}x",
                "",
            ]
        )
    if "lmdb" in bigs and "rocksdb" in bigs:
        for field in ("VmRSS", "RssAnon", "RssFile"):
            lm_kib = bigs["lmdb"].rss.get("after GETs over the keys", {}).get(field, 0)
            rx_kib = bigs["rocksdb"].rss.get("after GETs over the keys", {}).get(field, 0)
            if lm_kib:
                rows.append(
                    [
                        f"{field} after GETs over the keys, MiB",
                        f"{mib(lm_kib):.0f}",
                        f"{mib(rx_kib):.0f}",
                        f"{rx_kib / lm_kib:.2f}x",
                        "",
                    ]
                )
    print("\nrocksdb against lmdb, same run")
    print(format_table(["measure", "lmdb", "rocksdb", "rocksdb/lmdb", "CPU/req lmdb/rocksdb"], rows, markdown=markdown))


def check_targets(results: dict[str, Result], bigs: dict[str, BigRun], trials: list[ReadyTrial], *, big: int) -> bool:
    ok = True
    print("\ntargets (storage engines):")
    if "lmdb_batch_get" not in results:
        print("  (stated for lmdb, which was not measured)")
        return ok
    for method in ("get", "put"):
        ratio = results[f"lmdb_batch_{method}"].rps / reference(results, method).rps
        met = ratio >= TARGET_RATIO
        ok &= met
        print(
            f"  lmdb --fsync batch {method.upper()} / memory {method.upper()}: {ratio:5.2f}x  "
            f"target >= {TARGET_RATIO}x  {'met' if met else 'MISSED'}"
        )
    if big:
        worst = max(trials, key=lambda t: t.ready_s)
        met = worst.ready_s < TARGET_READY_S
        ok &= met
        print(
            f"  start to /ready with {big:,} keys (slowest of {len(trials)}, {worst.label}): {worst.ready_s:.2f} s  "
            f"target < {TARGET_READY_S:g} s  {'met' if met else 'MISSED'}"
        )
        raw = big * (KEY_BYTES + VALUE_BYTES)
        lmdb_peak = max(rss.get("VmRSS", 0) for rss in bigs["lmdb"].rss.values()) * 1024
        met = lmdb_peak < TARGET_RSS_X_RAW * raw
        ok &= met
        print(
            f"  lmdb node RSS with {big:,} keys (highest VmRSS sampled): {lmdb_peak / 2**20:.0f} MiB = "
            f"{lmdb_peak / raw:.2f}x raw  target < {TARGET_RSS_X_RAW:g}x  {'met' if met else 'MISSED'}"
        )
        mem_peak = max(rss.get("VmRSS", 0) for rss in bigs["memory"].rss.values()) * 1024
        print(f"  (memory engine, for information: {mem_peak / 2**20:.0f} MiB = {mem_peak / raw:.2f}x raw)")
    starved = [r.label for r in results.values() if r.server_core_busy < 0.85]
    if starved:
        print(f"  WARNING: server core under 85% busy in: {', '.join(starved)} (machine contention? rerun)")
    bad = [r.label for r in [*results.values(), *(b.get for b in bigs.values() if b.get)] if r.errors]
    if bad:
        print(f"  errors (socket errors or non-2xx) in: {', '.join(bad)}")
        ok = False
    return ok


if __name__ == "__main__":
    # SIGTERM unwinds like Ctrl-C, so every node and temp dir is still cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
