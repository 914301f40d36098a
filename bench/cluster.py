"""Issue 4's benchmark: the replicated cluster, and a 3-member etcd as the external reference.

Sections (all by default; pick some with --only quorum,converge,slow,etcd):

- quorum: three nodes (`kvstore node` x 3, LMDB data dirs, default --fsync
  batch) with --replication-factor 1, then the same with N=3; wrk drives
  `GET /kv/{key}` and `PUT /kv/{key}` (100-byte raw body) through node1 with
  keys spread so every owner is hit; default consistency (quorum: R = W = 2
  at N=3). Target: N=3 quorum req/s >= 0.5 x the N=1 figure, GET and PUT.
- converge: three nodes with data dirs, N=3; 1,000 keys written, node3 killed
  (SIGKILL), 100,000 distinct keys written through node1 and node2 (quorum
  still succeeds with 2 of 3; the coordinators keep hints for node3), node3
  restarted on its data dir; the time from its restart until its
  `kvstore_keys` gauge holds every key. Once with the default anti-entropy
  pace, once with --anti-entropy-interval 1 (--converge-paces). Which
  mechanism did the work (hints delivered, anti-entropy repairs) is reported.
- slow: three nodes, N=3, node3 reached by node1 and node2 only through an
  in-bench TCP proxy; quorum GET through node1 with the proxy adding nothing,
  then (same processes) with it delaying every chunk sent to node3 by 20 ms.
  Target: p99 with one node slowed <= 1.5 x p99 with none slowed.
- etcd: three etcd members (Debian's etcd-server) on loopback, each with its
  own data dir, all pinned to the server core like our nodes; the same wrk
  drives the leader's JSON gateway: POST /v3/kv/put (100-byte value),
  POST /v3/kv/range (linearizable, then serializable). Target: our N=3
  quorum PUT and GET req/s >= etcd's put and linearizable range.

Every server is pinned to the server core, wrk (one thread, 64 connections)
and this script (its loader and proxy) to the load core. Each wrk run is a
1 s warm-up, discarded, then the measured run.

    .venv/bin/python bench/cluster.py [--only quorum,converge,slow,etcd] [--duration 5] [--markdown]
                                      [--profile PREFIX]   # py-spy node1 during an extra N=3 PUT run

Exit status 0 when every target is met, 1 when one is missed or a section
could not run (e.g. etcd not installed).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    APP_DIR,
    LOAD_CORE,
    PYTHON,
    SERVER_CORE,
    Result,
    Server,
    format_table,
    free_port_block,
    http_request,
    lua_rest_put,
    machine_summary,
    require_wrk,
    run_wrk,
    serving,
    tempdir,
    wait_ready,
    write_lua,
)

HOST = "127.0.0.1"
NODE_IDS = ("n1", "n2", "n3")
VALUE = b"v" * 100  # a 100-byte value, as in the other benches
SPREAD_KEYS = 1000  # keys preloaded for the GET runs, spread over every owner
PUT_KEYSPACE = 100_000  # PUT runs cycle over this many keys: bounded data, mostly overwrites
CONVERGE_WRITES = 100_000  # the figure: writes the restarted node missed
CONVERGE_TIMEOUT_S = 240.0  # per pace; a run that has not converged by then is reported as such
LOADER_CONNECTIONS = 64
SLOW_DELAY_S = 0.020  # the 20 ms
PACES = {"default": [], "fast": ["--anti-entropy-interval", "1"]}
ETCD_READY_TIMEOUT_S = 30.0
TARGETS = {"quorum_vs_n1": 0.5, "vs_etcd": 1.0, "slow_p99": 1.5}
ETCD_HINT = ("bench: etcd not found. Install Debian's etcd server:\n"
             "    sudo apt-get update && sudo apt-get install -y etcd-server\n"
             "(the package installs a systemd unit too; this bench starts its own members on free loopback ports)")

LUA_GET = f"""
local counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", "/kv/s" .. (counter % {SPREAD_KEYS}))
end
"""
LUA_PUT = lua_rest_put(PUT_KEYSPACE, VALUE.decode())


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def etcd_key(i: int) -> bytes:
    """'key' + 6 digits: 9 bytes, so its base64 is three independent 4-char groups
    and the Lua scripts can build it from a 1,000-entry table."""
    return b"key%03d%03d" % (i // 1000 % 1000, i % 1000)


def etcd_lua(path: str, keyspace: int, extra_json: str) -> str:
    table = ",".join(f'"{b64(b"%03d" % n)}"' for n in range(1000))
    value = f',"value":"{b64(VALUE)}"' if path.endswith("put") else ""
    return f"""
