"""The cluster benchmark's quorum section: what replication costs. Three nodes
(LMDB data dirs, --fsync batch unless bench/cluster.py --fsync says otherwise) with --replication-factor 1, then the
same with N=3; wrk drives `GET /kv/{key}` and `PUT /kv/{key}` (100-byte raw
body) through node1 with keys spread so every owner is hit, at the default
consistency (quorum: R = W = 2 at N=3). Rows n1_get, n1_put, n3_get, n3_put.
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack
from pathlib import Path

from bench.lib.cluster_nodes import start_cluster
from bench.lib.cluster_report import Report
from bench.lib.common import run_wrk
from bench.lib.loader import preload
from bench.lib.pyspy import profile_put

OPS = ("get", "put")


def wrk_each_op(
    report: Report,
    *,
    args: argparse.Namespace,
    url: str,
    luas: dict[str, Path],
    server_pids: list[int],
    row_prefix: str,
    label: str,
) -> None:
    """One measured wrk run per op (GET, then PUT) through url, each added to the
    report as row `<row_prefix>_<op>` and printed as label with {op} filled in."""
    for op in OPS:
        report.add(
            f"{row_prefix}_{op}",
            run_wrk(
                label.format(op=op.upper()),
                url,
                lua=luas[op],
                duration_s=args.duration,
                warmup_s=args.warmup,
                server_pids=server_pids,
            ),
        )


def section_quorum(report: Report, *, args: argparse.Namespace, logdir: Path, luas: dict[str, Path]) -> None:
    print("\n[quorum] 3 nodes via node1, N=1 then N=3 (default consistency: quorum)", flush=True)
    for rf in (1, 3):
        with ExitStack() as stack:
            cluster = start_cluster(
                stack, logdir=logdir, name=f"q{rf}", rf=rf, storage=args.storage, extra=["--fsync", args.fsync]
            )
            url = cluster.node("node1").url
            preload(url)
            tag = f"N={rf}" + (" quorum (R=W=2)" if rf == 3 else " (one owner, R=W=1)")
            wrk_each_op(
                report,
                args=args,
                url=url,
                luas=luas,
                server_pids=cluster.pids(),
                row_prefix=f"n{rf}",
                label=f"3 nodes {tag} {{op}} /kv via node1",
            )
            if rf == 3 and args.profile:
                profile_put(report, args=args, cluster=cluster, lua=luas["put"])
