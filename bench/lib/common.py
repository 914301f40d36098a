"""Shared helpers for the benchmark scripts: server processes, wrk runs, tables.

A server runs in its own process group, pinned to the server core, on a free
loopback port; `serving(...)` waits for its health route and always kills the
whole group on the way out (SIGTERM, then SIGKILL), so an interrupted bench
leaves nothing behind. Never pkill/killall: only the groups we started.
Ports, the readiness wait and the group stop are the test harness's
(tests/harness/processes.py, itself on `kvstore cluster`'s code), which also
runs whole clusters for bench/cluster_*.py.
wrk runs pinned to the load core and reports through a Lua done() hook.
Imports the stdlib and tests.harness (the scripts import app.* themselves when needed).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.processes import free_port as free_port
from tests.harness.processes import stop_group
from tests.harness.processes import wait_ready as _wait_ready

BENCH_DIR = Path(__file__).resolve().parents[1]
REPO = BENCH_DIR.parent

PYTHON = sys.executable  # the venv's interpreter: servers run with the same one
# The tree whose `app` package the servers run: the working tree by default, or
# a snapshot (e.g. `git archive HEAD app bench | tar -x -C /tmp/snap`; bench/
# for the peer_clients forwarder, which runs as `-m bench.peer_clients`) to
# measure a fixed commit while others edit app/. The bench process itself
# imports the working tree's `app` (tests.harness does, first).
APP_DIR = Path(os.environ.get("BENCH_APP_DIR", REPO)).resolve()

SERVER_CORE = os.environ.get("BENCH_SERVER_CORE", "0")  # every server process shares this core
LOAD_CORE = os.environ.get("BENCH_LOAD_CORE", "1")  # wrk gets the other one to itself
CONNECTIONS = 64  # keep-alive connections: every bench target is stated at this concurrency
WRK_THREADS = 1  # one load core -> one wrk thread
STARTUP_TIMEOUT_S = 20.0  # a node imports FastAPI + builds a 1024-vnode ring: a few seconds at most
STOP_GRACE_S = 8.0  # SIGTERM, then SIGKILL the group after this long (`kvstore cluster` itself waits 5 s)
WRK_TIMEOUT = "2s"  # a request slower than this counts as a wrk timeout error

# Printed by done() as one line; parsed by run_wrk.
_DONE_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK_RESULT {\"requests\": %d, \"duration_us\": %d, \"p50_us\": %d, \"p99_us\": %d, " ..
    "\"connect\": %d, \"read\": %d, \"write\": %d, \"status\": %d, \"timeout\": %d}\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def require_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        sys.exit(
            "bench: wrk not found. Install it from Debian's packages:\n"
            "    sudo apt-get update && sudo apt-get install -y wrk\n"
            "(on other systems: your package manager's `wrk`, or build https://github.com/wg/wrk)"
        )
    if shutil.which("taskset") is None:
        sys.exit("bench: taskset not found (util-linux); it pins servers and load to separate cores")
    return path


# -- server processes ----------------------------------------------------------


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""
    extra_pids: list[int] = field(default_factory=list)  # e.g. `kvstore cluster`'s node processes
    _extra_starts: dict[int, str | None] = field(default_factory=dict)  # pid -> start time, against pid reuse

    def pids(self) -> list[int]:
        return [self.proc.pid, *self.extra_pids]

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _kill_group(server: Server) -> None:
    stop_group(server.proc, grace_s=STOP_GRACE_S)
    pgid = server.proc.pid  # start_new_session: the group id is the leader's pid
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)  # stragglers of the group, if any
    for pid in server.extra_pids:  # processes that made sessions of their own
        if _start_time(pid) == server._extra_starts.get(pid):  # still the same process, not a reused pid
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextmanager
def spawned(name: str, argv: Sequence[str], *, logdir: Path) -> Iterator[Server]:
    """Start argv pinned to the server core in its own process group and
    return at once (no health check); always kill the group afterwards."""
    log_path = logdir / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["taskset", "-c", SERVER_CORE, *argv],  # taskset execs argv: proc.pid is the server's own pid
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=APP_DIR,
            env={**os.environ, "PYTHONPATH": str(APP_DIR)},
        )
    server = Server(name=name, proc=proc, log_path=log_path)
    try:
        yield server
    finally:
        _kill_group(server)


@contextmanager
def serving(
    name: str,
    argv: Sequence[str],
    *,
    health_urls: Sequence[str],
    health_path: str = "/health",
    logdir: Path,
    ssl_context: ssl.SSLContext | None = None,
) -> Iterator[Server]:
    """Start argv pinned to the server core in its own process group; wait until
    every health URL answers 200 (https ones verified with ssl_context); always
    kill the group afterwards."""
    with spawned(name, argv, logdir=logdir) as server:
        server.url = health_urls[0] if health_urls else ""
        proc = server.proc
        _wait_ready(
            health_urls,
            procs=[proc],
            path=health_path,
            timeout=STARTUP_TIMEOUT_S,
            logs=[server.log_path],
            ssl_context=ssl_context,
        )
        server.extra_pids = descendants(proc.pid)
        server._extra_starts = {pid: _start_time(pid) for pid in server.extra_pids}
        yield server


def wait_ready(urls: Sequence[str], path: str = "/ready", *, servers: Sequence[Server] = ()) -> None:
    """Wait until every URL answers 200 on path (nodes that need each other
    to be ready are all started first, then waited for); fails when one of
    `servers` exits."""
    _wait_ready(
        urls,
        procs=[server.proc for server in servers],
        path=path,
        timeout=STARTUP_TIMEOUT_S,
        logs=[server.log_path for server in servers],
    )


def descendants(pid: int) -> list[int]:
    """Every live descendant of pid (Linux /proc), e.g. the nodes of `kvstore cluster`."""
    found: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found.append(child)
            stack.append(child)
    return [p for p in found if p != pid]


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]  # field 22: starttime
    except (OSError, IndexError):
        return None


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time consumed so far by the given processes."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / tick


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of a process, in KiB (/proc/PID/status)."""
    fields: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                fields[name] = int(value.split()[0])
    except OSError:
        pass
    return fields