local t = {{[0]={table}}}
local counter = 0
request = function()
  counter = counter + 1
  local i = counter % {keyspace}
  local key = "{b64(b'key')}" .. t[math.floor(i / 1000) % 1000] .. t[i % 1000]
  local body = '{{"key":"' .. key .. '"{value}{extra_json}}}'
  return wrk.format("POST", "{path}", {{["Content-Type"] = "application/json"}}, body)
end
"""


# -- results ---------------------------------------------------------------------------


@dataclass
class Report:
    rows: dict[str, Result] = field(default_factory=dict)
    converge: list[dict[str, object]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed_sections: list[str] = field(default_factory=list)
    profile: str = ""

    def add(self, key: str, result: Result) -> Result:
        self.rows[key] = result
        print(f"  {result.label:<52} {result.rps:>8,.0f} req/s  p50 {result.p50_ms:6.2f} ms  "
              f"p99 {result.p99_ms:6.2f} ms  core {result.server_core_busy:4.0%}  errors {result.errors}", flush=True)
        return result


# -- our nodes ---------------------------------------------------------------------------


def metric(url: str, name: str, *labels: str) -> float | None:
    """Sum of the samples of `name` (only those whose label set contains every
    one of `labels`, e.g. 'peer="n3"') in the node's /metrics; None when the
    node does not answer."""
    status, body = http_request(url, "GET", "/metrics")
    if status != 200:
        return None
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " ") \
                and all(label in line for label in labels):
            total += float(line.rsplit(" ", 1)[1])
    return total


def reads_sent(url: str, peer: str) -> float:
    """Replica reads the node at url has sent to peer so far."""
    return metric(url, "kvstore_forwarded_requests_total", f'peer="{peer}"', 'op="read"') or 0.0


class Cluster:
    """Three `kvstore node` processes on the server core, each in its own
    process group and ExitStack so one can be killed and restarted alone.
    `advertised` overrides the URL the *other* nodes use for a node (a proxy)."""

    def __init__(self, stack: ExitStack, logdir: Path, name: str, *, rf: int, storage: str,
                 extra: Sequence[str] = (), advertised: dict[str, str] | None = None,
                 base_port: int | None = None) -> None:
        self.stack, self.logdir, self.name, self.rf, self.storage = stack, logdir, name, rf, storage
        self.extra = list(extra)
        base = base_port or free_port_block(len(NODE_IDS))
        self.urls = {nid: f"http://{HOST}:{base + i}" for i, nid in enumerate(NODE_IDS)}
        self.advertised = {**self.urls, **(advertised or {})}
        self.servers: dict[str, Server] = {}
        self._stacks: dict[str, ExitStack] = {}
        self._restarts = 0
        self.data_root = logdir / f"{name}-data"

    def argv(self, nid: str) -> list[str]:
        peers = {**self.advertised, nid: self.urls[nid]}  # a node knows its own real address
        argv = [PYTHON, "-m", "app", "node", "--node-id", nid, "--listen", self.urls[nid].removeprefix("http://"),
                "--peers", ",".join(f"{k}={v}" for k, v in peers.items()),
                "--replication-factor", str(self.rf), "--log-level", "warning"]
        if self.storage == "lmdb":
            argv += ["--data-dir", str(self.data_root / nid)]
        return argv + self.extra

    def spawn(self, nid: str) -> Server:
        node_stack = ExitStack()
        self.stack.callback(node_stack.close)
        tag = f"{self.name}-{nid}" + (f"-r{self._restarts}" if nid in self.servers else "")
        server = node_stack.enter_context(serving(tag, self.argv(nid), health_urls=[], logdir=self.logdir))
        server.url = self.urls[nid]
        self.servers[nid], self._stacks[nid] = server, node_stack
        return server

    def start(self) -> Cluster:
        for nid in NODE_IDS:
            self.spawn(nid)
        wait_ready(list(self.urls.values()), servers=list(self.servers.values()))
        return self

    def kill(self, nid: str) -> None:
        """SIGKILL, as a crash: no drain, no flush."""
        server = self.servers[nid]
        try:
            os.killpg(server.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.proc.wait()
        self._stacks[nid].close()

    def restart(self, nid: str) -> Server:
        self._restarts += 1
        return self.spawn(nid)

    def pids(self) -> list[int]:
        return [pid for server in self.servers.values() for pid in server.pids()]


# -- a small async HTTP/1.1 loader (preloads and the 100,000 convergence writes) ------------


async def _put_all(urls: Sequence[str], paths: Sequence[str], body: bytes, connections: int) -> tuple[int, int]:
    """PUT body to every path, over `connections` keep-alive connections spread
    over urls; each write is retried (new connection) up to 5 times.
    Returns (acknowledged, failed)."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for path in paths:
        queue.put_nowait(path)
    acked = failed = 0
    reasons: Counter[str] = Counter()

    async def worker(url: str) -> None:
        nonlocal acked, failed
        host, _, port = url.removeprefix("http://").partition(":")
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while not queue.empty():
            path = queue.get_nowait()
            request = (f"PUT {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
            for _attempt in range(5):
                try:
                    if conn is None:
                        conn = await asyncio.open_connection(host, int(port))
                    reader, writer = conn
                    writer.write(request)
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
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
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                        ValueError) as exc:
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


