"""A local cluster of node processes: what `kvstore cluster` runs, and what
the test and bench harness (tests/harness/processes.py) builds on: the node
flags of a member, the readiness wait, and stopping process groups so that no
node outlives its parent. Imports the standard library and app.config only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from app.config import CLUSTER_READY_WAIT_S
from app.errors import ConfigError

CLUSTER_STOP_GRACE_S = 5.0  # how long `kvstore cluster` waits for nodes to exit before SIGKILL
PR_SET_PDEATHSIG = 1  # linux prctl: signal the child when its parent dies


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if `kvstore cluster` itself dies,
    so even a SIGKILLed parent leaves no orphan node behind."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def cluster_node_args(*, node_id: str, listen: str, peers: dict[str, str]) -> list[str]:
    """The `kvstore node` flags of one cluster member; the test and bench harness
    (tests/harness/processes.py) starts its nodes with the same."""
    return ["--node-id", node_id, "--listen", listen, "--peers", ",".join(f"{nid}={url}" for nid, url in peers.items())]


def run(
    *, nodes: int, base_port: int, host: str, data_dir: str | None = None, replication_factor: str | None = None
) -> int:
    """`kvstore cluster`: start the nodes, say when every one is ready, and stop
    them all on SIGINT or SIGTERM (or when one exits); the exit status."""
    if not 1 <= nodes <= 64:
        raise ConfigError("config: --nodes must be between 1 and 64")
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    procs: list[subprocess.Popen[bytes]] = []
    peers = {f"node{i + 1}": f"http://{host}:{base_port + i}" for i in range(nodes)}
    try:
        for index, node_id in enumerate(peers):
            node_args = cluster_node_args(node_id=node_id, listen=f"{host}:{base_port + index}", peers=peers)
            if data_dir:
                node_args += ["--data-dir", os.path.join(data_dir, node_id)]
            if replication_factor:
                node_args += ["--replication-factor", str(replication_factor)]
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "app", "node", *node_args],
                    preexec_fn=_die_with_parent,
                    # Own session: a terminal's Ctrl-C reaches only us, and we stop
                    # the nodes in order instead of racing them.
                    start_new_session=True,
                )
            )
            print(f"kvstore: started {node_args[1]} on http://{node_args[3]} (pid {procs[-1].pid})", flush=True)
        if wait_until_ready(list(peers.values()), procs=procs, stopping=lambda: stopping):
            print("kvstore: cluster running, every node ready; Ctrl-C stops it", flush=True)
        elif not stopping:
            print(
                f"kvstore: cluster running, but not every node was ready within {CLUSTER_READY_WAIT_S:.0f} s "
                "(see GET /ready on each); Ctrl-C stops it",
                flush=True,
            )
        while not stopping:
            if any(proc.poll() is not None for proc in procs):
                dead = [p.pid for p in procs if p.returncode is not None]
                print(f"kvstore: node process(es) {dead} exited; stopping the cluster", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    finally:
        stop_all(procs)
        print("kvstore: cluster stopped", flush=True)


def wait_until_ready(
    urls: Sequence[str],
    *,
    procs: Sequence[subprocess.Popen[bytes]],
    stopping: Callable[[], bool] = lambda: False,
    timeout: float = CLUSTER_READY_WAIT_S,
    path: str = "/ready",
    ssl_context: ssl.SSLContext | None = None,
) -> bool:
    """Poll each node's /ready: a fresh cluster's nodes first pull their
        ranges from each other, and until then quorum reads may get 503. Saying
        "running" only after that keeps the README's curl walkthrough from racing it.
        False when time runs out, `stopping()` turns true, or a process in
        `procs` exits. The test and bench harness waits with this too (with
    `ssl_context` for https nodes)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    pending = list(urls)
    while pending and not stopping() and time.monotonic() < deadline:
        if any(proc.poll() is not None for proc in procs):
            return False  # the caller reports the dead node
        try:
            with urllib.request.urlopen(pending[0] + path, timeout=1, context=ssl_context) as resp:
                if resp.status == 200:
                    pending.pop(0)
                    continue
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    return not pending


def stop_all(procs: Sequence[subprocess.Popen[bytes]], *, grace_s: float = CLUSTER_STOP_GRACE_S) -> None:
    """SIGTERM every process's group at once (SIGCONT first: a stopped process
    cannot act on it), wait up to grace_s for all, then SIGKILL the group of
    any still running. Each process must lead its own session
    (start_new_session), as `kvstore cluster`'s nodes and the harness's do."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGCONT)
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):  # it exited between the wait and the kill
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