# -- a tiny keep-alive client for setup (preloading keys, reading metrics) -----


def http_request(
    base_url: str,
    method: str,
    path: str,
    body: bytes | None = None,
    conn: http.client.HTTPConnection | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, bytes]:
    """One request; https URLs verify with `context` (the bench's own CA)."""
    https = base_url.startswith("https://")
    host, _, port = base_url.removeprefix("https://").removeprefix("http://").partition(":")
    own = conn is None
    if own:
        if https:
            conn = http.client.HTTPSConnection(host, int(port), timeout=5, context=context)
        else:
            conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request(method, path, body=body, headers={"content-type": "application/json"} if body else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    except OSError:
        return 0, b""
    finally:
        if own:
            conn.close()


# -- wrk -------------------------------------------------------------------------


@dataclass
class Result:
    label: str
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors + non-2xx/3xx answers
    server_cpu_s: float
    other_cpu_s: float = 0.0  # CPU of other_pids (e.g. a backend), measured over the same window

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_us_per_request(self) -> float:
        return self.server_cpu_s / self.requests * 1e6 if self.requests else 0.0

    @property
    def server_core_busy(self) -> float:
        return self.server_cpu_s / self.seconds if self.seconds else 0.0


def lua_rest_put(keyspace: int, value: str) -> str:
    """wrk script: PUT /kv/k<i> with a fixed raw body, i cycling over keyspace
    keys (bounded data, mostly overwrites)."""
    return f"""
local counter = 0
local value = "{value}"
request = function()
  counter = counter + 1
  return wrk.format("PUT", "/kv/k" .. (counter % {keyspace}), nil, value)
end
"""


def write_lua(logdir: Path, name: str, body: str) -> Path:
    path = logdir / f"{name}.lua"
    path.write_text(body + "\n" + _DONE_LUA)
    return path


def run_wrk(
    label: str,
    url: str,
    *,
    lua: Path,
    duration_s: float,
    warmup_s: float,
    server_pids: Sequence[int],
    other_pids: Sequence[int] = (),
    script_args: Sequence[str] = (),
    connections: int = CONNECTIONS,
) -> Result:
    """A short warm-up run (discarded), then the measured one; server CPU time
    is sampled from /proc around the measured run. script_args go to the Lua
    script's init(args) (after wrk's `--`); `connections` keep-alive
    connections (CONNECTIONS unless a bench varies the concurrency)."""
    base = [
        "taskset",
        "-c",
        LOAD_CORE,
        "wrk",
        f"-t{WRK_THREADS}",
        f"-c{connections}",
        "--latency",
        f"--timeout={WRK_TIMEOUT}",
        "-s",
        str(lua),
    ]
    extra = ["--", *script_args] if script_args else []
    if warmup_s > 0:
        subprocess.run(
            [*base, f"-d{warmup_s:g}s", url, *extra], capture_output=True, check=False, timeout=warmup_s + 30
        )
    cpu_before, other_before = cpu_seconds(server_pids), cpu_seconds(other_pids)
    out = subprocess.run(
        [*base, f"-d{duration_s:g}s", url, *extra], capture_output=True, text=True, check=False, timeout=duration_s + 30
    )
    cpu_after, other_after = cpu_seconds(server_pids), cpu_seconds(other_pids)
    line = next((text for text in out.stdout.splitlines() if text.startswith("WRK_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"bench: wrk gave no result for {label}:\n{out.stdout}\n{out.stderr}")
    data = json.loads(line.removeprefix("WRK_RESULT "))
    errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
    return Result(
        label=label,
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        errors=errors,
        server_cpu_s=cpu_after - cpu_before,
        other_cpu_s=other_after - other_before,
    )


def tempdir(prefix: str) -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix=prefix)


# -- output ------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def fmt(row: Sequence[object]) -> str:
        return "  ".join(
            str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def machine_summary() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False).stdout.splitlines()
    return (
        f"{os.cpu_count()} cores ({model}), Python {sys.version.split()[0]}, "
        f"{wrk_version[0] if wrk_version else 'wrk'}; servers on core {SERVER_CORE}, wrk on core {LOAD_CORE}, "
        f"{CONNECTIONS} connections"
    )