def put_all(urls: Sequence[str], paths: Sequence[str], body: bytes = VALUE,
            connections: int = LOADER_CONNECTIONS) -> tuple[int, int, float]:
    started = time.monotonic()
    acked, failed = asyncio.run(_put_all(urls, paths, body, connections))
    return acked, failed, time.monotonic() - started


def preload(url: str, count: int = SPREAD_KEYS) -> None:
    acked, failed, _ = put_all([url], [f"/kv/s{i}" for i in range(count)], connections=16)
    if failed or acked != count:
        raise RuntimeError(f"bench: preloading {count} keys through {url}: {acked} acknowledged, {failed} failed")


# -- the delaying proxy --------------------------------------------------------------------


class _Upstream(asyncio.Protocol):
    """The proxy's connection to the slowed node: its answers go straight back."""

    def __init__(self, downstream: _Downstream) -> None:
        self.downstream = downstream

    def data_received(self, data: bytes) -> None:
        self.downstream.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.downstream.transport.close()


class _Downstream(asyncio.Protocol):
    """A connection from a peer to the proxy: every chunk is queued with its
    due time (arrival + delay) and written upstream, in order, when due."""

    def __init__(self, proxy: DelayProxy) -> None:
        self.proxy = proxy
        self.loop = proxy.loop
        self.queue: deque[tuple[float, bytes]] = deque()
        self.upstream: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        try:
            upstream, _ = await self.loop.create_connection(lambda: _Upstream(self), HOST, self.proxy.target_port)
        except OSError:
            self.transport.close()
            return
        if self.closed:
            upstream.close()
            return
        self.upstream = upstream  # type: ignore[assignment]
        self._flush()

    def data_received(self, data: bytes) -> None:
        delay = self.proxy.delay
        if delay <= 0 and not self.queue and self.upstream is not None:
            self.upstream.write(data)
            return
        self.queue.append((self.loop.time() + delay, data))
        if self.timer is None and self.upstream is not None:
            self.timer = self.loop.call_at(self.queue[0][0], self._flush)

    def _flush(self) -> None:
        self.timer = None
        if self.upstream is None:
            return
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now:
            self.upstream.write(self.queue.popleft()[1])
        if self.queue:
            self.timer = self.loop.call_at(self.queue[0][0], self._flush)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        if self.upstream is not None:
            self.upstream.close()


