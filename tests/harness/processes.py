"""Real `kvstore node` processes: free loopback ports, start in their own
process group, wait until ready, pause, kill or stop with real signals,
always reap; optionally with a skewed wall clock (libfaketime), and
optionally over TLS (`TlsMode`: https URLs, each node's certificate flags,
the client context the readiness polls verify with).

Built on `kvstore cluster`'s code in app/local_cluster.py: the node flags
(`cluster_node_args`), the readiness wait (`wait_until_ready`) and the
process-group stop (`stop_all`). Used by tests/integration (through its
conftest's `make_cluster`), tests/k8s/test_discovery.py and bench/ (which adds
a CPU-pinning launcher). Imports no pytest and no HTTP client library.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.local_cluster import cluster_node_args, stop_all, wait_until_ready

HOST = "127.0.0.1"
READY_TIMEOUT_S = 20.0  # a node imports FastAPI and builds its ring in a few seconds; a loaded CI box, more
STOP_TIMEOUT_S = 5.0  # SIGTERM, then SIGKILL: `kvstore cluster`'s own grace
FAKETIME_LIBRARY = "/usr/lib/*/faketime/libfaketime.so.1"  # Debian's faketime package (`make tools`)
PORT_SEARCH_TRIES = 200  # random free ports tried for a free run before giving up


@dataclass(frozen=True)
class TlsMode:
    """Nodes serve https: `node_args(node_id)` gives one node's TLS flags (its
    certificate files), `context` is what the harness's own requests verify
    with (and present, for --client-cert-auth). tests/harness/certs.py makes one."""

    node_args: Callable[[str], list[str]]
    context: ssl.SSLContext


def skewed_clock(seconds: float) -> dict[str, str]:
    """Environment that runs a process with its wall clock moved by `seconds`.
    The monotonic clock is left alone: asyncio's timers run on it. Fails (not
    skips) when libfaketime is missing: `make tools` installs it."""
    found = sorted(glob.glob(FAKETIME_LIBRARY))
    assert found, f"libfaketime not found at {FAKETIME_LIBRARY}: run `make tools` (apt-get install faketime)"
    return {
        "LD_PRELOAD": found[0],
        "FAKETIME": f"{seconds:+g}s",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_NO_CACHE": "1",
    }


def free_port(host: str = HOST) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_port_run(count: int, host: str = HOST) -> int:
    """A base port such that base .. base+count-1 are all free right now."""
    for _ in range(PORT_SEARCH_TRIES):
        base = free_port(host)
        if base + count >= 65536:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for offset in range(count):
                    stack.enter_context(socket.socket()).bind((host, base + offset))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no run of {count} free ports found")


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_ready(
    urls: Sequence[str],
    *,
    procs: Sequence[subprocess.Popen[Any]] = (),  # text or bytes: only polled
    timeout: float = READY_TIMEOUT_S,
    path: str = "/ready",
    logs: Sequence[Path] = (),
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Wait until every URL answers 200 on `path` (`/health`: serving, not
    necessarily ready). Raises RuntimeError when one of `procs` exits,
    TimeoutError when time runs out; either shows the tails of `logs`."""
    if wait_until_ready(urls, procs=procs, timeout=timeout, path=path, ssl_context=ssl_context):
        return
    tails = "\n".join(f"--- {log.name}\n{log_tail(log)}" for log in logs)
    dead = [f"pid {proc.pid} exited with {proc.returncode}" for proc in procs if proc.poll() is not None]
    if dead:
        raise RuntimeError(f"{', '.join(dead)} before {path} answered 200:\n{tails}")
    raise TimeoutError(f"not every one of {list(urls)} answered {path} with 200 within {timeout:g} s:\n{tails}")


