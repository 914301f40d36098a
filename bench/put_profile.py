"""The CPU of one replicated PUT, per stage and per node (issue 25's "measure
before choosing"): µs of CPU per client request at N=3, end to end.

Three nodes (LMDB data dirs, --fsync batch unless --fsync always, no auth)
from the cluster benchmark's harness (bench/lib/cluster_nodes.py), pinned to
the server core, --replication-factor 3, so every key lives on all three:
node1 coordinates every request, applies its own copy and sends the other two
in its coalesced peer calls; node2 and node3 are replicas. --keys keys (100,000)
are preloaded through node1, then wrk (load core, one thread, 64
connections) PUTs 100-byte values to `/kv/k<i>`, i at random over them,
all through node1 (default consistency: quorum, W=2).

Each setup runs wrk three times: a --warmup run (discarded); a measured run
with nothing attached (CPU per request per node: the "without py-spy" row);
and the profiled run, with one `py-spy record --threads --nonblocking --gil`
per node and `perf record -C <server core> -g` (bench/lib/perf_cpu.py), all
on the load core. Each thread's CPU in the run without profilers
(/proc/PID/task/*/stat, user and sys) divided by wrk's completed requests,
split by the stages of that thread's samples in the profiled run (rules:
bench/lib/put_stages.py's docstring), is the main table: rows the stages,
columns the nodes. The profilers share the load core with wrk, which then
sends less: in a trial the profiled run served 11-19% fewer req/s and cost
14-24% more CPU per request (likely fewer requests per coalesced batch and per
fsync window), so its CPU is shown as a check row but not used as the scale. The samples no rule claims are
the "unclassified" row, and their leaf functions are printed. How py-spy is
run, and why (measured on this 2-core machine):
- --nonblocking: the default blocking mode stops every node ~250 times a
  second; it halved req/s and raised CPU per request by half.
- --gil: without it py-spy counts every thread in state R, and with three
  nodes on one core most of those are waiting for the core, not on it
  (12-19 samples per on-CPU sample). With it, only the GIL holder is
  sampled; CPU a thread spends without the GIL (libuv's epoll and socket
  reads, any C call that releases it) is spread over that thread's sampled
  stages. The "active samples / on-CPU" row says how far each node is from
  1: above 1, a node holding the GIL was sampled while preempted, which
  happens most right after it wakes another node (a loopback send), so the
  send sites (PeerPool._send, RequestResponseCycle.send) are over-counted;
  `--sched-batch` (the nodes under SCHED_BATCH while sampled: no wakeup
  preemption) shows by how much, but changes the schedule it measures.
py-spy sees no kernel: a syscall's time is charged to the Python frame that
made it. The second table, from perf, splits the same CPU by native place
(the syscall a kernel sample is under, the library of a user sample); the
last line says how busy the server core was with other processes.

Then the same for one node at N=1 (LMDB at the same --fsync, then the memory
engine) as reference columns, so the gap between them is seen by stage
(--no-single skips them).

    .venv/bin/python -m bench put_profile [--markdown] [--fsync batch|always] [--duration 10]
                                          [--rate 250] [--keep-raw DIR] [--no-single] [--no-perf]

Needs py-spy (BENCH_PYSPY, PATH, or the venv's: `.venv/bin/pip install py-spy`)
and, for the second table, perf with kernel symbols (run as root).
Reported, no target.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench.lib import perf_cpu
from bench.lib.cluster_nodes import VALUE, start_cluster
from bench.lib.common import (
    APP_DIR,
    LOAD_CORE,
    PYTHON,
    Result,
    format_table,
    machine_summary,
    require_wrk,
    run_wrk,
    tempdir,
    write_lua,
)
from bench.lib.loader import put_all
from bench.lib.put_stages import (
    COORDINATOR_ROLE,
    REPLICA_ROLE,
    SINGLE_ROLE,
    STAGES,
    UNCLASSIFIED,
    CpuSnapshot,
    NodeProfile,
    add_into,
    add_native,
    cpu_between,
    cpu_snapshot,
    floats,
    profile_node,
    read_raw,
    top,
)
from bench.lib.pyspy import pyspy_path
from tests.harness.processes import Cluster

KEYS = 100_000
SAMPLE_RATE_HZ = 250
PYSPY_ATTACH_S = 1.0  # py-spy attaches and reads the interpreter's layout before wrk starts
PYSPY_EXIT_S = 30.0
TOP_LEAVES = 5  # per stage
TOP_UNCLASSIFIED = 15

LUA_RANDOM_PUT = f"""
math.randomseed(25)
local value = "{VALUE.decode()}"
request = function()
  return wrk.format("PUT", "/kv/k" .. math.random(0, {{keys}} - 1), nil, value)
