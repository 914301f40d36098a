"""py-spy for the cluster benchmark: an extra N=3 quorum PUT run with node1
sampled (`--profile PREFIX` of bench/cluster.py, called from
cluster_quorum.py), and a summary of py-spy's raw stacks: shares by thread,
self time by function and by file, inclusive time of the project's own
functions. Needs py-spy (BENCH_PYSPY or PATH); a missing one skips the profile.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

from bench.lib.cluster_report import Report
from bench.lib.common import APP_DIR, LOAD_CORE, SERVER_CORE, run_wrk
from tests.harness.processes import Cluster

PROFILE_MIN_S = 5.0  # at least this many seconds of samples, even under a short --duration
SAMPLE_RATE_HZ = 250  # samples/s, as in bench/README.md's profiling recipe


def profile_put(report: Report, *, args: argparse.Namespace, cluster: Cluster, lua: Path) -> None:
    """An extra N=3 PUT run with py-spy sampling node1; node2 and node3 moved to
    the load core meanwhile so node1 is not preempted by them mid-syscall
    (bench/README.md). Not one of the measured rows."""
    spy = pyspy_path()
    if spy is None:
        print("  profile skipped: py-spy not found (set BENCH_PYSPY)", flush=True)
        return
    n1 = cluster.node("node1").pid
    others = [cluster.node(n).pid for n in ("node2", "node3")]
    raw = Path(f"{args.profile}-n1-put.txt")
    seconds = max(args.duration, PROFILE_MIN_S)
    for pid in others:
        os.sched_setaffinity(pid, {int(LOAD_CORE)})
    try:
        spy_proc = subprocess.Popen(
            [
                "taskset",
                "-c",
                LOAD_CORE,
                spy,
                "record",
                "--nonblocking",
                "--threads",
                "-r",
                str(SAMPLE_RATE_HZ),
                "-d",
                f"{seconds:g}",
                "--format",
                "raw",
                "-o",
                str(raw),
                "--pid",
                str(n1),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            time.sleep(0.5)
            result = run_wrk(
                "N=3 quorum PUT, node1 under py-spy",
                cluster.node("node1").url,
                lua=lua,
                duration_s=seconds + 1,
                warmup_s=0,
                server_pids=[n1],
            )
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
    report.profile = (
        f"py-spy on node1 (pid {n1}) during an extra N=3 quorum PUT run "
        f"({result.rps:,.0f} req/s, node2/node3 moved to the load core); raw stacks: {raw}\n" + summarize_profile(raw)
    )
    print("  " + report.profile.replace("\n", "\n  "), flush=True)


def pyspy_path() -> str | None:
    return (
        os.environ.get("BENCH_PYSPY")
        or shutil.which("py-spy")
        or ("/tmp/pyspy-venv/bin/py-spy" if Path("/tmp/pyspy-venv/bin/py-spy").exists() else None)
    )


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

    return "\n".join(
        [
            f"{total} samples of node1's threads while running (py-spy without --idle)",
            *block("by thread:", threads, 6),
            *block("self time, by function (C code is charged to the Python frame that called it):", own),
            *block("self time, by file:", own_files, 12),
            *block("inclusive, the project's functions:", ours),
        ]
    )


BOILERPLATE = {
    "app/__main__.py",
    "app/cli.py",
    "app/web/server.py",
}  # start-up frames under everything the main thread does


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