def stop_group(proc: subprocess.Popen[bytes], *, grace_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process's group, SIGKILL it after grace_s; always reaped."""
    stop_all([proc], grace_s=grace_s)


class NodeProcess:
    """One `kvstore node` in its own process group, logging to a file.

    `launcher` goes before the interpreter (a bench pins nodes to a core with
    `taskset -c N`, which execs: the pid stays the node's); `cwd` and `env`
    apply at every start (`env` is added to this process's environment: a
    skewed clock, say). `python` runs the node (default: this interpreter);
    with `cwd` at another release's tree and its venv's interpreter, the node
    runs that release (tests/harness/releases.py); both may change between
    starts, as an upgrade does.
    """

    def __init__(
        self,
        *,
        node_id: str,
        host: str,
        port: int,
        peers: dict[str, str],
        log_dir: Path,
        args: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
        launcher: Sequence[str] = (),
        cwd: Path | None = None,
        tls: TlsMode | None = None,
    ) -> None:
        self.node_id = node_id
        self.tls = tls
        self.host = host
        self.port = port
        self.peers = peers
        self.args = list(args or [])
        self.env = dict(env or {})
        self.launcher = list(launcher)
        self.cwd = cwd
        self.python = sys.executable
        self.log_path = log_dir / f"{node_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """What a client of this node verifies with (None: plain HTTP)."""
        return self.tls.context if self.tls else None

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.node_id} never started"
        return self.proc.pid

    def command(self) -> list[str]:
        node_args = cluster_node_args(node_id=self.node_id, listen=f"{self.host}:{self.port}", peers=self.peers)
        tls_args = self.tls.node_args(self.node_id) if self.tls else []
        return [*self.launcher, self.python, "-m", "app", "node", *node_args, *tls_args, *self.args]

    def start(self) -> NodeProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.log_path, "ab") as log:  # appended: a restart keeps the earlier run's log
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.cwd,
                env={**os.environ, **self.env},
            )
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = READY_TIMEOUT_S, *, path: str = "/ready") -> None:
        wait_ready(
            [self.url],
            procs=[self.proc] if self.proc else [],
            timeout=timeout,
            path=path,
            logs=[self.log_path],
            ssl_context=self.ssl_context,
        )

    def wait_serving(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Up and answering /health, not necessarily ready (a joining node
        may count itself unready until the membership change admits it)."""
        self.wait_ready(timeout, path="/health")

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signum)

    def pause(self) -> None:
        """SIGSTOP: the process hangs with its sockets open (a stalled node)."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, nothing flushed."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM (after SIGCONT, should it be paused), then SIGKILL if it does not exit in time."""
        if self.proc is not None:
            stop_group(self.proc)

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)


# The durable engines a cluster with a data_root cycles through, node by node
# (node1 lmdb, node2 rocksdb, node3 lmdb, ...): every fault and crash test runs
# both engines in one mixed cluster, judged by the same history checker, at no
# extra CI time. Set it to ("lmdb",) to go back to one engine (say, if the
# RocksDB engine is removed).
MIXED_ENGINES: tuple[str, ...] = ("lmdb", "rocksdb")


