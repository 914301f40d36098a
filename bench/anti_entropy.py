"""Anti-entropy over maintained digests (issue 10), measured in one run.

1. Preload: three LMDB data dirs (node1..node3) filled with the same --keys
   records (100-byte values, identical versions) through app.storage.open_store,
   so every replica already agrees.
2. In-process, on node1's dir (a child process, so its CPU is its own):
   - the digest index build at open: open_store, align to the 3-node ring,
     wait until built (wall and CPU);
   - a quiet round's digest work on one side: every arc's digest from the
     index, against the same digests by one pass over every record (what each
     round cost before), and a check that both agree;
   - the write path's cost of keeping the index: single-record apply() on a
     fresh LMDB store with the index against one without, alternated.
   - a clean close (which saves the index) and a reopen that restores it;
3. Processes: three nodes on the preloaded dirs (on the server core), with
   anti-entropy off (--anti-entropy-interval 3600: the first start, which
   builds the index) and then, restarted (the index restored), every
   --interval seconds: start to ready, index ready, CPU per node over --window seconds,
   rounds run, RSS; CPU per round = (CPU with rounds - CPU without) / rounds,
   both sides of every round included. `--reference-app DIR` (a tree with
   app/ inside, e.g. `git archive main app | tar -x -C DIR`) runs the same two
   cluster runs on that code too, for the before/after ratio.
Imports app.* (the code under test) and the bench helpers.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.ring import HashRing
from bench.lib.cluster_nodes import metric
from bench.lib.common import (
    APP_DIR,
    PYTHON,
    SERVER_CORE,
    cpu_seconds,
    format_table,
    http_request,
    memory_kib,
    spawned,
    tempdir,
)
from tests.harness.processes import Cluster

NODES = ("node1", "node2", "node3")
SETTLE_TIMEOUT_S = 300.0  # first rounds (with the start-up foreign scan) on one shared core
QUIET_AFTER_READY_S = 5.0  # start-up work (hint store, first probes) settles before an idle window

_LOADER = """
import json, time
from app.clock import LOGICAL_BITS, Version
from app.config import NodeConfig
from app.storage import Record, open_store
BASE = 1_700_000_000_000 << LOGICAL_BITS  # the same versions on every node: the replicas agree
value = b"v" * 100
for node in {nodes!r}:
    started = time.perf_counter()
    config = NodeConfig.from_options({{"node_id": node, "data_dir": {root!r} + "/" + node, "fsync": "never"}})
    store = open_store(config)
    for first in range(0, {n}, 2000):
        batch = range(first, min({n}, first + 2000))
        store.apply_many([(b"key-%012d" % i, Record(version=Version(BASE + i, "loader"), value=value)) for i in batch])
    count = store.live_count()
    store.close()
    print("LOADED " + json.dumps({{"node": node, "count": count, "s": time.perf_counter() - started}}), flush=True)
"""

_PROBE = """
import json, statistics, tempfile, time
from app.clock import LOGICAL_BITS, Version
from app.config import NodeConfig
from app.ring import ArcSet, HashRing, stable_hash
from app.storage import LmdbStore, Record, open_store
from app.storage.base import DIGEST_BYTES, record_fingerprint

arcs = HashRing({nodes!r}).ranges()
wall, cpu = time.perf_counter(), time.process_time()
store = open_store(NodeConfig.from_options({{"node_id": "node1", "data_dir": {path!r}, "fsync": "never"}}))
opened_s = time.perf_counter() - wall
store.align_digests(arcs)
assert store.wait_digests(600)
build_wall_s, build_cpu_s = time.perf_counter() - wall, time.process_time() - cpu

def cpu_of(fn):
    started = time.process_time()
    result = fn()
    return time.process_time() - started, result

def from_index():
    return [store.digest(start, end) for start, end in arcs]

def full_pass():  # what Replica.digests did for every round before the index
    index, sums = ArcSet(arcs), [0] * len(arcs)
    position = {{arc: i for i, arc in enumerate(arcs)}}
    for key, record in store.iter_range(0, 0):
        found = index.locate(stable_hash(key))
        if found is not None:
            sums[position[index.arcs[found]]] ^= record_fingerprint(key, record)
    return [value.to_bytes(DIGEST_BYTES, "big") for value in sums]

