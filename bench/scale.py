"""What background work costs as the data grows: three real nodes on loopback
(N=3, LMDB) with `--keys` records preloaded into every node's data dir
(identical versions, 100-byte values, so every replica already agrees), then:

  1. start-to-ready of a restart, and RSS per node;
  2. idle CPU per node over --window seconds, anti-entropy off
     (--anti-entropy-interval 3600) and at its default pace (30 s);
  3. the CPU of one anti-entropy round in which nothing differs: nodes at a
     1 s interval, idle; (their CPU - the off figure) / rounds run, summed over
     both sides of each round (the node comparing and the peer it asks);
  4. client GET p99 under wrk, anti-entropy off against rounds every 1 s:
     P99_PAIRS pairs of runs, alternated (off, every 1 s, off, ...) on fresh
     clusters over the same data, and the median of each side (one pair read
     anywhere from 0.95x to 1.6x on this shared machine: the spread between
     runs of the same configuration is larger than the effect);
  5. a fourth (empty) node's join via POST /admin/membership: seconds to ready,
     records pulled per record needed, keys/s streamed, and seconds from ready
     until the old nodes hold exactly N copies (sum of kvstore_keys == N x keys).

Preloading: records go straight into each node's LMDB through
app.storage.open_store, 50,000 per transaction. The data dirs are cached in
--cache-dir (default: .bench-cache/scale, git-ignored) under one directory per
key count with a `complete` marker, and copied for each run, so a second run
at the same count skips the preload; delete the directory to rebuild it.

Idle and p99 phases pin the nodes to the server core and wrk to the load core
(as the other benches do); the join runs unpinned, on both cores, as a real
join would. Usage:

    flock /tmp/kvstore-bench.lock .venv/bin/python -u -m bench scale --keys 100000 --keys 1000000
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench.lib.cluster_nodes import metric
from bench.lib.common import (
    APP_DIR,
    LOAD_CORE,
    REPO,
    SERVER_CORE,
    cpu_seconds,
    format_table,
    http_request,
    machine_summary,
    memory_kib,
    require_wrk,
    run_wrk,
    write_lua,
)
from tests.harness.processes import Cluster, wait_ready

N = 3
VALUE = b"v" * 100
PRELOAD_TXN = 50_000  # records per LMDB transaction while preloading: few commits, bounded memory
PRELOAD_NODE = "preload"  # the node id in every preloaded version (any id works: versions only compare)
DEFAULT_CACHE = REPO / ".bench-cache" / "scale"
DEFAULT_AE_S = 30.0  # the node's default --anti-entropy-interval (app.config)
AE_OFF = "3600"
AE_FAST = "1"  # "rounds running": one round per node per second
WRK_SECONDS = 15.0
P99_PAIRS = 3
WRK_WARMUP_S = 3.0
READY_TIMEOUT_S = 600.0  # a join at 3M keys on a loaded machine: generous, it is measured, not asserted
SETTLE_TIMEOUT_S = 300.0
TOKEN_ARGS: list[str] = []  # no cluster token: loopback only

# Targets of issue 10, printed beside what was measured.
TARGET_IDLE_RATIO = 1.5
TARGET_ROUND_CPU_MS = 50.0
TARGET_PULL_RATIO = 1.05
TARGET_KEYS_PER_S = 30_000
TARGET_READY_S = 30.0
TARGET_SETTLE_S = 10.0
TARGET_P99_RATIO = 1.2
TARGET_START_S = 5.0
COLUMNS = [  # every figure; a phase not run leaves nan
    "start_ready_s",
    "idle_off_cpu_pct",
    "rss_mb",
    "p99_off_ms",
    "rps_off",
    "idle_default_cpu_pct",
    "rss_default_mb",
    "default_rounds",
    "fast_rounds",
    "round_cpu_ms",
    "mismatched",
    "p99_ae_ms",
    "rps_ae",
    "join_cpu_s",
    "join_ready_s",
    "join_pulled",
    "join_needed",
    "join_keys_per_s",
    "join_settle_s",
    "join_copies_exact",
]


def key_of(i: int) -> bytes:
    return b"k%08d" % i


# -- preloading ---------------------------------------------------------------------


def preload(cache: Path, count: int) -> Path:
    """node1..node3's data dirs with `count` identical records; built once per count."""
    from app.clock import Version
    from app.config import Engine, Fsync, NodeConfig
    from app.storage import Record, open_store

    root = cache / f"keys-{count}"
    if (root / "complete").exists():
        print(f"preload: reusing {root}")
        return root
    shutil.rmtree(root, ignore_errors=True)
    hlc = (int(time.time() * 1000) - 60_000) << 16  # a minute ago: below any node's clock at start
    version = Version(hlc, PRELOAD_NODE)
    record = Record(version, VALUE)
    for i in range(N):
        node_id = f"node{i + 1}"
        started = time.monotonic()
        config = NodeConfig(
            node_id=node_id,
            host="127.0.0.1",
            port=0,
            advertise_url="http://127.0.0.1:0",
            peers={},
            storage=Engine.LMDB,
            data_dir=str(root / node_id),
            fsync=Fsync.NEVER,
        )
        store = open_store(config)
        try:
            for start in range(0, count, PRELOAD_TXN):
                store.apply_many([(key_of(j), record) for j in range(start, min(count, start + PRELOAD_TXN))])
            store.sync()
        finally:
            store.close()
        print(f"preload: {node_id} {count:,} records in {time.monotonic() - started:.1f}s")
    (root / "complete").write_text(json.dumps({"count": count, "hlc": hlc}))
    return root