end
"""


@dataclass
class Setup:
    """One measured configuration: its nodes' profiles (profiled run) and the plain run."""

    label: str
    plain: Result
    profiled: Result
    nodes: list[NodeProfile] = field(default_factory=list)
    profiled_us: list[float] = field(default_factory=list)  # per node: CPU/request of the profiled run
    core: str = ""  # how perf saw the server core: our nodes, other processes, idle

    def total(self) -> NodeProfile:
        total = NodeProfile(label=self.label, requests=self.profiled.requests)
        for node in self.nodes:
            total.samples += node.samples
            add_into(total.stages, node.stages)
            total.user_us += node.user_us
            total.sys_us += node.sys_us
            add_into(total.groups, node.groups)
            for stage, leaves in node.leaves.items():
                add_into(total.leaves[stage], leaves)
            add_into(total.native, node.native)
            total.perf_samples += node.perf_samples
        total.active_per_cpu = sum(n.active_per_cpu * n.total_us for n in self.nodes) / max(
            sum(n.total_us for n in self.nodes), 1e-9
        )
        return total


def spy_command(spy: str, pid: int, raw: Path, *, rate: int, nonblocking: bool, gil: bool) -> list[str]:
    command = ["taskset", "-c", LOAD_CORE, spy, "record", "--threads", "--full-filenames"]
    if nonblocking:
        command.append("--nonblocking")
    if gil:
        command.append("--gil")
    return [*command, "-r", str(rate), "--format", "raw", "-o", str(raw), "--pid", str(pid)]


def measure(
    label: str,
    *,
    nodes: Sequence[tuple[str, int, str]],
    url: str,
    lua: Path,
    args: argparse.Namespace,
    spy: str,
    raw_dir: Path,
) -> Setup:
    """Warm-up, the plain run, then the run under py-spy; nodes are (label, pid, role)."""
    pids = [pid for _, pid, _ in nodes]
    run_wrk(f"{label}: warm-up", url, lua=lua, duration_s=args.warmup, warmup_s=0, server_pids=pids)
    plain_before = {pid: cpu_snapshot(pid) for pid in pids}
    plain = run_wrk(f"{label}: plain", url, lua=lua, duration_s=args.duration, warmup_s=0, server_pids=pids)
    plain_after = {pid: cpu_snapshot(pid) for pid in pids}
    print(f"  {label}, no profiler: {plain.rps:,.0f} req/s, {plain.cpu_us_per_request:.1f} us CPU/req", flush=True)
    perf = None if args.no_perf else perf_cpu.perf_path()
    perf_data = raw_dir / f"{label.replace(' ', '_').replace('=', '')}-perf.data"
    raws = {pid: raw_dir / f"{label.replace(' ', '_').replace('=', '')}-{name}.txt" for name, pid, _ in nodes}
    spies: list[subprocess.Popen[bytes]] = []
    try:
        for _, pid, _ in nodes:
            command = spy_command(
                spy, pid, raws[pid], rate=args.rate, nonblocking=not args.blocking, gil=not args.no_gil
            )
            spies.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        if args.sched_batch:
            set_policy(pids, os.SCHED_BATCH)
        time.sleep(PYSPY_ATTACH_S)
        before = {pid: cpu_snapshot(pid) for pid in pids}
        recorder = perf_cpu.start(perf, perf_data) if perf else None
        profiled = run_wrk(f"{label}: py-spy", url, lua=lua, duration_s=args.duration, warmup_s=0, server_pids=pids)
        if recorder is not None:
            perf_cpu.stop(recorder)
        after = {pid: cpu_snapshot(pid) for pid in pids}
        for proc in spies:
            proc.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        for proc in spies:
            _, err = proc.communicate(timeout=PYSPY_EXIT_S)
            if proc.returncode not in (0, -signal.SIGINT):
                print(f"  py-spy exited {proc.returncode}: {err.decode(errors='replace')[-300:]}", flush=True)
    finally:
        if args.sched_batch:
            set_policy(pids, os.SCHED_OTHER)
        for proc in spies:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    print(f"  {label}, under py-spy: {profiled.rps:,.0f} req/s", flush=True)
    setup = Setup(label=label, plain=plain, profiled=profiled)
    native = perf_cpu.samples_by_thread(perf, perf_data) if perf else {}
    if native:
        setup.core = core_share(native, [after[pid] for pid in pids])
    for name, pid, role in nodes:
        raw = raws[pid]
        if not raw.exists():
            raise RuntimeError(f"bench: py-spy wrote no {raw} for {name} (pid {pid})")
        threads, rest = cpu_between(plain_before[pid], plain_after[pid])
        sampled_threads, sampled_rest = cpu_between(before[pid], after[pid])
        profile = profile_node(
            name,
            samples=read_raw(raw, role=role, app_dir=APP_DIR),
            threads=threads,
            rest=rest,
            requests=plain.requests,
            sampled_threads=sampled_threads,
            rate_hz=args.rate,
        )
        profiled_s = sum(t.total_s for t in sampled_threads) + sampled_rest.total_s
        setup.profiled_us.append(profiled_s * 1e6 / max(profiled.requests, 1))
        if perf:
            add_native(profile, native, after[pid].threads, cpu_s=profiled_s, rate_hz=perf_cpu.PERF_RATE_HZ)
        setup.nodes.append(profile)
    return setup


