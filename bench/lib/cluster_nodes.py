"""Our nodes under the cluster benchmark (bench/cluster.py): the harness's
Cluster (tests/harness/processes.py) pinned to the server core and running
the app from BENCH_APP_DIR, the wrk scripts that drive it, and readings of a
node's /metrics. Used by cluster_quorum.py, cluster_slow.py and
cluster_converge.py.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

from bench.lib.common import APP_DIR, SERVER_CORE, http_request, lua_rest_put
from tests.harness.processes import Cluster, TlsMode

NODES = 3
VALUE = b"v" * 100  # a 100-byte value, as in the other benches
SPREAD_KEYS = 1000  # keys preloaded for the GET runs, spread over every owner
PUT_KEYSPACE = 100_000  # PUT runs cycle over this many keys: bounded data, mostly overwrites

LUA_GET = f"""
local counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", "/kv/s" .. (counter % {SPREAD_KEYS}))
end
"""
LUA_PUT = lua_rest_put(PUT_KEYSPACE, VALUE.decode())


def start_cluster(
    stack: ExitStack,
    *,
    logdir: Path,
    name: str,
    rf: int,
    storage: str,
    extra: Sequence[str] = (),
    peers_for: Callable[[str, dict[str, str]], dict[str, str]] | None = None,
    tls: TlsMode | None = None,
    size: int = NODES,
) -> Cluster:
    """`size` (three unless told) `kvstore node` processes (node1..node3) on the server core, each in
    its own process group, stopped when `stack` closes; started and ready.
    Logs in logdir/name/, LMDB data dirs (storage "lmdb") in logdir/name-data/."""
    log_dir = logdir / name
    log_dir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(
        size=size,
        log_dir=log_dir,
        args=["--replication-factor", str(rf), "--log-level", "warning", *extra],
        data_root=logdir / f"{name}-data" if storage == "lmdb" else None,
        engines=("lmdb",),  # measured on the default engine alone (tests mix engines)
        peers_for=peers_for,
        env_for={f"node{i + 1}": {"PYTHONPATH": str(APP_DIR)} for i in range(size)},
        launcher=["taskset", "-c", SERVER_CORE],  # taskset execs the node: its pid is the node's
        cwd=APP_DIR,
        tls=tls,
    )
    stack.callback(cluster.stop)
    return cluster.start()


def metric(url: str, name: str, *labels: str, context: ssl.SSLContext | None = None) -> float | None:
    """Sum of the samples of `name` (only those whose label set contains every
    one of `labels`, e.g. 'peer="node3"') in the node's /metrics; None when the
    node does not answer. `context` verifies an https node."""
    status, body = http_request(url, "GET", "/metrics", context=context)
    if status != 200:
        return None
    total = 0.0
    for line in body.decode().splitlines():
        if (
            line.startswith(name)
            and line[len(name) : len(name) + 1] in ("{", " ")
            and all(label in line for label in labels)
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def reads_sent(url: str, peer: str) -> float:
    """Replica reads the node at url has sent to peer so far."""
    return metric(url, "kvstore_forwarded_requests_total", f'peer="{peer}"', 'op="read"') or 0.0