# -- clusters ------------------------------------------------------------------------


@contextmanager
def cluster_of(
    run: Path, name: str, data: Path, *, ae: str, pinned: bool, extra: list[str] | None = None
) -> Iterator[Cluster]:
    """node1..node3 on copies' data dirs (`data`), started (not yet waited for)."""
    log_dir = run / name
    log_dir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(
        size=N,
        log_dir=log_dir,
        args=["--replication-factor", str(N), "--anti-entropy-interval", ae, *(extra or []), *TOKEN_ARGS],
        data_root=data,
        engines=("lmdb",),  # measured on the default engine alone (tests mix engines)
        env_for={f"node{i + 1}": {"PYTHONPATH": str(APP_DIR)} for i in range(N + 1)},
        launcher=["taskset", "-c", SERVER_CORE] if pinned else [],
        cwd=APP_DIR,
    )
    try:
        for node in cluster.nodes:
            node.start()
        yield cluster
    finally:
        cluster.stop()


def start_ready(cluster: Cluster) -> float:
    """Seconds until every node (just started) answers /ready."""
    started = time.monotonic()
    procs = [node.proc for node in cluster.nodes if node.proc is not None]
    wait_ready(
        [n.url for n in cluster.nodes], procs=procs, timeout=READY_TIMEOUT_S, logs=[n.log_path for n in cluster.nodes]
    )
    return time.monotonic() - started


def wait_digests(cluster: Cluster, timeout: float = READY_TIMEOUT_S) -> float:
    """Seconds until every node's digest index is built (kvstore_digest_index_ready 1). A
    node builds it in a thread after /ready when its data dir has no saved index; the idle
    and round figures are measured only after that, so a build never counts as idle CPU."""
    started = time.monotonic()
    while not all(metric(n.url, "kvstore_digest_index_ready") == 1 for n in cluster.nodes):
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"digest indexes not built within {timeout:g}s")
        time.sleep(0.2)
    return time.monotonic() - started


def rounds(cluster: Cluster) -> int:
    total = 0
    for node in cluster.nodes:
        status, body = http_request(node.url, "GET", "/admin/rebalance")
        if status == 200:
            total += int(json.loads(body)["anti_entropy_rounds"])
    return total


def idle(cluster: Cluster, window: float) -> tuple[list[float], int]:
    """CPU seconds per node over the window, and anti-entropy rounds run in it."""
    pids = [node.pid for node in cluster.nodes]
    before, rounds_before = [cpu_seconds([p]) for p in pids], rounds(cluster)
    time.sleep(window)
    after, rounds_after = [cpu_seconds([p]) for p in pids], rounds(cluster)
    return [a - b for a, b in zip(after, before, strict=True)], rounds_after - rounds_before