index_runs = [cpu_of(from_index) for _ in range(5)]
scan_cpu_s, scanned = cpu_of(full_pass)
agree = scanned == index_runs[0][1]
wall = time.perf_counter()
store.close()  # saves the index beside the data
close_s = time.perf_counter() - wall
wall, cpu = time.perf_counter(), time.process_time()
store = open_store(NodeConfig.from_options({{"node_id": "node1", "data_dir": {path!r}, "fsync": "never"}}))
store.align_digests(arcs)
assert store.wait_digests(600)
restored_wall_s, restored_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
restored_agree = [store.digest(start, end) for start, end in arcs] == scanned
wall, cpu = time.perf_counter(), time.process_time()
store.align_digests(HashRing({nodes!r} + ("node4",)).ranges())  # a fourth node joins: the index is re-cut
assert store.wait_digests(600)
recut_wall_s, recut_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
store.close()

BASE = 1_800_000_000_000 << LOGICAL_BITS
per_apply = {{True: [], False: []}}
for trial in range({trials}):
    for tracked in (True, False):
        with tempfile.TemporaryDirectory() as path:
            fresh = LmdbStore(path=path, node_id="w", fsync="never", fsync_window_ms=5, tombstone_grace_s=60)
            if tracked:
                fresh.align_digests(arcs)
                assert fresh.wait_digests(60)
            records = [(b"w-%09d" % i, Record(version=Version(BASE + i, "w"), value=b"v" * 100))
                       for i in range({writes})]
            started = time.process_time()
            for key, record in records:
                fresh.apply(key, record)
            per_apply[tracked].append((time.process_time() - started) / len(records))
            fresh.close()
