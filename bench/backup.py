"""The backup and restore benchmark (issue 11): three LMDB nodes (N=3) each
preloaded with the same 1M keys of 100-byte values (identical versions,
written straight into each data dir through app.storage.open_store in large
transactions), then:

- backup: `kvstore backup` through node1 into a file, with zstd and without
  (time, size). Target: <= 30 s.
- restore: `kvstore restore` of the zstd file into an empty 3-node LMDB
  cluster. Target: <= 60 s.
- GET under backup: wrk GETs (random preloaded keys, via node2) without a
  backup, then while backups run back to back. Target: >= 0.7x.

Every node is pinned to the server core; wrk, the CLI and this script to the
load core (bench/lib/common.py). Needs wrk (fails clearly without it).

    .venv/bin/python -u -m bench backup [--keys 1000000] [--duration 8] [--markdown]

Exit status 0 when every target is met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.lib.common import (
    APP_DIR,
    LOAD_CORE,
    PYTHON,
    SERVER_CORE,
    format_table,
    machine_summary,
    require_wrk,
    run_wrk,
    tempdir,
    write_lua,
)
from tests.harness.processes import Cluster

NODES = 3
VALUE_BYTES = 100
LOAD_BATCH = 50_000  # records per preload transaction
BACKUP_TARGET_S = 30.0
RESTORE_TARGET_S = 60.0
GET_RATIO_TARGET = 0.7
NODE_ARGS = ["--replication-factor", "3", "--log-level", "warning", "--anti-entropy-interval", "3600"]

# Each node's data dir gets the same records: key-<i>, version (base + i, node1),
# a value of hex digits from a seeded generator (half the entropy of random
# bytes: a fair case for compression, unlike a repeated letter).
_LOADER = """
import json, random, sys, time
from app.clock import Version
from app.config import NodeConfig
from app.storage import Record, open_store
node, path, n, value_bytes, base = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
store = open_store(NodeConfig.from_options({"node_id": node, "data_dir": path, "fsync": "never"}))
rng = random.Random(11)
start = time.perf_counter()
for first in range(0, n, BATCH):
    store.apply_many(
        [
            (b"key-%012d" % i, Record(Version(base + i, "node1"), rng.randbytes(value_bytes // 2).hex().encode()))
            for i in range(first, min(n, first + BATCH))
        ]
    )
store.close()
print(json.dumps({"node": node, "seconds": time.perf_counter() - start}))
""".replace("BATCH", str(LOAD_BATCH))

LUA_GET_RANDOM = """
local n = 1
init = function(args) n = tonumber(args[1]); math.randomseed(42) end
request = function()
  return wrk.format("GET", string.format("/kv/key-%012d", math.random(0, n - 1)))
end
"""


def preload(data_root: Path, keys: int) -> float:
    """Fill node1..node3's data dirs in parallel processes; wall seconds."""
    started = time.perf_counter()
    base = (int(time.time() * 1000) - 60_000) << 16  # one version base for every node: identical replicas
    procs = [
        subprocess.Popen(
            [
                "taskset",
                "-c",
                f"{SERVER_CORE},{LOAD_CORE}",
                PYTHON,
                "-c",
                _LOADER,
                f"node{i + 1}",
                str(data_root / f"node{i + 1}"),
                str(keys),
                str(VALUE_BYTES),
                str(base),
            ],
            cwd=APP_DIR,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        for i in range(NODES)
    ]
    for proc in procs:
        proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"bench: preload failed ({proc.returncode})")
    return time.perf_counter() - started


def start(stack: ExitStack, *, logdir: Path, name: str, data_root: Path) -> Cluster:
    (logdir / name).mkdir(parents=True, exist_ok=True)
    cluster = Cluster(
        size=NODES,
        log_dir=logdir / name,
        args=NODE_ARGS,
        data_root=data_root,
        engines=("lmdb",),  # measured on the default engine alone (tests mix engines)
        env_for={f"node{i + 1}": {"PYTHONPATH": str(APP_DIR)} for i in range(NODES)},
        launcher=["taskset", "-c", SERVER_CORE],
        cwd=APP_DIR,
    )
    stack.callback(cluster.stop)
    return cluster.start()


def cli(*args: str, output: Path | None = None) -> tuple[float, dict[str, Any]]:
    """Run the kvstore CLI on the load core; (wall seconds, its JSON summary)."""
    started = time.perf_counter()
    done = subprocess.run(
        ["taskset", "-c", LOAD_CORE, PYTHON, "-m", "app", *args],
        cwd=APP_DIR,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
        env=os.environ | {"PYTHONPATH": str(APP_DIR)},
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"bench: kvstore {args[0]} failed: {done.stderr[-2000:]}")
    return seconds, json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measured wrk run")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    require_wrk()
    print(machine_summary(), flush=True)
    rows: list[list[str]] = []
    met = True
    with tempdir("kvstore-bench-backup-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        load_s = preload(root / "source-data", args.keys)
        print(f"preload: {NODES} x {args.keys} keys in {load_s:.1f} s", flush=True)
        source = start(stack, logdir=root, name="source", data_root=root / "source-data")
        url1, url2 = source.node("node1").url, source.node("node2").url

        zstd_s, zstd = cli("backup", "--url", url1, "-o", str(root / "b.zstd.kvbak"))
        none_s, plain = cli("backup", "--url", url1, "-o", str(root / "b.none.kvbak"), "--compression", "none")
        fast_s, fast = cli("backup", "--url", url1, "-o", str(root / "b.fast.kvbak"), "--pace", "1")
        fast_none_s, fast_none = cli(
            "backup", "--url", url1, "-o", str(root / "b.fastnone.kvbak"), "--pace", "1", "--compression", "none"
        )
        for label, seconds, summary in (
            ("zstd, default pace", zstd_s, zstd),
            ("none, default pace", none_s, plain),
            ("zstd, --pace 1", fast_s, fast),
            ("none, --pace 1", fast_none_s, fast_none),
        ):
            assert summary["records"] == args.keys, summary
            rows.append(
                [
                    f"backup ({label})",
                    f"{seconds:.1f} s",
                    f"{int(summary['bytes']) / 1e6:.1f} MB",
                    f"{args.keys / seconds:,.0f} keys/s",
                    f"<= {BACKUP_TARGET_S:.0f} s",
                    "met" if seconds <= BACKUP_TARGET_S else "MISSED",
                ]
            )
        met &= zstd_s <= BACKUP_TARGET_S
        print(f"backup: zstd {zstd_s:.1f} s, none {none_s:.1f} s", flush=True)

        # GET throughput without, then during back-to-back backups.
        lua = write_lua(root, "get", LUA_GET_RANDOM)
        pids = source.pids()
        base = run_wrk(
            "get", url2, lua=lua, duration_s=args.duration, warmup_s=1.0, server_pids=pids, script_args=[str(args.keys)]
        )
        stop = threading.Event()
        backups: list[float] = []

        def back_to_back() -> None:
            while not stop.is_set():
                seconds, _ = cli("backup", "--url", url1, "-o", str(root / "during.kvbak"))
                backups.append(seconds)

        runner = threading.Thread(target=back_to_back, daemon=True)
        runner.start()
        time.sleep(1.0)
        during = run_wrk(
            "get during backup",
            url2,
            lua=lua,
            duration_s=args.duration,
            warmup_s=0,
            server_pids=pids,
            script_args=[str(args.keys)],
        )
        stop.set()
        runner.join(timeout=300)
        ratio = during.rps / base.rps if base.rps else 0.0
        met &= ratio >= GET_RATIO_TARGET
        for result in (base, during):
            rows.append(
                [
                    f"wrk GET via node2: {result.label}",
                    f"{result.rps:,.0f} req/s",
                    f"p99 {result.p99_ms:.1f} ms",
                    f"errors {result.errors}",
                    "",
                    "",
                ]
            )
        rows.append(
            [
                "GET during / without",
                f"{ratio:.2f}x",
                "",
                "",
                f">= {GET_RATIO_TARGET}x",
                "met" if ratio >= GET_RATIO_TARGET else "MISSED",
            ]
        )
        print(
            f"GET: {base.rps:,.0f} -> {during.rps:,.0f} req/s ({ratio:.2f}x); backups during: "
            f"{', '.join(f'{s:.1f} s' for s in backups)}",
            flush=True,
        )
        source.stop()

        for name, file in (("zstd", "b.zstd.kvbak"), ("none", "b.none.kvbak")):
            target = start(stack, logdir=root, name=f"target-{name}", data_root=root / f"target-{name}-data")
            restore_s, restored = cli("restore", "--url", target.node("node1").url, str(root / file))
            assert restored["records"] == args.keys and restored["applied"] == args.keys, restored
            met &= restore_s <= RESTORE_TARGET_S
            rows.append(
                [
                    f"restore ({name} file) into empty 3 nodes",
                    f"{restore_s:.1f} s",
                    "",
                    f"{args.keys / restore_s:,.0f} keys/s",
                    f"<= {RESTORE_TARGET_S:.0f} s",
                    "met" if restore_s <= RESTORE_TARGET_S else "MISSED",
                ]
            )
            print(f"restore ({name}): {restore_s:.1f} s", flush=True)
            if name == "zstd":  # the same file again: every record already there, nothing applied
                again_s, again = cli("restore", "--url", target.node("node2").url, str(root / file))
                assert again["applied"] == 0 and again["replica_writes_applied"] == 0, again
                rows.append(
                    [
                        "restore again (idempotent: 0 applied)",
                        f"{again_s:.1f} s",
                        "",
                        f"{args.keys / again_s:,.0f} keys/s",
                        "",
                        "",
                    ]
                )
            target.stop()

    print()
    print(format_table(["run", "time / rate", "size", "throughput", "target", ""], rows, markdown=args.markdown))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