def wrk_get(cluster: Cluster, run: Path, count: int, label: str) -> tuple[float, float]:
    """(p99 ms, requests/s) of random GETs of preloaded keys through node1."""
    lua = write_lua(
        run,
        "scale_get",
        f"""
math.randomseed(7)
request = function()
  return wrk.format("GET", string.format("/kv/k%08d", math.random(0, {count - 1})))
end
""",
    )
    result = run_wrk(
        label,
        cluster.nodes[0].url,
        lua=lua,
        duration_s=WRK_SECONDS,
        warmup_s=WRK_WARMUP_S,
        server_pids=[n.pid for n in cluster.nodes],
    )
    if result.errors:
        print(f"  warning: {result.errors} wrk errors in {label}")
    return result.p99_ms, result.rps


def copy_data(src: Path, dst: Path) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for i in range(N):
        shutil.copytree(src / f"node{i + 1}", dst / f"node{i + 1}")


def rebalance(url: str) -> dict[str, Any]:
    status, body = http_request(url, "GET", "/admin/rebalance")
    return json.loads(body) if status == 200 else {}


# -- one key count ----------------------------------------------------------------------


def measure(count: int, *, cache: Path, run: Path, window: float, phases: set[str]) -> dict[str, float]:
    out: dict[str, float] = dict.fromkeys(COLUMNS, float("nan")) | {"keys": count}
    source = preload(cache, count)
    data = run / f"data-{count}"
    copy_data(source, data)
    if "idle" in phases:
        _idle_phases(out, count, run=run, data=data, window=window)
    if "join" in phases:
        _join_phase(out, count, run=run, data=data)
    shutil.rmtree(data, ignore_errors=True)
    return out


def _idle_phases(out: dict[str, float], count: int, *, run: Path, data: Path, window: float) -> None:
    # 1 + 2a: restart with anti-entropy off; idle CPU, RSS.
    with cluster_of(run, f"first-{count}", data, ae=AE_OFF, pinned=True) as cluster:
        start_ready(cluster)
        print(f"  first start: digest indexes built {wait_digests(cluster):.1f}s after ready")
    with cluster_of(run, f"off-{count}", data, ae=AE_OFF, pinned=True) as cluster:
        out["start_ready_s"] = start_ready(cluster)
        wait_digests(cluster)
        cpu, _ = idle(cluster, window)
        out["idle_off_cpu_pct"] = statistics.mean(cpu) / window * 100
        out["rss_mb"] = statistics.mean(memory_kib(n.pid).get("VmRSS", 0) for n in cluster.nodes) / 1024
        print(f"  restart to ready {out['start_ready_s']:.1f}s, idle (AE off) {out['idle_off_cpu_pct']:.2f}% of a core")

    # 2b: idle at the default anti-entropy pace.
    with cluster_of(run, f"default-{count}", data, ae=str(DEFAULT_AE_S), pinned=True) as cluster:
        start_ready(cluster)
        wait_digests(cluster)
        cpu, ran = idle(cluster, window)
        out["idle_default_cpu_pct"] = statistics.mean(cpu) / window * 100
        out["rss_default_mb"] = statistics.mean(memory_kib(n.pid).get("VmRSS", 0) for n in cluster.nodes) / 1024
        out["default_rounds"] = ran
        print(f"  idle (AE every {DEFAULT_AE_S:g}s) {out['idle_default_cpu_pct']:.2f}% of a core, {ran} rounds")

    # 3: rounds every second: their CPU when nothing differs.
    with cluster_of(run, f"fast-{count}", data, ae=AE_FAST, pinned=True) as cluster:
        start_ready(cluster)
        wait_digests(cluster)
        fast_window = min(window, 20.0)
        cpu, ran = idle(cluster, fast_window)
        off_share = out["idle_off_cpu_pct"] / 100 * fast_window * N
        out["fast_rounds"] = ran
        out["round_cpu_ms"] = max(0.0, sum(cpu) - off_share) / max(1, ran) * 1000
        mismatched = sum(metric(n.url, "kvstore_anti_entropy_ranges_mismatched_total") or 0 for n in cluster.nodes)
        out["mismatched"] = mismatched
        print(
            f"  {ran} rounds in {fast_window:g}s: {out['round_cpu_ms']:.1f} ms CPU each, {mismatched:g} arcs differed"
        )

    # 4: GET p99 without rounds and with rounds every second, alternated.
    runs: dict[str, list[tuple[float, float]]] = {AE_OFF: [], AE_FAST: []}
    for pair in range(P99_PAIRS):
        for ae, label in ((AE_OFF, "anti-entropy off"), (AE_FAST, "anti-entropy every 1 s")):
            with cluster_of(run, f"p99-{pair}-{ae}-{count}", data, ae=ae, pinned=True) as cluster:
                start_ready(cluster)
                wait_digests(cluster)
                p99, rps = wrk_get(cluster, run, count, f"GET, {label}")
                runs[ae].append((p99, rps))
                print(f"  GET, {label}: p99 {p99:.2f} ms, {rps:,.0f} req/s")
    out["p99_off_ms"] = statistics.median(p99 for p99, _ in runs[AE_OFF])
    out["p99_ae_ms"] = statistics.median(p99 for p99, _ in runs[AE_FAST])
    out["rps_off"] = statistics.median(rps for _, rps in runs[AE_OFF])
    out["rps_ae"] = statistics.median(rps for _, rps in runs[AE_FAST])