def core_share(native: dict[int, Counter[str]], nodes: Sequence[CpuSnapshot]) -> str:
    """The server core during the profiled run, from perf's samples: our
    nodes, anything else (other users of a shared machine), idle."""
    ours = {tid for snapshot in nodes for tid in snapshot.threads}
    counts = {tid: sum(c.values()) for tid, c in native.items()}
    total = max(sum(counts.values()), 1)
    mine = sum(n for tid, n in counts.items() if tid in ours)
    idle = counts.get(0, 0)
    other = total - mine - idle
    return f"server core: {mine / total:.0%} our nodes, {other / total:.0%} other processes, {idle / total:.0%} idle"


def set_policy(pids: Sequence[int], policy: int) -> None:
    """Every thread of every node to the scheduling policy (SCHED_BATCH: a
    wakeup does not preempt the running thread)."""
    for pid in pids:
        for tid in cpu_snapshot(pid).threads:
            with contextlib.suppress(ProcessLookupError):
                os.sched_setscheduler(tid, policy, os.sched_param(0))


def preload(url: str, keys: int) -> None:
    acked, failed, seconds = put_all([url], [f"/kv/k{i}" for i in range(keys)])
    if failed or acked != keys:
        raise RuntimeError(f"bench: preloading {keys} keys through {url}: {acked} acknowledged, {failed} failed")
    print(f"  preloaded {keys:,} keys in {seconds:.1f} s", flush=True)


def run_n3(args: argparse.Namespace, *, logdir: Path, lua: Path, spy: str, raw_dir: Path) -> Setup:
    print(f"\n[N=3] three nodes, LMDB --fsync {args.fsync}, all PUTs through node1", flush=True)
    with ExitStack() as stack:
        cluster = start_cluster(stack, logdir=logdir, name="n3", rf=3, storage="lmdb", extra=["--fsync", args.fsync])
        url = cluster.node("node1").url
        preload(url, args.keys)
        roles = {"node1": COORDINATOR_ROLE, "node2": REPLICA_ROLE, "node3": REPLICA_ROLE}
        nodes = [(name, cluster.node(name).pid, role) for name, role in roles.items()]
        return measure("N=3", nodes=nodes, url=url, lua=lua, args=args, spy=spy, raw_dir=raw_dir)


