"""Gray failures: links that reset, peers that accept and never answer, one-way
cuts, a bridge, and a partition that moves every two seconds.

Three nodes (N=3, quorum, LMDB); every node-to-node link goes through its own
proxy per direction (ProxyMesh), which passes, resets ("reset": close and
refuse) or blackholes (accept, never forward). Twelve writers and two quorum
readers hit random nodes of the majority side directly. Per schedule, after a
quiet spell, the fault holds for FAULT_S, then heals; the history checker
judges it:

- lost = 0, and no quorum read returned a state older than a write
  acknowledged before it began;
- no answer is a 500;
- the majority side takes at least 99.5% of the writes sent to it;
- under the blackhole, its quorum reads keep their latency: p99 at most 3x
  the same run's quiet p99, and fewer than 1% over a second.

Each test prints its row of the table in BENCHMARKS.md ("gray failures").
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from app.ring import HashRing
from tests.harness.processes import Cluster
from tests.harness.proxy import CutMode, ProxyMesh
from tests.integration.history import Load, Op, check, observe, stale_reads
from tests.integration.probes import wait_converged

N = 3
TOKEN = "gray-test-token"
NODE_ARGS = [
    "--replication-factor",
    str(N),
    "--peer-timeout",
    "2",
    "--anti-entropy-interval",
    "1",
    "--cluster-token",
    TOKEN,
]
KEYS = [f"gray-{i:03d}" for i in range(200)]
WRITERS, READERS = 12, 2
QUIET_S = 3.0
FAULT_S = 10.0
FLAP_EVERY_S = 2.0
MIN_WRITE_AVAILABILITY = 0.995
MAX_P99_OVER_QUIET = 3.0
MAX_SLOW_READS = 0.01  # share of majority-side reads over SLOW_READ_S
SLOW_READ_S = 1.0
CONVERGE_S = 30.0

pytestmark = pytest.mark.slow

MakeCluster = Callable[..., Cluster]
StartLoad = Callable[..., Load]
IDS = ("node1", "node2", "node3")


@dataclass
class Phase:
    """A stretch of the fault with its majority side: requests sent in it to
    those nodes count, unless the node they went to left the majority before
    they finished (the client could not have known)."""

    start: float
    end: float
    majority: frozenset[str]


class Matrix:
    """A three-node cluster behind a proxy mesh, and its client loads."""

    def __init__(self, make_cluster: MakeCluster, start_load: StartLoad, mesh: ProxyMesh) -> None:
        self.mesh = mesh
        self.cluster = make_cluster(3, args=NODE_ARGS, durable=True, peers_for=mesh.route)
        self.urls = self.cluster.direct_peers
        self.ids_of = {url: node_id for node_id, url in self.urls.items()}
        everyone = list(self.urls.values())
        self.writers = start_load(urls=everyone, keys=KEYS, clients=WRITERS, name="w", read_ratio=0.0)
        self.readers = start_load(urls=everyone, keys=KEYS, clients=READERS, name="r", read_ratio=1.0, delete_ratio=0.0)
        self.phases: list[Phase] = []

    def steer(self, majority: set[str]) -> None:
        targets = [self.urls[node_id] for node_id in sorted(majority)]
        self.writers.urls = targets
        self.readers.urls = targets

    def cut(self, src: str, dst: str, mode: CutMode) -> None:
        self.mesh.proxies[src, dst].cut(mode)

    def isolate(self, node_id: str, mode: CutMode) -> None:
        self.mesh.partition(node_id, mode=mode)

    def run(self, seconds: float) -> None:
        self.writers.run_for(seconds)

    def phase(self, majority: set[str], seconds: float) -> None:
        start = time.monotonic()
        self.steer(majority)
        self.run(seconds)
        self.phases.append(Phase(start, time.monotonic(), frozenset(majority)))

    def finish(self) -> list[Op]:
        self.mesh.heal()
        self.steer(set(IDS))
        self.run(1.0)
        ops = self.writers.stop() + self.readers.stop()
        ring = HashRing(list(self.urls))
        wait_converged(
            self.urls, KEYS, owners=lambda key: ring.owners(key.encode(), N), token=TOKEN, timeout=CONVERGE_S
        )
        return ops

    def majority_side(self, ops: list[Op]) -> Iterator[Op]:
        """Requests sent during the fault to a node of the majority, which
        stayed in it until the request finished."""
        for op in ops:
            node = self.ids_of.get(op.node)
            finished = op.finished if op.finished is not None else op.sent
            for index, phase in enumerate(self.phases):
                if phase.start <= op.sent < phase.end and node in phase.majority:
                    later = self.phases[index + 1 :]
                    left = any(p.start <= finished and node not in p.majority for p in later)
                    if not left:
                        yield op
                    break


def latencies(ops: Iterator[Op] | list[Op]) -> list[float]:
    return sorted((op.finished or op.sent) - op.sent for op in ops if op.outcome == "ok")


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, math.ceil(q * len(values)) - 1)] if values else math.nan


def judge(matrix: Matrix, ops: list[Op], *, schedule: str, quiet: tuple[float, float]) -> dict[str, float]:
    verdict = check(ops, observe(matrix.urls, KEYS))
    print(verdict.summary())
    assert verdict.lost == 0, verdict.summary()
    five_hundreds = [op.error for op in ops if "HTTP 500" in op.error]
    assert not five_hundreds, f"{len(five_hundreds)} answers of 500, e.g. {five_hundreds[:3]}"
    stale = stale_reads(ops)
    assert not stale, f"{len(stale)} stale quorum reads, e.g. {stale[:3]}"

    side = list(matrix.majority_side(ops))
    writes = [op for op in side if op.is_write]
    reads = [op for op in side if op.kind == "get"]
    refused = [op.error for op in writes if op.outcome != "ok"]
    print("refused e.g.:", refused[:6])
    availability = 1 - len(refused) / len(writes)
    quiet_reads = latencies([op for op in ops if op.kind == "get" and quiet[0] <= op.sent < quiet[1]])
    read_times, write_times = latencies(reads), latencies(writes)
    row = {
        "writes": len(writes),
        "availability": availability,
        "read_p50_ms": percentile(read_times, 0.50) * 1000,
        "read_p99_ms": percentile(read_times, 0.99) * 1000,
        "write_p50_ms": percentile(write_times, 0.50) * 1000,
        "write_p99_ms": percentile(write_times, 0.99) * 1000,
        "quiet_read_p99_ms": percentile(quiet_reads, 0.99) * 1000,
        "slow_reads": sum(t > SLOW_READ_S for t in read_times) / max(1, len(read_times)),
    }
    print(
        f"| {schedule} | {availability:.2%} ({len(writes)} writes) | {row['read_p50_ms']:.1f} / "
        f"{row['read_p99_ms']:.1f} ms (quiet p99 {row['quiet_read_p99_ms']:.1f}) | {row['write_p50_ms']:.1f} / "
        f"{row['write_p99_ms']:.1f} ms | 0 |"
    )
    assert len(writes) >= 500 and len(reads) >= 100, row
    assert availability >= MIN_WRITE_AVAILABILITY, f"{schedule}: {availability:.2%}: e.g. {refused[:3]}"
    return row


def quiet_spell(matrix: Matrix) -> tuple[float, float]:
    start = time.monotonic()
    matrix.run(QUIET_S)
    return start, time.monotonic()


def test_a_node_isolated_by_dropped_links(
    make_cluster: MakeCluster, start_load: StartLoad, proxy_mesh: ProxyMesh
) -> None:
    matrix = Matrix(make_cluster, start_load, proxy_mesh)
    quiet = quiet_spell(matrix)
    matrix.isolate("node1", "reset")
    matrix.phase({"node2", "node3"}, FAULT_S)
    judge(matrix, matrix.finish(), schedule="(a) node1 isolated, links reset", quiet=quiet)


def test_a_node_isolated_by_a_blackhole_keeps_reads_fast(
    make_cluster: MakeCluster, start_load: StartLoad, proxy_mesh: ProxyMesh
) -> None:
    matrix = Matrix(make_cluster, start_load, proxy_mesh)
    quiet = quiet_spell(matrix)
    matrix.isolate("node1", "blackhole")
    matrix.phase({"node2", "node3"}, FAULT_S)
    row = judge(matrix, matrix.finish(), schedule="(b) node1 isolated, blackhole", quiet=quiet)
    assert row["read_p99_ms"] <= MAX_P99_OVER_QUIET * max(row["quiet_read_p99_ms"], 1.0), row
    assert row["slow_reads"] < MAX_SLOW_READS, row


def test_a_one_way_cut(make_cluster: MakeCluster, start_load: StartLoad, proxy_mesh: ProxyMesh) -> None:
    matrix = Matrix(make_cluster, start_load, proxy_mesh)
    quiet = quiet_spell(matrix)
    matrix.cut("node2", "node1", "blackhole")  # the others cannot reach node1; node1 reaches them
    matrix.cut("node3", "node1", "blackhole")
    matrix.phase({"node2", "node3"}, FAULT_S)
    judge(matrix, matrix.finish(), schedule="(c) one-way: nobody reaches node1", quiet=quiet)


def test_a_bridge_node_between_two_that_cannot_see_each_other(
    make_cluster: MakeCluster, start_load: StartLoad, proxy_mesh: ProxyMesh
) -> None:
    matrix = Matrix(make_cluster, start_load, proxy_mesh)
    quiet = quiet_spell(matrix)
    for src, dst in (("node1", "node3"), ("node3", "node1")):
        matrix.cut(src, dst, "blackhole")
    matrix.phase(set(IDS), FAULT_S)  # every node has a majority: itself and node2
    judge(matrix, matrix.finish(), schedule="(d) bridge: node1 and node3 cut, node2 sees both", quiet=quiet)


def test_a_partition_that_moves_every_two_seconds(
    make_cluster: MakeCluster, start_load: StartLoad, proxy_mesh: ProxyMesh
) -> None:
    matrix = Matrix(make_cluster, start_load, proxy_mesh)
    quiet = quiet_spell(matrix)
    for index in range(int(FAULT_S / FLAP_EVERY_S)):
        isolated = IDS[index % 3]
        proxy_mesh.heal()
        matrix.isolate(isolated, "reset")
        matrix.phase(set(IDS) - {isolated}, FLAP_EVERY_S)
    judge(matrix, matrix.finish(), schedule="(e) flapping: a different node isolated every 2 s", quiet=quiet)