class DelayProxy:
    """TCP proxy on its own event loop (uvloop when installed) in a thread of
    this process, so on the load core, not the servers'. Every chunk sent
    towards the target is released `delay` seconds after it arrived, in order:
    latency grows by `delay` without capping throughput. Answers flow back
    undelayed. `delay` can change at any time. Protocol callbacks and one timer
    per connection keep its cost per chunk to a few microseconds."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay = 0.0
        self.port = 0
        try:
            import uvloop
            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:
            self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="delay-proxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None

    async def _start(self) -> None:
        self._server = await self.loop.create_server(lambda: _Downstream(self), HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)


# -- py-spy ------------------------------------------------------------------------------


def pyspy_path() -> str | None:
    return os.environ.get("BENCH_PYSPY") or shutil.which("py-spy") or (
        "/tmp/pyspy-venv/bin/py-spy" if Path("/tmp/pyspy-venv/bin/py-spy").exists() else None)


def summarize_profile(raw: Path, top: int = 15) -> str:
    """Shares of py-spy's samples (raw/collapsed output recorded with --threads):
    by thread, self time by function and by file, and inclusive time of the
    project's own functions (app/...)."""
    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    own_files: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        parts = stack.split(";")
        if parts[0].startswith("thread ("):
            threads[parts.pop(0).split(": ", 1)[-1]] += count
        if not parts:
            continue
        frames = [_frame_name(f) for f in parts]
        own[frames[-1]] += count
        own_files[_frame_file(frames[-1])] += count
        for name in {f for f in frames if _frame_file(f).startswith("app/") and _frame_file(f) not in BOILERPLATE}:
            ours[name] += count
    if not total:
        return "(no samples)"

    def block(title: str, counter: Counter[str], n: int = top) -> list[str]:
        return [title, *(f"  {k / total:6.1%}  {name}" for name, k in counter.most_common(n))]

    return "\n".join([f"{total} samples of node1's threads while running (py-spy without --idle)",
                      *block("by thread:", threads, 6),
                      *block("self time, by function (C code is charged to the Python frame that called it):", own),
                      *block("self time, by file:", own_files, 12),
                      *block("inclusive, the project's functions:", ours)])


BOILERPLATE = {"app/__main__.py", "app/cli.py"}  # start-up frames under everything the main thread does


def _frame_file(name: str) -> str:
    return name.split(" (", 1)[1].rstrip(")") if " (" in name else name