print("PROBE " + json.dumps({{
    "arcs": len(arcs), "opened_s": opened_s, "build_wall_s": build_wall_s, "build_cpu_s": build_cpu_s,
    "index_cpu_s": min(c for c, _ in index_runs), "scan_cpu_s": scan_cpu_s, "agree": agree,
    "close_s": close_s, "restored_wall_s": restored_wall_s, "restored_cpu_s": restored_cpu_s,
    "restored_agree": restored_agree, "recut_wall_s": recut_wall_s, "recut_cpu_s": recut_cpu_s,
    "apply_tracked_us": statistics.median(per_apply[True]) * 1e6,
    "apply_untracked_us": statistics.median(per_apply[False]) * 1e6,
}}), flush=True)
"""


@dataclass
class ClusterRun:
    label: str
    ready_s: float = 0.0
    index_s: float | None = None  # start to every node's index built (None: an app without the metric)
    cpu_s: float = 0.0  # all three nodes over the window
    rounds: float = 0.0  # all three nodes' rounds over the window
    window_s: float = 0.0
    rss_mib: float = 0.0  # the largest node's VmRSS after the window


def child(name: str, code: str, logdir: Path, marker: str, timeout_s: float) -> list[dict[str, Any]]:
    with spawned(name, [PYTHON, "-c", code], logdir=logdir) as proc:
        proc.proc.wait(timeout=timeout_s)
        lines = proc.log_path.read_text().splitlines()
        if proc.proc.returncode != 0:
            raise RuntimeError(f"bench: {name} failed ({proc.proc.returncode}):\n{proc.log_tail()}")
    return [json.loads(line.removeprefix(marker)) for line in lines if line.startswith(marker)]


def rounds_of(url: str, arcs: int) -> float:
    """Rounds run so far: the rounds counter, or (an app without it) arcs compared / arcs per round."""
    counted = metric(url, "kvstore_anti_entropy_rounds_total")
    if counted is not None and counted > 0:
        return counted
    compared = metric(url, "kvstore_anti_entropy_ranges_compared_total") or 0.0
    return compared / arcs


def run_cluster(
    label: str, *, app_dir: Path, root: Path, logdir: Path, interval: float, window: float, arcs: int
) -> ClusterRun:
    run = ClusterRun(label)
    with ExitStack() as stack:
        cluster = Cluster(
            size=len(NODES),
            log_dir=logdir / label,
            args=["--anti-entropy-interval", str(interval), "--log-level", "warning"],
            data_root=root,
            engines=("lmdb",),  # measured on the default engine alone (tests mix engines)
            env_for={node: {"PYTHONPATH": str(app_dir)} for node in NODES},
            launcher=["taskset", "-c", SERVER_CORE],
            cwd=app_dir,
        )
        (logdir / label).mkdir(parents=True, exist_ok=True)
        stack.callback(cluster.stop)
        started = time.monotonic()
        cluster.start()
        run.ready_s = time.monotonic() - started
        urls = [node.url for node in cluster.nodes]
        deadline = started + SETTLE_TIMEOUT_S
        if "kvstore_digest_index_ready" in _metrics_text(urls[0]):  # the reference app may not have it
            while not all(metric(url, "kvstore_digest_index_ready") == 1 for url in urls):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"bench: {label}: the digest indexes were not built within {SETTLE_TIMEOUT_S} s")
                time.sleep(0.05)
            run.index_s = time.monotonic() - started
        if interval < SETTLE_TIMEOUT_S:
            # The first round after a start also scans for foreign records: measure from the third on.
            while not all(rounds_of(url, arcs) >= 2 for url in urls):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"bench: {label}: two rounds per node did not run within {SETTLE_TIMEOUT_S} s")
                time.sleep(0.2)
        time.sleep(QUIET_AFTER_READY_S)
        pids = cluster.pids()
        cpu0, rounds0, t0 = cpu_seconds(pids), sum(rounds_of(url, arcs) for url in urls), time.monotonic()
        time.sleep(window)
        run.cpu_s = cpu_seconds(pids) - cpu0
        run.window_s = time.monotonic() - t0
        run.rounds = sum(rounds_of(url, arcs) for url in urls) - rounds0
        run.rss_mib = max(memory_kib(pid).get("VmRSS", 0) for pid in pids) / 1024
    print(
        f"  {label}: ready {run.ready_s:.1f} s, index ready at {run.index_s and round(run.index_s, 1)} s, "
        f"{run.cpu_s:.2f} s CPU over {run.window_s:.0f} s, {run.rounds:.0f} rounds, RSS {run.rss_mib:.0f} MiB",
        flush=True,
    )
    return run


def _metrics_text(url: str) -> str:
    status, body = http_request(url, "GET", "/metrics")
    return body.decode() if status == 200 else ""


def per_round_ms(on: ClusterRun, off: ClusterRun) -> float:
    """CPU per round, both sides: the CPU rounds added over the idle rate, per round."""
    extra = on.cpu_s - off.cpu_s * on.window_s / off.window_s
    return max(0.0, extra) / max(on.rounds, 1.0) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=1_000_000, help="records preloaded per node")
    parser.add_argument("--interval", type=float, default=2.0, help="anti-entropy interval of the measured run, s")
    parser.add_argument("--window", type=float, default=30.0, help="seconds of CPU sampled per cluster run")
    parser.add_argument("--writes", type=int, default=20_000, help="single applies per write-overhead trial")
    parser.add_argument("--trials", type=int, default=5, help="write-overhead trials per variant (median counts)")
    parser.add_argument("--reference-app", type=Path, help="a tree with app/ to measure the same way (before)")
    parser.add_argument("--reference-interval", type=float, default=15.0, help="its anti-entropy interval, s")
    parser.add_argument("--data-parent", help="where the data dirs go (default: the system temp dir)")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    args = parser.parse_args()

    arcs = len(HashRing(NODES).ranges())
    with tempdir("kvstore-bench-ae-logs-") as logs, tempdir("kvstore-bench-ae-data-") as data:
        logdir, root = Path(logs), Path(args.data_parent or data) / "nodes"
        root.mkdir(parents=True, exist_ok=True)
        print(f"preloading {args.keys:,} keys into {len(NODES)} data dirs ...", flush=True)
        for loaded in child(
            "loader", _LOADER.format(nodes=NODES, root=str(root), n=args.keys), logdir, "LOADED ", 1800
        ):
            print(f"  {loaded['node']}: {loaded['count']:,} keys in {loaded['s']:.1f} s", flush=True)

        print("in-process probe on node1's dir ...", flush=True)
        probe = child(
            "probe",
            _PROBE.format(nodes=NODES, path=str(root / "node1"), writes=args.writes, trials=args.trials),
            logdir,
            "PROBE ",
            1800,
        )[0]
        print("  " + json.dumps(probe), flush=True)

        print("cluster runs ...", flush=True)
        runs: dict[str, tuple[ClusterRun, ClusterRun]] = {}
        trees = [("this tree", APP_DIR, args.interval)]
        if args.reference_app is not None:
            trees.append(("reference", args.reference_app.resolve(), args.reference_interval))
        for name, app_dir, interval in trees:
            off = run_cluster(
                f"{name}-off", app_dir=app_dir, root=root, logdir=logdir, interval=3600, window=args.window, arcs=arcs
            )
            on = run_cluster(
                f"{name}-every-{interval:g}s",
                app_dir=app_dir,
                root=root,
                logdir=logdir,
                interval=interval,
                window=args.window,
                arcs=arcs,
            )
            runs[name] = (off, on)

    md = args.markdown
    print()
    print(f"{args.keys:,} keys per node, {arcs} arcs (3 nodes, N=3); servers on core {SERVER_CORE}")
    print(
        format_table(
            ["in-process (node1's dir)", "figure"],
            [
                ["open_store", f"{probe['opened_s'] * 1000:.0f} ms"],
                [
                    "index build at open (open + build)",
                    f"{probe['build_wall_s']:.2f} s wall, {probe['build_cpu_s']:.2f} s CPU",
                ],
                ["close (saves the index)", f"{probe['close_s'] * 1000:.0f} ms"],
                [
                    "reopen with the saved index (open + restore + align)",
                    f"{probe['restored_wall_s'] * 1000:.0f} ms wall, {probe['restored_cpu_s'] * 1000:.0f} ms CPU",
                ],
                ["restored digests equal to the full pass", str(probe["restored_agree"])],
                [
                    "re-cut for a fourth node's ring (in a thread)",
                    f"{probe['recut_wall_s']:.2f} s wall, {probe['recut_cpu_s']:.2f} s CPU",
                ],
                [
                    "every arc's digest from the index (one side of a quiet round)",
                    f"{probe['index_cpu_s'] * 1000:.1f} ms CPU",
                ],
                ["the same by one pass over every record (before)", f"{probe['scan_cpu_s'] * 1000:.0f} ms CPU"],
                ["ratio before / index", f"{probe['scan_cpu_s'] / max(probe['index_cpu_s'], 1e-9):.0f}x"],
                ["index digests equal to the full pass", str(probe["agree"])],
                ["apply() with the index kept", f"{probe['apply_tracked_us']:.1f} us"],
                ["apply() without", f"{probe['apply_untracked_us']:.1f} us"],
                ["write overhead (with / without)", f"{probe['apply_tracked_us'] / probe['apply_untracked_us']:.3f}x"],
            ],
            markdown=md,
        )
    )
    print()
    rows = []
    for name, (off, on) in runs.items():
        rows.append(
            [
                name,
                f"{off.ready_s:.1f} / {on.ready_s:.1f}",
                "-" if on.index_s is None or off.index_s is None else f"{off.index_s:.1f} / {on.index_s:.1f}",
                f"{off.cpu_s / off.window_s / len(NODES) * 100:.1f}%",
                f"{on.cpu_s / on.window_s / len(NODES) * 100:.1f}%",
                f"{on.rounds:.0f}",
                f"{per_round_ms(on, off):.0f}",
                f"{off.rss_mib:.0f} / {on.rss_mib:.0f}",
            ]
        )
    print(
        format_table(
            [
                "app",
                "3 nodes start to ready, s (first / restart)",
                "index ready, s from start (built / restored)",
                "idle CPU/node, AE off",
                "CPU/node, AE every interval",
                "rounds",
                "CPU per round (both sides), ms",
                "RSS MiB off / on",
            ],
            rows,
            markdown=md,
        )
    )
    if "reference" in runs:
        before = per_round_ms(runs["reference"][1], runs["reference"][0])
        after = per_round_ms(runs["this tree"][1], runs["this tree"][0])
        print(
            f"\nCPU per quiet round: reference {before:.0f} ms, this tree {after:.0f} ms "
            f"({before / max(after, 1):.0f}x)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