def run_single(args: argparse.Namespace, *, storage: str, logdir: Path, lua: Path, spy: str, raw_dir: Path) -> Setup:
    label = f"N=1 {storage}"
    print(f"\n[{label}] one node" + (f", --fsync {args.fsync}" if storage == "lmdb" else ""), flush=True)
    with ExitStack() as stack:
        extra = ["--fsync", args.fsync] if storage == "lmdb" else []
        cluster: Cluster = start_cluster(
            stack, logdir=logdir, name=f"n1-{storage}", rf=1, storage=storage, extra=extra, size=1
        )
        url = cluster.node("node1").url
        preload(url, args.keys)
        nodes = [("node1", cluster.node("node1").pid, SINGLE_ROLE)]
        return measure(label, nodes=nodes, url=url, lua=lua, args=args, spy=spy, raw_dir=raw_dir)


# -- output ---------------------------------------------------------------------------------


def _us(value: float) -> str:
    return f"{value:.1f}"


def table(n3: Setup, singles: Sequence[Setup], *, markdown: bool) -> str:
    columns: list[tuple[str, NodeProfile, float, Result]] = []
    for i, node in enumerate(n3.nodes):
        role = "coordinator" if i == 0 else "replica"
        columns.append((f"{node.label} ({role})", node, n3.profiled_us[i], n3.profiled))
    columns.append(("N=3 total", n3.total(), sum(n3.profiled_us), n3.profiled))
    for setup in singles:
        columns.append((setup.label, setup.nodes[0], setup.profiled_us[0], setup.profiled))
    headers = ["us CPU per client PUT", *(c[0] for c in columns)]
    rows = [[stage, *(_us(c[1].stages.get(stage, 0.0)) for c in columns)] for stage in STAGES]
    rows += [
        ["= measured CPU/req (run without profilers)", *(_us(c[1].total_us) for c in columns)],
        ["  of which user", *(_us(c[1].user_us) for c in columns)],
        ["  of which sys", *(_us(c[1].sys_us) for c in columns)],
        ["  event-loop thread", *(_us(c[1].groups.get("event-loop thread", 0.0)) for c in columns)],
        ["  fsync thread(s)", *(_us(c[1].groups.get("fsync thread(s)", 0.0)) for c in columns)],
        ["  other threads", *(_us(c[1].groups.get("other threads", 0.0)) for c in columns)],
        ["measured CPU/req under py-spy and perf", *(_us(c[2]) for c in columns)],
        ["py-spy samples", *(f"{c[1].samples:,}" for c in columns)],
        ["active samples / on-CPU time x rate", *(f"{c[1].active_per_cpu:.2f}" for c in columns)],
    ]
    return format_table(headers, rows, markdown=markdown)


def native_table(n3: Setup, singles: Sequence[Setup], *, markdown: bool) -> str:
    columns = [(node.label, node) for node in n3.nodes]
    columns.append(("N=3 total", n3.total()))
    columns += [(setup.label, setup.nodes[0]) for setup in singles]
    headers = ["us CPU per client PUT (perf)", *(c[0] for c in columns)]
    rows = [[category, *(_us(c[1].native.get(category, 0.0)) for c in columns)] for category in perf_cpu.CATEGORIES]
    rows += [
        ["perf samples", *(f"{c[1].perf_samples:,}" for c in columns)],
        ["perf samples / (/proc CPU x rate)", *(f"{c[1].perf_per_cpu:.2f}" for c in columns[:3])],
    ]
    rows[-1] += [""] + [f"{c[1].perf_per_cpu:.2f}" for c in columns[4:]]
    return format_table(headers, rows, markdown=markdown)


def throughput(setups: Sequence[Setup]) -> str:
    return "; ".join(
        f"{s.label}: {s.plain.rps:,.0f} req/s plain, {s.profiled.rps:,.0f} under py-spy, "
        f"p50 {s.plain.p50_ms:.2f} ms, p99 {s.plain.p99_ms:.2f} ms, errors {s.plain.errors + s.profiled.errors}"
        + (f" ({s.core})" if s.core else "")
        for s in setups
    )