def _join_phase(out: dict[str, float], count: int, *, run: Path, data: Path) -> None:
    """5: a fourth, empty node joins (anti-entropy off: only rebalancing moves records)."""
    with cluster_of(run, f"join-{count}", data, ae=AE_OFF, pinned=False) as cluster:
        start_ready(cluster)
        newcomer = cluster.add_node()
        # The clock starts with the new node's process: started with the four-member
        # list (as the harness and an operator start it), it begins pulling as soon
        # as it knows its ring, before the POST tells the others.
        cpu_before = cpu_seconds([n.pid for n in cluster.nodes if n.proc is not None])
        began = time.monotonic()
        newcomer.start()
        assert newcomer.proc is not None  # start() started it
        wait_ready([newcomer.url], path="/health", procs=[newcomer.proc], timeout=60, logs=[newcomer.log_path])
        body = json.dumps({"peers": cluster.direct_peers}).encode()
        status, answer = http_request(cluster.nodes[0].url, "POST", "/admin/membership", body)
        if status != 200:
            raise RuntimeError(f"bench: membership change refused: {status} {answer[:200]!r}")
        wait_ready([newcomer.url], procs=[newcomer.proc], timeout=READY_TIMEOUT_S, logs=[newcomer.log_path])
        ready = time.monotonic()
        status_new = rebalance(newcomer.url)
        urls = [n.url for n in cluster.nodes]
        while True:
            held = [metric(url, "kvstore_keys") or 0 for url in urls]
            if sum(held) == N * count or time.monotonic() - ready > SETTLE_TIMEOUT_S:
                break
            time.sleep(0.2)
        settled = time.monotonic()
        out["join_cpu_s"] = cpu_seconds([n.pid for n in cluster.nodes]) - cpu_before
        # A node from before issue 10 (BENCH_APP_DIR, as a reference) reports
        # only keys_streamed; what it holds then stands for what it needed.
        pulled = float(status_new.get("records_pulled", status_new.get("keys_streamed", 0)))
        needed = float(status_new.get("records_needed", metric(newcomer.url, "kvstore_keys") or 0))
        out["join_ready_s"] = ready - began
        out["join_pulled"] = pulled
        out["join_needed"] = needed
        out["join_keys_per_s"] = pulled / out["join_ready_s"] if out["join_ready_s"] else 0.0
        out["join_settle_s"] = settled - ready
        out["join_copies_exact"] = float(sum(held) == N * count)
        print(
            f"  join: ready in {out['join_ready_s']:.1f}s, pulled {pulled:,.0f} for {needed:,.0f} needed, "
            f"held per node {[int(h) for h in held]} ({'exactly' if sum(held) == N * count else 'NOT'} {N} copies "
            f"{out['join_settle_s']:.1f}s after ready)"
        )


