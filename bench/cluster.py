"""The cluster benchmark: what replication costs, how fast a node that missed
writes catches up, what one slow replica costs, and a 3-member etcd as the
external reference. The entry point; each section is a module of its own:

- quorum (cluster_quorum.py): three nodes via node1, N=1 then N=3 quorum,
  GET and PUT. Target: N=3 quorum req/s >= 0.5 x the N=1 figure.
- converge (cluster_converge.py): node3 killed, 100,000 writes through node1
  and node2, node3 restarted: the time until it holds every key, per
  anti-entropy pace (--converge-paces), and which mechanism did the work.
- slow (cluster_slow.py): quorum GET via node1 with node3 behind a TCP proxy
  adding 0, then 20 ms. Target: p99 with one node slowed <= 1.5 x p99 with
  none slowed.
- etcd (cluster_etcd.py, etcd.py): three etcd members, the same wrk through
  the leader's JSON gateway. Target: our N=3 quorum PUT and GET req/s >=
  etcd's put and linearizable range.
- tls (cluster_tls.py; not in the default run, `--tls` adds it): N=3 quorum
  GET and PUT in plain HTTP, then over HTTPS with mutual TLS between the nodes,
  and the TLS handshakes a warm cluster still makes per 10k requests.
  Target: TLS req/s >= 0.7 x plain.

Nodes come from the shared harness (cluster_nodes.py on tests/harness), the
setup writes from loader.py, the tables and targets from cluster_report.py,
`--profile` from pyspy.py. Every server is pinned to the server core, wrk
(one thread, 64 connections) and this script (its loader and proxy) to the
load core. Each wrk run is a 1 s warm-up, discarded, then the measured run.

    .venv/bin/python -m bench cluster [--only quorum,converge,slow,etcd,tls] [--tls] [--duration 5] [--markdown]
                                      [--fsync always]   # the quorum nodes sync every write, like etcd
                                      [--profile PREFIX]   # py-spy node1 during an extra N=3 PUT run

Exit status 0 when every target is met, 1 when one is missed or a section
could not run (e.g. etcd not installed).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bench.lib.cluster_converge import CONVERGE_WRITES, PACES, section_converge
from bench.lib.cluster_etcd import section_etcd
from bench.lib.cluster_nodes import LUA_GET, LUA_PUT
from bench.lib.cluster_quorum import section_quorum
from bench.lib.cluster_report import Report, check_targets, print_report
from bench.lib.cluster_slow import section_slow
from bench.lib.cluster_tls import section_tls
from bench.lib.common import APP_DIR, LOAD_CORE, machine_summary, require_wrk, tempdir, write_lua

SECTIONS = ("quorum", "converge", "slow", "etcd", "tls")
DEFAULT_SECTIONS = ("quorum", "converge", "slow", "etcd")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only", default=",".join(DEFAULT_SECTIONS), help=f"sections to run, comma-separated: {', '.join(SECTIONS)}"
    )
    parser.add_argument("--tls", action="store_true", help="add the tls section: N=3 quorum with mutual TLS vs plain")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured wrk run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of discarded warm-up before each run")
    parser.add_argument(
        "--storage",
        choices=("lmdb", "memory"),
        default="lmdb",
        help="engine of the quorum and slow nodes (convergence always uses lmdb data dirs)",
    )
    parser.add_argument(
        "--fsync",
        choices=("batch", "always"),
        default="batch",
        help="--fsync policy of the quorum nodes; 'always' syncs every acknowledged write, as etcd's WAL does",
    )
    parser.add_argument(
        "--converge-paces",
        default="default,fast",
        help=f"anti-entropy paces for the convergence runs: {', '.join(PACES)}",
    )
    parser.add_argument(
        "--converge-writes",
        type=int,
        default=CONVERGE_WRITES,
        help=f"distinct keys written while node3 is down (default {CONVERGE_WRITES:,})",
    )
    parser.add_argument(
        "--profile",
        metavar="PREFIX",
        help="py-spy node1 during an extra N=3 quorum PUT run; "
        "raw stacks to PREFIX-n1-put.txt (py-spy from BENCH_PYSPY or PATH)",
    )
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown (for BENCHMARKS.md)")
    args = parser.parse_args()
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    if args.tls and "tls" not in sections:
        sections.append("tls")
    unknown = set(sections) - set(SECTIONS)
    args.converge_paces = [p.strip() for p in args.converge_paces.split(",") if p.strip()]
    if unknown or set(args.converge_paces) - set(PACES):
        parser.error(f"unknown section or pace: {sorted(unknown | (set(args.converge_paces) - set(PACES)))}")
    require_wrk()
    # This script (loader, proxy, polling) stays off the server core; servers are pinned there by taskset.
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    print(f"machine: {machine_summary()}", flush=True)
    print(f"app under test: {APP_DIR / 'app'}", flush=True)
    report = Report()
    with tempdir("kvstore-bench-cluster-") as tmp:
        logdir = Path(tmp)
        luas = {"get": write_lua(logdir, "get", LUA_GET), "put": write_lua(logdir, "put", LUA_PUT)}
        if "quorum" in sections:
            section_quorum(report, args=args, logdir=logdir, luas=luas)
        if "slow" in sections:
            section_slow(report, args=args, logdir=logdir, luas=luas)
        if "etcd" in sections:
            section_etcd(report, args=args, logdir=logdir)
        if "tls" in sections:
            section_tls(report, args=args, logdir=logdir, luas=luas)
        if "converge" in sections:
            section_converge(report, args=args, logdir=logdir)
    print_report(report, args)
    return 0 if check_targets(report) else 1


if __name__ == "__main__":
    sys.exit(main())
