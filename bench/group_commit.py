"""Group commit at --fsync always against etcd's batching: writes per fsync as concurrent writers grow.

A 3-node N=3 LMDB cluster at `--fsync always` (PUT /kv/{key} through node1,
100-byte values, quorum) and a 3-member etcd (bench/lib/etcd.py; PUT through
the leader's JSON gateway), both started once and measured in turn at each
wrk concurrency (`--concurrency`, default 1, 8, 64, 256 connections): req/s,
p99, the CPU of all three servers per PUT (steadier than req/s on a shared
machine), the writes each fsync made durable on every member over the
measured run, and the mean fsync time (the disk's share of each round):

- ours: kvstore_storage_synced_writes_total / kvstore_storage_syncs_total
  of the data store (store="data"), per node;
- etcd: etcd_mvcc_put_total / etcd_disk_wal_fsync_duration_seconds_count
  per member (the WAL fsync is the one an acknowledged put waits for; the
  raft entries committed, etcd_server_proposals_committed_total, are shown
  beside the puts as a check: they also count the leader's empty entries).

Servers on the server core, wrk (one thread) and this script on the load
core. Each run is a warm-up (discarded), then the measured run, with the
metrics read just before and after it. The load average is printed at the
start and the end (the machine may be shared).

    .venv/bin/python -m bench group_commit [--concurrency 1,8,64,256] [--duration 5] [--markdown]
                                           [--only ours,etcd,waits] [--fsync batch]

`waits` (bench/lib/durable_waits.py) measures the mechanism alone, in this
process on the server core after the clusters are stopped: W writers on one
loop, a durable wait per write against one per loop turn.

To measure another tree's app (e.g. main before a change), point the nodes
at a snapshot: `git archive main app | tar -x -C /tmp/snap` and
`BENCH_APP_DIR=/tmp/snap`. A tree without the fsync counters shows "-" in
our writes-per-fsync column.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench.lib.cluster_nodes import LUA_PUT, PUT_KEYSPACE, metric, start_cluster
from bench.lib.common import (
    APP_DIR,
    LOAD_CORE,
    SERVER_CORE,
    Result,
    format_table,
    http_request,
    machine_summary,
    require_wrk,
    run_wrk,
    tempdir,
    write_lua,
)
from bench.lib.durable_waits import WaitResult, measure_waits
from bench.lib.etcd import ETCD_HINT, etcd_cluster, etcd_lua, etcd_post

CONCURRENCY = (1, 8, 64, 256)
SYSTEMS = ("ours", "etcd", "waits")
OUR_SYNCS = "kvstore_storage_syncs_total"
OUR_WRITES = "kvstore_storage_synced_writes_total"
OUR_SECONDS = "kvstore_storage_sync_seconds_total"
ETCD_FSYNCS = "etcd_disk_wal_fsync_duration_seconds_count"
ETCD_FSYNC_SECONDS = "etcd_disk_wal_fsync_duration_seconds_sum"
ETCD_PUTS = "etcd_mvcc_put_total"
ETCD_COMMITTED = "etcd_server_proposals_committed_total"


@dataclass
class Member:
    """One server whose counters are read around each run."""

    name: str
    url: str
    writes: str  # the metric counting writes made durable
    syncs: str  # the metric counting fsyncs
    seconds: str  # the metric summing their time
    labels: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()  # further counters shown for reference


@dataclass
class Row:
    system: str
    connections: int
    result: Result
    per_member: list[tuple[str, float | None, float, float]] = field(default_factory=list)  # name, w/fsync, w, fsyncs
    fsync_ms: list[float | None] = field(default_factory=list)  # mean fsync time per member
    extra: dict[str, float] = field(default_factory=dict)


def read(member: Member) -> dict[str, float | None]:
    names = (member.writes, member.syncs, member.seconds, *member.extra)
    return {name: metric(member.url, name, *member.labels) for name in names}


def measure(
    system: str,
    *,
    url: str,
    lua: Path,
    connections: int,
    members: list[Member],
    pids: list[int],
    args: argparse.Namespace,
) -> Row:
    label = f"{system} PUT, {connections} connection{'s' if connections > 1 else ''}"
    if args.warmup > 0:
        run_wrk(label, url, lua=lua, duration_s=args.warmup, warmup_s=0, server_pids=pids, connections=connections)
    before = [read(member) for member in members]
    result = run_wrk(
        label, url, lua=lua, duration_s=args.duration, warmup_s=0, server_pids=pids, connections=connections
    )
    after = [read(member) for member in members]
    row = Row(system=system, connections=connections, result=result)
    for member, start, end in zip(members, before, after, strict=True):
        if any(start[n] is None or end[n] is None for n in (member.writes, member.syncs)):
            row.per_member.append((member.name, None, 0.0, 0.0))  # the tree has no such counter
            row.fsync_ms.append(None)
            continue
        writes = (end[member.writes] or 0.0) - (start[member.writes] or 0.0)
        syncs = (end[member.syncs] or 0.0) - (start[member.syncs] or 0.0)
        seconds = (end[member.seconds] or 0.0) - (start[member.seconds] or 0.0)
        row.per_member.append((member.name, writes / syncs if syncs else None, writes, syncs))
        row.fsync_ms.append(seconds / syncs * 1000 if syncs else None)
        for name in member.extra:
            if start[name] is not None and end[name] is not None:
                row.extra[f"{member.name} {name}"] = (end[name] or 0.0) - (start[name] or 0.0)
    print(
        f"  {label}: {result.rps:,.0f} req/s, p99 {result.p99_ms:.2f} ms, errors {result.errors}, "
        f"server core busy {result.server_core_busy:.0%}, CPU {result.cpu_us_per_request:,.0f} us/PUT; "
        "writes/fsync (mean fsync ms) "
        + ", ".join(
            f"{name} {_ratio(w)} ({writes:,.0f}/{syncs:,.0f}, {_ms(ms)})"
            for (name, w, writes, syncs), ms in zip(row.per_member, row.fsync_ms, strict=True)
        ),
        flush=True,
    )
    if row.extra:
        print("    " + ", ".join(f"{name} +{value:,.0f}" for name, value in row.extra.items()), flush=True)
    return row


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def etcd_leader(client: list[str]) -> str:
    for url in client:
        status, body = etcd_post(url, "/v3/maintenance/status", "{}")
        if status == 200:
            data = json.loads(body)
            if data.get("leader") == data.get("header", {}).get("member_id"):
                return url
    return client[0]


def report(rows: list[Row], *, markdown: bool) -> str:
    by = {(row.system, row.connections): row for row in rows}
    headers = [
        "connections",
        "ours: req/s",
        "p99 ms",
        "CPU us/PUT",
        "writes/fsync (node1, 2, 3)",
        "fsync ms (node1)",
        "etcd: req/s",
        "p99 ms",
        "CPU us/PUT",
        "writes/fsync (leader, followers)",
        "fsync ms (leader)",
        "our PUT / etcd put",
    ]
    table = []
    for connections in sorted({row.connections for row in rows}):
        ours, etcd = by.get(("ours", connections)), by.get(("etcd", connections))
        cells = [str(connections)]
        for row in (ours, etcd):
            if row is None:
                cells += ["-", "-", "-", "-", "-"]
            else:
                per = " / ".join(_ratio(w) for _, w, _, _ in row.per_member)
                first_ms = row.fsync_ms[0] if row.fsync_ms else None
                cells += [
                    f"{row.result.rps:,.0f}",
                    f"{row.result.p99_ms:.2f}",
                    f"{row.result.cpu_us_per_request:,.0f}",
                    per,
                    _ms(first_ms).removesuffix(" ms"),
                ]
        ratio = f"{ours.result.rps / etcd.result.rps:.2f}x" if ours and etcd and etcd.result.rps else "-"
        cells.append(f"**{ratio}**" if markdown and ratio != "-" else ratio)
        table.append(cells)
    return format_table(headers, table, markdown=markdown)


def waits_report(results: list[WaitResult], *, markdown: bool) -> str:
    by = {(r.mode, r.writers): r for r in results}
    headers = [
        "writers",
        "a future per write: writes/s",
        "CPU us/write",
        "writes/fsync",
        "one per loop turn: writes/s",
        "CPU us/write",
        "writes/fsync",
        "CPU per write, turn / write",
    ]
    rows = []
    for writers in sorted({r.writers for r in results}):
        one, turn = by[("per-write", writers)], by[("per-turn", writers)]
        rows.append(
            [
                str(writers),
                f"{one.writes_per_s:,.0f}",
                f"{one.cpu_us_per_write:.1f}",
                f"{one.writes_per_fsync:.1f}",
                f"{turn.writes_per_s:,.0f}",
                f"{turn.cpu_us_per_write:.1f}",
                f"{turn.writes_per_fsync:.1f}",
                f"{turn.cpu_us_per_write / one.cpu_us_per_write:.2f}x" if one.cpu_us_per_write else "-",
            ]
        )
    return format_table(headers, rows, markdown=markdown)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)), help="wrk connections per run")
    parser.add_argument(
        "--only", default=",".join(SYSTEMS), help="what to measure: ours, etcd, waits (the mechanism in-process)"
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured wrk run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of discarded warm-up before each run")
    parser.add_argument(
        "--fsync",
        choices=("always", "batch"),
        default="always",
        help="our nodes' policy; batch (acknowledged before the flush) shows what waiting for the fsync costs",
    )
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown (for BENCHMARKS.md)")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    systems = [s.strip() for s in args.only.split(",") if s.strip()]
    if set(systems) - set(SYSTEMS) or not levels or min(levels) < 1:
        parser.error(f"--only takes {', '.join(SYSTEMS)}; --concurrency positive integers")
    require_wrk()
    if "etcd" in systems and shutil.which("etcd") is None:
        sys.exit(ETCD_HINT)
    os.sched_setaffinity(0, {int(LOAD_CORE)})  # this script stays off the server core
    print(f"machine: {machine_summary().rsplit(',', 1)[0]}", flush=True)
    print(f"app under test: {APP_DIR / 'app'}", flush=True)
    print(f"load at start: {uptime()}", flush=True)
    rows: list[Row] = []
    with tempdir("kvstore-bench-group-commit-") as tmp, ExitStack() as stack:
        logdir = Path(tmp)
        runs: dict[str, Callable[[int], Row]] = {}
        if "ours" in systems:
            cluster = start_cluster(
                stack, logdir=logdir, name="gc", rf=3, storage="lmdb", extra=["--fsync", args.fsync]
            )
            url = cluster.node("node1").url
            our_lua = write_lua(logdir, "put", LUA_PUT)
            ours = [
                Member(f"node{i}", cluster.node(f"node{i}").url, OUR_WRITES, OUR_SYNCS, OUR_SECONDS, ('store="data"',))
                for i in (1, 2, 3)
            ]
            our_pids = cluster.pids()
            print(f"ours: 3 nodes, N=3, LMDB --fsync {args.fsync}, PUT /kv through {url}", flush=True)
            runs["ours"] = lambda c: measure(
                "ours", url=url, lua=our_lua, connections=c, members=ours, pids=our_pids, args=args
            )
        if "etcd" in systems:
            version = subprocess.run(["etcd", "--version"], capture_output=True, text=True, check=False).stdout
            client, servers = stack.enter_context(etcd_cluster(logdir))
            leader = etcd_leader(client)
            order = [leader, *(u for u in client if u != leader)]
            members = [
                Member(
                    "leader" if u == leader else f"follower {u.rsplit(':', 1)[1]}",
                    u,
                    ETCD_PUTS,
                    ETCD_FSYNCS,
                    ETCD_FSYNC_SECONDS,
                    extra=(ETCD_COMMITTED,),
                )
                for u in order
            ]
            status, _ = http_request(leader, "GET", "/metrics")
            if status != 200:
                raise RuntimeError(f"bench: etcd {leader}/metrics answered {status}")
            etcd_pids = [pid for server in servers for pid in server.pids()]
            etcd_lua_path = write_lua(logdir, "etcd_put", etcd_lua("/v3/kv/put", PUT_KEYSPACE, ""))
            print(f"etcd: {version.splitlines()[0]}, 3 members, PUT through the leader {leader}", flush=True)
            runs["etcd"] = lambda c: measure(
                "etcd", url=leader, lua=etcd_lua_path, connections=c, members=members, pids=etcd_pids, args=args
            )
        for connections in levels if runs else ():
            print(f"\n[{connections} connections]", flush=True)
            for system in runs:
                rows.append(runs[system](connections))
    waits: list[WaitResult] = []
    if "waits" in systems:
        print(
            "\n[waits] one LMDB store at --fsync always in this process (server core), W writers on one loop",
            flush=True,
        )
        os.sched_setaffinity(0, {int(SERVER_CORE)})
        waits = [result for writers in levels for result in measure_waits(writers, args.duration)]
    print(f"\nload at end: {uptime()}", flush=True)
    if rows:
        print(
            f"\nGroup commit at --fsync {args.fsync} against etcd (PUT, 100-byte values; writes per fsync over "
            "the measured run, per member)\n",
            flush=True,
        )
        print(report(rows, markdown=args.markdown), flush=True)
    if waits:
        print("\nThe durable wait alone, in-process (LMDB --fsync always, 100-byte puts)\n", flush=True)
        print(waits_report(waits, markdown=args.markdown), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