def _frame_name(frame: str) -> str:
    """'handle (app/web/dataplane.py:123)' -> 'handle (app/web/dataplane.py)'; paths shortened."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = path.removeprefix(str(APP_DIR) + "/")
    return f"{name} ({path})" if path else name


# -- sections ------------------------------------------------------------------------------


def section_quorum(report: Report, args: argparse.Namespace, logdir: Path, luas: dict[str, Path]) -> None:
    print("\n[quorum] 3 nodes via node1, N=1 then N=3 (default consistency: quorum)", flush=True)
    for rf in (1, 3):
        with ExitStack() as stack:
            cluster = Cluster(stack, logdir, f"q{rf}", rf=rf, storage=args.storage).start()
            url = cluster.urls["n1"]
            preload(url)
            tag = f"N={rf}" + (" quorum (R=W=2)" if rf == 3 else " (one owner, R=W=1)")
            for op in ("get", "put"):
                label = f"3 nodes {tag} {op.upper()} /kv via node1"
                report.add(f"n{rf}_{op}", run_wrk(label, url, lua=luas[op], duration_s=args.duration,
                                                  warmup_s=args.warmup, server_pids=cluster.pids()))
            if rf == 3 and args.profile:
                profile_put(report, args, cluster, luas["put"])


def profile_put(report: Report, args: argparse.Namespace, cluster: Cluster, lua: Path) -> None:
    """An extra N=3 PUT run with py-spy sampling node1; node2 and node3 moved to
    the load core meanwhile so node1 is not preempted by them mid-syscall
    (bench/README.md). Not one of the measured rows."""
    spy = pyspy_path()
    if spy is None:
        print("  profile skipped: py-spy not found (set BENCH_PYSPY)", flush=True)
        return
    n1 = cluster.servers["n1"].proc.pid
    others = [cluster.servers[n].proc.pid for n in ("n2", "n3")]
    raw = Path(f"{args.profile}-n1-put.txt")
    seconds = max(args.duration, 5.0)
    for pid in others:
        os.sched_setaffinity(pid, {int(LOAD_CORE)})
    try:
        spy_proc = subprocess.Popen(
            ["taskset", "-c", LOAD_CORE, spy, "record", "--nonblocking", "--threads", "-r", "250", "-d", f"{seconds:g}",
             "--format", "raw", "-o", str(raw), "--pid", str(n1)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            time.sleep(0.5)
            result = run_wrk("N=3 quorum PUT, node1 under py-spy", cluster.urls["n1"], lua=lua,
                             duration_s=seconds + 1, warmup_s=0, server_pids=[n1])
            _, err = spy_proc.communicate(timeout=60)
        finally:
            if spy_proc.poll() is None:
                spy_proc.kill()
                spy_proc.wait()
    finally:
        for pid in others:
            os.sched_setaffinity(pid, {int(SERVER_CORE)})
    if not raw.exists():
        print(f"  profile failed: {err.decode(errors='replace')[-500:]}", flush=True)
        return
    report.profile = (f"py-spy on node1 (pid {n1}) during an extra N=3 quorum PUT run "
                      f"({result.rps:,.0f} req/s, node2/node3 moved to the load core); raw stacks: {raw}\n"
                      + summarize_profile(raw))
    print("  " + report.profile.replace("\n", "\n  "), flush=True)


def section_converge(report: Report, args: argparse.Namespace, logdir: Path) -> None:
    print(f"\n[converge] node3 killed, {args.converge_writes:,} writes through node1/node2, node3 restarted",
          flush=True)
    for pace in args.converge_paces:
        with ExitStack() as stack:
            cluster = Cluster(stack, logdir, f"c-{pace}", rf=3, storage="lmdb", extra=PACES[pace]).start()
            n1, n2, n3 = (cluster.urls[n] for n in NODE_IDS)
            preload(n1)
            cluster.kill("n3")
            acked, failed, load_s = put_all([n1, n2], [f"/kv/c{i}" for i in range(args.converge_writes)])
            expected = SPREAD_KEYS + acked
            held = {n: metric(u, "kvstore_keys") for n, u in ((n, cluster.urls[n]) for n in ("n1", "n2"))}
            time.sleep(1.5)  # the hints_pending gauge is refreshed by the once-a-second delivery loop
            hints_pending = sum(metric(u, "kvstore_hints_pending") or 0 for u in (n1, n2))
            before = {u: (metric(u, "kvstore_hints_delivered_total") or 0) for u in (n1, n2)}
            print(f"  pace {pace}: {acked:,} writes acknowledged ({failed} failed) in {load_s:.1f} s "
                  f"({acked / load_s:,.0f}/s) with node3 down; node1/node2 hold {held}, "
                  f"{hints_pending:,.0f} hints pending", flush=True)
            started = time.monotonic()
            cluster.restart("n3")
            ready_s = converged_s = None
            last = 0.0
            samples: list[tuple[float, float]] = []
            deadline = started + CONVERGE_TIMEOUT_S
            while time.monotonic() < deadline:
                if cluster.servers["n3"].proc.poll() is not None:
                    raise RuntimeError(f"bench: node3 exited on restart:\n{cluster.servers['n3'].log_tail()}")
                now = time.monotonic() - started
                if ready_s is None and http_request(n3, "GET", "/ready")[0] == 200:
                    ready_s = now
                keys = metric(n3, "kvstore_keys")
                if keys is not None:
                    last = keys
                    if not samples or now - samples[-1][0] >= 5:
                        samples.append((now, keys))
                    if keys >= expected:
                        converged_s = now
                        break
                time.sleep(0.1)
            delivered = sum((metric(u, "kvstore_hints_delivered_total") or 0) - before[u] for u in (n1, n2))
            repaired = sum(metric(u, "kvstore_anti_entropy_keys_repaired_total") or 0 for u in (n1, n2, n3))
            read_repairs = sum(metric(u, "kvstore_read_repairs_total") or 0 for u in (n1, n2, n3))
            entry = {"pace": pace, "flags": " ".join(PACES[pace]) or "(defaults: --anti-entropy-interval 30)",
                     "acked": acked, "failed": failed, "load_s": load_s, "expected": expected,
                     "ready_s": ready_s, "converged_s": converged_s, "held": last,
                     "hints_delivered": delivered, "ae_repaired": repaired, "read_repairs": read_repairs,
                     "progress": samples}
            report.converge.append(entry)
            status = f"converged in {converged_s:.1f} s" if converged_s is not None else \
                f"NOT converged after {CONVERGE_TIMEOUT_S:.0f} s ({last:,.0f} of {expected:,} keys)"
            print(f"  pace {pace}: node3 ready after {ready_s if ready_s is None else round(ready_s, 1)} s, "
                  f"{status}; hints delivered {delivered:,.0f}, anti-entropy repairs {repaired:,.0f}, "
                  f"read repairs {read_repairs:,.0f}", flush=True)
            print("    progress (s, keys on node3): " + ", ".join(f"{t:.0f}: {k:,.0f}" for t, k in samples), flush=True)


def section_slow(report: Report, args: argparse.Namespace, logdir: Path, luas: dict[str, Path]) -> None:
    print(f"\n[slow] N=3 quorum GET via node1; node3 behind a proxy adding 0, then {SLOW_DELAY_S * 1000:.0f} ms",
          flush=True)
    with ExitStack() as stack:
        # the proxy needs node3's port before the nodes start: reserve the block first
        base = free_port_block(len(NODE_IDS))
        proxy = stack.enter_context(DelayProxy(base + 2))
        cluster = Cluster(stack, logdir, "slow", rf=3, storage=args.storage, base_port=base,
                          advertised={"n3": f"http://{HOST}:{proxy.port}"}).start()
        url = cluster.urls["n1"]
        preload(url)
        for key, delay, label in (("slow_none", 0.0, "none slowed (proxy +0 ms)"),
                                  ("slow_one", SLOW_DELAY_S, f"node3 slowed (+{SLOW_DELAY_S * 1000:.0f} ms)")):
            proxy.delay = delay
            before = {peer: reads_sent(url, peer) for peer in ("n2", "n3")}
            result = report.add(key, run_wrk(f"N=3 quorum GET via node1, {label}", url, lua=luas["get"],
                                             duration_s=args.duration, warmup_s=args.warmup,
                                             server_pids=cluster.pids(), other_pids=[os.getpid()]))
            sent = {peer: reads_sent(url, peer) - before[peer] for peer in ("n2", "n3")}
            share = sent["n3"] / (sent["n2"] + sent["n3"]) if sum(sent.values()) else 0.0
            report.notes.append(f"slow, {label}: node1 sent {share:.1%} of its replica reads to node3 "
                                f"({sent['n3']:,.0f} of {sum(sent.values()):,.0f}, warm-up included); "
                                f"the proxy (this script, load core) used {result.other_cpu_s / result.seconds:.0%}"
                                f" of a core")
            print(f"    {report.notes[-1]}", flush=True)
        proxy.delay = 0.0


def etcd_post(url: str, path: str, body: str) -> tuple[int, bytes]:
    return http_request(url, "POST", path, body.encode())


@contextmanager
def etcd_cluster(logdir: Path) -> Iterator[tuple[list[str], list[Server]]]:
    base = free_port_block(6)
    client = [f"http://{HOST}:{base + i}" for i in range(3)]
    peer = [f"http://{HOST}:{base + 3 + i}" for i in range(3)]
    initial = ",".join(f"m{i + 1}={peer[i]}" for i in range(3))
    with ExitStack() as stack:
        servers = []
        for i in range(3):
            argv = ["etcd", "--name", f"m{i + 1}", "--data-dir", str(logdir / f"etcd-m{i + 1}"),
                    "--listen-client-urls", client[i], "--advertise-client-urls", client[i],
                    "--listen-peer-urls", peer[i], "--initial-advertise-peer-urls", peer[i],
                    "--initial-cluster", initial, "--initial-cluster-state", "new",
                    "--initial-cluster-token", f"kvstore-bench-{base}", "--logger", "zap", "--log-level", "error"]
            server = stack.enter_context(serving(f"etcd-m{i + 1}", argv, health_urls=[], logdir=logdir))
            server.url = client[i]
            servers.append(server)
        deadline = time.monotonic() + ETCD_READY_TIMEOUT_S
        for url in client:
            while True:
                status, body = http_request(url, "GET", "/health")
                if status == 200 and b'"true"' in body:
                    break
                for server in servers:
                    if server.proc.poll() is not None:
                        raise RuntimeError(f"bench: {server.name} exited:\n{server.log_tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"bench: etcd member {url} not healthy in {ETCD_READY_TIMEOUT_S:.0f} s: "
                                       f"{status} {body[:200]!r}")
                time.sleep(0.2)
        yield client, servers


def section_etcd(report: Report, args: argparse.Namespace, logdir: Path) -> None:
    print("\n[etcd] 3 members on loopback, wrk through the leader's JSON gateway", flush=True)
    if shutil.which("etcd") is None:
        print(ETCD_HINT, flush=True)
        report.failed_sections.append("etcd (not installed: apt-get install -y etcd-server)")
        return
    version = subprocess.run(["etcd", "--version"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
    with etcd_cluster(logdir) as (client, servers):
        leader_url = client[0]
        for url in client:
            status, body = etcd_post(url, "/v3/maintenance/status", "{}")
            if status == 200:
                data = json.loads(body)
                if data.get("leader") == data.get("header", {}).get("member_id"):
                    leader_url = url
        report.notes.append(f"etcd: {version.strip()}, 3 members, default durability (WAL fsync per raft batch), "
                            f"load through the leader ({leader_url})")
        for i in range(SPREAD_KEYS):
            body_json = f'{{"key":"{b64(etcd_key(i))}","value":"{b64(VALUE)}"}}'
            status, body = etcd_post(leader_url, "/v3/kv/put", body_json)
            if status != 200:
                raise RuntimeError(f"bench: etcd put answered {status}: {body[:200]!r}")
        status, body = etcd_post(leader_url, "/v3/kv/range", f'{{"key":"{b64(etcd_key(7))}"}}')
        if status != 200 or b64(VALUE).encode() not in body:
            raise RuntimeError(f"bench: etcd range of a preloaded key answered {status}: {body[:300]!r}")
        pids = [pid for server in servers for pid in server.pids()]
        runs = [("etcd_put", "etcd 3 members PUT /v3/kv/put (leader)", "/v3/kv/put", PUT_KEYSPACE, ""),
                ("etcd_range", "etcd 3 members range, linearizable (leader)", "/v3/kv/range", SPREAD_KEYS, ""),
                ("etcd_range_serial", "etcd 3 members range, serializable (leader)", "/v3/kv/range", SPREAD_KEYS,
                 ',"serializable":true')]
        for key, label, path, keyspace, extra in runs:
            lua = write_lua(logdir, key, etcd_lua(path, keyspace, extra))
            report.add(key, run_wrk(label, leader_url, lua=lua, duration_s=args.duration, warmup_s=args.warmup,
                                    server_pids=pids))


# -- report --------------------------------------------------------------------------------


def print_report(report: Report, args: argparse.Namespace) -> None:
    if report.rows:
        headers = ["scenario", "req/s", "p50 ms", "p99 ms", "server CPU us/req", "server core busy", "errors"]
        rows = [[r.label, f"{r.rps:,.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}", f"{r.cpu_us_per_request:.0f}",
                 f"{r.server_core_busy:.0%}", str(r.errors)] for r in report.rows.values()]
        print()
        print(format_table(headers, rows, markdown=args.markdown))
        print(f"\n({args.duration:g} s per run after a {args.warmup:g} s warm-up; storage {args.storage}"
              f"{' (LMDB, --fsync batch)' if args.storage == 'lmdb' else ''} for the quorum and slow rows)")
    if report.converge:
        headers = ["anti-entropy pace", "writes missed by node3", "load rate (node3 down)", "node3 ready after",
                   "node3 holds every key after", "hints delivered", "anti-entropy repairs", "read repairs"]
        rows = []
        for c in report.converge:
            conv = f"{c['converged_s']:.1f} s" if c["converged_s"] is not None else \
                f"not within {CONVERGE_TIMEOUT_S:.0f} s ({c['held']:,.0f} of {c['expected']:,})"
            ready = f"{c['ready_s']:.1f} s" if c["ready_s"] is not None else "-"
            rows.append([str(c["flags"]), f"{c['acked']:,}", f"{c['acked'] / c['load_s']:,.0f} writes/s", ready, conv,
                         f"{c['hints_delivered']:,.0f}", f"{c['ae_repaired']:,.0f}", f"{c['read_repairs']:,.0f}"])
        print()
        print(format_table(headers, rows, markdown=args.markdown))
        print(f"\n(times from node3's restart on its data dir; 'holds every key' = its kvstore_keys gauge reaches "
              f"the {SPREAD_KEYS:,} preloaded + the acknowledged writes; LMDB data dirs, --fsync batch)")
    for note in report.notes:
        print(f"note: {note}")


def check_targets(report: Report) -> bool:
    rows = report.rows
    checks: list[tuple[str, float, float, str]] = []
    for op in ("get", "put"):
        if f"n1_{op}" in rows and f"n3_{op}" in rows:
            checks.append((f"N=3 quorum {op.upper()} / N=1", rows[f"n3_{op}"].rps / rows[f"n1_{op}"].rps,
                           TARGETS["quorum_vs_n1"], ">="))
    for ours, theirs, name in (("n3_put", "etcd_put", "PUT / etcd put"), ("n3_get", "etcd_range", "GET / etcd range")):
        if ours in rows and theirs in rows:
            checks.append((f"N=3 quorum {name}", rows[ours].rps / rows[theirs].rps, TARGETS["vs_etcd"], ">="))
    if "slow_none" in rows and "slow_one" in rows:
        checks.append(("GET p99 one slowed / none", rows["slow_one"].p99_ms / rows["slow_none"].p99_ms,
                       TARGETS["slow_p99"], "<="))
    ok = True
    print("\ntargets (issue 4):")
    for name, ratio, target, sense in checks:
        met = ratio >= target if sense == ">=" else ratio <= target
        ok &= met
        print(f"  {name:<34} {ratio:5.2f}x  target {sense} {target}x  {'met' if met else 'MISSED'}")
    for c in report.converge:
        if c["converged_s"] is None or c["failed"]:
            ok = False
            print(f"  convergence ({c['pace']} pace): MISSED (not converged within {CONVERGE_TIMEOUT_S:.0f} s"
                  f" or {c['failed']} writes failed)")
    for section in report.failed_sections:
        ok = False
        print(f"  section not run: {section}")
    starved = [r.label for r in rows.values() if r.server_core_busy < 0.85]
    if starved:
        print(f"  WARNING: server core under 85% busy in: {', '.join(starved)} (machine contention or latency-bound)")
    bad = [r.label for r in rows.values() if r.errors]
    if bad:
        print(f"  errors (socket errors or non-2xx) in: {', '.join(bad)}")
        ok = False
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="quorum,converge,slow,etcd", help="sections to run, comma-separated")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured wrk run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of discarded warm-up before each run")
    parser.add_argument("--storage", choices=("lmdb", "memory"), default="lmdb",
                        help="engine of the quorum and slow nodes (convergence always uses lmdb data dirs)")
    parser.add_argument("--converge-paces", default="default,fast",
                        help=f"anti-entropy paces for the convergence runs: {', '.join(PACES)}")
    parser.add_argument("--converge-writes", type=int, default=CONVERGE_WRITES,
                        help="distinct keys written while node3 is down (the issue's figure: 100,000)")
    parser.add_argument("--profile", metavar="PREFIX", help="py-spy node1 during an extra N=3 quorum PUT run; "
                        "raw stacks to PREFIX-n1-put.txt (py-spy from BENCH_PYSPY or PATH)")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown (for BENCHMARKS.md)")
    args = parser.parse_args()
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - {"quorum", "converge", "slow", "etcd"}
    args.converge_paces = [p.strip() for p in args.converge_paces.split(",") if p.strip()]
    if unknown or set(args.converge_paces) - set(PACES):
        parser.error(f"unknown section or pace: {sorted(unknown | (set(args.converge_paces) - set(PACES)))}")
    require_wrk()
    # This script (loader, proxy, polling) stays off the server core; servers are pinned there by taskset.
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    print(f"machine: {machine_summary()}", flush=True)
    print(f"app under test: {APP_DIR / 'app'}", flush=True)
    report = Report()
    with tempdir("kvstore-bench-cluster-") as tmp:
        logdir = Path(tmp)
        luas = {"get": write_lua(logdir, "get", LUA_GET), "put": write_lua(logdir, "put", LUA_PUT)}
        if "quorum" in sections:
            section_quorum(report, args, logdir, luas)
        if "slow" in sections:
            section_slow(report, args, logdir, luas)
        if "etcd" in sections:
            section_etcd(report, args, logdir)
        if "converge" in sections:
            section_converge(report, args, logdir)
    print_report(report, args)
    return 0 if check_targets(report) else 1


if __name__ == "__main__":
    sys.exit(main())