class Cluster:
    """A set of node processes on 127.0.0.1, ids node1..nodeN as `kvstore cluster` names them.

    Every node gets the same peer list unless `peers_for(node_id, direct)` is
    given: it returns the peer list of one node from the direct {id: url} map
    (a ProxyMesh's `route`, so nodes reach each other through proxies).
    `env_for` adds environment variables to some nodes (a skewed clock);
    `launcher` and `cwd` apply to every node (see NodeProcess); with `tls`
    every node serves https (see TlsMode). With a `data_root`, node i runs
    `--storage engines[i % len(engines)]` (default MIXED_ENGINES) unless the
    args name a --storage themselves.
    """

    def __init__(
        self,
        *,
        size: int,
        log_dir: Path,
        args: Sequence[str] | None = None,
        data_root: Path | None = None,
        peers_for: Callable[[str, dict[str, str]], dict[str, str]] | None = None,
        env_for: dict[str, dict[str, str]] | None = None,
        launcher: Sequence[str] = (),
        cwd: Path | None = None,
        tls: TlsMode | None = None,
        engines: Sequence[str] = MIXED_ENGINES,
    ) -> None:
        self.host = HOST
        self.tls = tls
        self.engines = tuple(engines)
        self.scheme = "https" if tls else "http"
        self.log_dir = log_dir
        self.args = list(args or [])
        self.data_root = data_root
        self.peers_for = peers_for
        self.env_for = dict(env_for or {})
        self.launcher = list(launcher)
        self.cwd = cwd
        base = free_port_run(size, self.host)
        direct = {f"node{i + 1}": f"{self.scheme}://{self.host}:{base + i}" for i in range(size)}
        self.nodes: list[NodeProcess] = [
            self._node(node_id=node_id, port=base + i, direct=direct) for i, node_id in enumerate(direct)
        ]

    def _node(self, *, node_id: str, port: int, direct: dict[str, str]) -> NodeProcess:
        node_args = list(self.args)
        if self.data_root is not None:
            node_args += ["--data-dir", str(self.data_root / node_id)]
            if "--storage" not in node_args:
                node_args += ["--storage", self.engine_of(node_id)]
        peers = self.peers_for(node_id, dict(direct)) if self.peers_for is not None else dict(direct)
        return NodeProcess(
            node_id=node_id,
            host=self.host,
            port=port,
            peers=peers,
            log_dir=self.log_dir,
            args=node_args,
            env=self.env_for.get(node_id),
            launcher=self.launcher,
            cwd=self.cwd,
            tls=self.tls,
        )

    def engine_of(self, node_id: str) -> str:
        """The durable engine node N (1-based, from its id) runs: the cycle of `engines`."""
        number = int(node_id.removeprefix("node")) if node_id.removeprefix("node").isdigit() else 1
        return self.engines[(number - 1) % len(self.engines)]

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """What a client of the cluster verifies with (None: plain HTTP)."""
        return self.tls.context if self.tls else None

    @property
    def direct_peers(self) -> dict[str, str]:
        """Every node's own URL, by id (what a client or the admin API uses)."""
        return {node.node_id: node.url for node in self.nodes}

    def node(self, node_id: str) -> NodeProcess:
        return next(node for node in self.nodes if node.node_id == node_id)

    def add_node(self, *, node_id: str | None = None) -> NodeProcess:
        """A new node (not started) whose peer list is every node so far plus itself.

        Started before the membership change that admits it, per the
        membership contract; existing nodes keep their --peers until told.
        """
        node_id = node_id or f"node{len(self.nodes) + 1}"
        port = free_port(self.host)
        direct = {**self.direct_peers, node_id: f"{self.scheme}://{self.host}:{port}"}
        node = self._node(node_id=node_id, port=port, direct=direct)
        self.nodes.append(node)
        return node

    def start(self, *, unready: Iterable[str] = ()) -> Cluster:
        """Start every node, then wait until each is ready (they need each
        other for that); the `unready` ones (expected to stay unready) only
        until they serve."""
        unready = set(unready)
        for node in self.nodes:
            node.start()
        procs = [node.proc for node in self.nodes if node.proc is not None]
        logs = [node.log_path for node in self.nodes]
        for path, group in (
            ("/ready", [n for n in self.nodes if n.node_id not in unready]),
            ("/health", [n for n in self.nodes if n.node_id in unready]),
        ):
            wait_ready([node.url for node in group], procs=procs, path=path, logs=logs, ssl_context=self.ssl_context)
        return self

    def stop(self) -> None:
        """Every node at once: SIGTERM, then SIGKILL whatever outlives the grace."""
        stop_all([node.proc for node in self.nodes if node.proc is not None], grace_s=STOP_TIMEOUT_S)

    def __getitem__(self, index: int) -> NodeProcess:
        return self.nodes[index]

    @property
    def token(self) -> str | None:
        """The --cluster-token the nodes were started with, if any."""
        args = self.args
        return next((args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "--cluster-token"), None)

    def running_urls(self, among: Iterable[str] | None = None) -> dict[str, str]:
        """{id: url} of the nodes whose process is alive (optionally only `among` ids)."""
        wanted = set(among) if among is not None else None
        return {n.node_id: n.url for n in self.nodes if n.running and (wanted is None or n.node_id in wanted)}

    def pids(self) -> list[int]:
        """The running nodes' pids (a bench samples their CPU time)."""
        return [node.pid for node in self.nodes if node.running]