def leaves_report(setups: Sequence[Setup]) -> str:
    """Per setup (N=3: all nodes together) and stage, the leaf functions by
    self time in us/request; then the unclassified leaves."""
    lines = []
    for setup in setups:
        total = setup.total() if len(setup.nodes) > 1 else setup.nodes[0]
        lines.append(f"\ntop self time by stage, {setup.label} (us CPU per client PUT, all its nodes):")
        for stage in STAGES:
            leaves = total.leaves.get(stage)
            if not leaves or total.stages.get(stage, 0.0) < 0.5:
                continue
            lines.append(f"  {stage} ({total.stages[stage]:.1f}):")
            lines += [f"    {us:6.2f}  {leaf}" for leaf, us in top(leaves, TOP_LEAVES)]
    unclassified = floats()
    for setup in setups:
        for node in setup.nodes:
            add_into(unclassified, node.leaves.get(UNCLASSIFIED, {}))
    lines.append(f"\nunclassified leaf functions (us per client PUT, every setup and node; top {TOP_UNCLASSIFIED}):")
    lines += [f"  {us:6.2f}  {leaf}" for leaf, us in top(unclassified, TOP_UNCLASSIFIED)] or ["  (none)"]
    return "\n".join(lines)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fsync", choices=("batch", "always"), default="batch", help="--fsync of the LMDB nodes")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured wrk run (two per setup)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of discarded warm-up per setup")
    parser.add_argument("--keys", type=int, default=KEYS, help=f"keys preloaded and overwritten (default {KEYS:,})")
    parser.add_argument("--rate", type=int, default=SAMPLE_RATE_HZ, help="py-spy samples per second per node")
    parser.add_argument(
        "--blocking", action="store_true", help="py-spy pauses each node per sample (untorn stacks; slows the nodes)"
    )
    parser.add_argument(
        "--no-gil", action="store_true", help="sample every running thread, not only the GIL holder (see the docstring)"
    )
    parser.add_argument("--sched-batch", action="store_true", help="the nodes under SCHED_BATCH while sampled")
    parser.add_argument("--no-perf", action="store_true", help="skip the perf table (native and kernel CPU)")
    parser.add_argument("--no-single", action="store_true", help="skip the N=1 LMDB and memory reference columns")
    parser.add_argument("--keep-raw", metavar="DIR", help="keep py-spy's raw stacks in DIR")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown (for BENCHMARKS.md)")
    args = parser.parse_args()
    require_wrk()
    spy = pyspy_path() or (str(Path(PYTHON).parent / "py-spy") if (Path(PYTHON).parent / "py-spy").exists() else None)
    if spy is None:
        sys.exit("bench: py-spy not found: `.venv/bin/pip install py-spy`, or set BENCH_PYSPY")
    os.sched_setaffinity(0, {int(LOAD_CORE)})  # this script (the preload) stays off the server core
    command = "python -m bench put_profile " + shlex.join(sys.argv[1:])
    load = uptime()
    print(f"machine: {machine_summary()}\napp under test: {APP_DIR / 'app'}\n{load}", flush=True)
    with tempdir("kvstore-bench-put-profile-") as tmp:
        logdir = Path(tmp)
        raw_dir = Path(args.keep_raw) if args.keep_raw else logdir / "raw"
        raw_dir.mkdir(parents=True, exist_ok=True)
        lua = write_lua(logdir, "put-random", LUA_RANDOM_PUT.replace("{keys}", str(args.keys)))
        n3 = run_n3(args, logdir=logdir, lua=lua, spy=spy, raw_dir=raw_dir)
        singles = []
        if not args.no_single:
            for storage in ("lmdb", "memory"):
                singles.append(run_single(args, storage=storage, logdir=logdir, lua=lua, spy=spy, raw_dir=raw_dir))
    setups = [n3, *singles]
    print(leaves_report(setups))
    print()
    if args.markdown:
        print(f"`{command}` ({machine_summary()}; `{load}` at the start)\n")
    else:
        print(f"command: {command}\n{uptime()} (at the end)\n")
    print(table(n3, singles, markdown=args.markdown))
    if any(node.perf_samples for node in n3.nodes):
        print()
        print(native_table(n3, singles, markdown=args.markdown))
    print(f"\n{throughput(setups)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