def report(results: list[dict[str, float]], *, markdown: bool, window: float) -> str:
    def row(label: str, fmt: str, key: str) -> list[str]:
        return [label, *(fmt.format(r[key]) for r in results)]

    headers = ["", *(f"{int(r['keys']):,} keys/node" for r in results)]
    rows = [
        row(f"idle CPU, anti-entropy off (% of a core, {window:g}s window)", "{:.2f}", "idle_off_cpu_pct"),
        row(f"idle CPU, anti-entropy every {DEFAULT_AE_S:g}s (% of a core)", "{:.2f}", "idle_default_cpu_pct"),
        [
            f"  ratio default / off (target <= {TARGET_IDLE_RATIO})",
            *(f"{r['idle_default_cpu_pct'] / max(r['idle_off_cpu_pct'], 1e-9):.2f}" for r in results),
        ],
        row(
            f"CPU of one round, nothing differs (ms; target <= {TARGET_ROUND_CPU_MS:g} at 1M)", "{:.1f}", "round_cpu_ms"
        ),
        row("  rounds measured (1 s interval)", "{:.0f}", "fast_rounds"),
        row("  arcs that differed in them", "{:.0f}", "mismatched"),
        row(f"join: s from the new node's start to ready (target <= {TARGET_READY_S:g})", "{:.1f}", "join_ready_s"),
        row("join: records pulled", "{:,.0f}", "join_pulled"),
        row("join: records needed", "{:,.0f}", "join_needed"),
        [
            f"  pulled / needed (target <= {TARGET_PULL_RATIO})",
            *(f"{r['join_pulled'] / max(r['join_needed'], 1):.3f}" for r in results),
        ],
        row(f"join: keys/s streamed (target >= {TARGET_KEYS_PER_S:,})", "{:,.0f}", "join_keys_per_s"),
        row(f"join: s from ready to exactly {N} copies (target <= {TARGET_SETTLE_S:g})", "{:.1f}", "join_settle_s"),
        row("join: CPU of all four nodes (s)", "{:.1f}", "join_cpu_s"),
        row(f"restart: start to ready (s; target < {TARGET_START_S:g} at 1M)", "{:.1f}", "start_ready_s"),
        row("RSS per node, anti-entropy off (MB)", "{:.0f}", "rss_mb"),
        row(f"RSS per node, anti-entropy every {DEFAULT_AE_S:g}s (MB)", "{:.0f}", "rss_default_mb"),
        row(f"GET p99, anti-entropy off (ms, median of {P99_PAIRS} alternated runs)", "{:.2f}", "p99_off_ms"),
        row(f"GET p99, anti-entropy every 1 s (ms, median of {P99_PAIRS})", "{:.2f}", "p99_ae_ms"),
        [
            f"  ratio (target <= {TARGET_P99_RATIO})",
            *(f"{r['p99_ae_ms'] / max(r['p99_off_ms'], 1e-9):.2f}" for r in results),
        ],
        row("GET requests/s, anti-entropy off", "{:,.0f}", "rps_off"),
        row("GET requests/s, anti-entropy every 1 s", "{:,.0f}", "rps_ae"),
    ]
    return format_table(headers, rows, markdown=markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, action="append", help="keys preloaded per node (repeatable)")
    parser.add_argument("--window", type=float, default=60.0, help="idle CPU window in seconds (default 60)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where preloaded data dirs are kept")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument(
        "--phases", default="idle,join", help="idle (idle CPU, rounds, p99, restart, RSS) and/or join (default both)"
    )
    args = parser.parse_args()
    require_wrk()
    counts = args.keys or [100_000, 1_000_000]
    print(machine_summary().replace(f"servers on core {SERVER_CORE}", f"nodes on core {SERVER_CORE} (join: both)"))
    print(f"wrk on core {LOAD_CORE}; N={N}; LMDB; 100-byte values; preload cache {args.cache_dir}")
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        run = Path(stack.enter_context(_run_dir(args.cache_dir)))
        results = []
        for count in counts:
            print(f"== {count:,} keys per node")
            phases = set(args.phases.split(","))
            results.append(measure(count, cache=args.cache_dir, run=run, window=args.window, phases=phases))
    print()
    print(report(results, markdown=args.markdown, window=args.window))


@contextmanager
def _run_dir(cache: Path) -> Iterator[Path]:
    run = cache / f"run-{int(time.time())}"
    run.mkdir(parents=True)
    try:
        yield run
    finally:
        shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
