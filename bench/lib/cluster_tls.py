"""The cluster benchmark's TLS section: what encryption in transit costs.
Three nodes at N=3 (LMDB data dirs, --fsync batch), first in plain HTTP, then
with every node serving HTTPS and mutual TLS between them (certificates made
by tests/harness/certs.py, as in the tests); wrk drives quorum `GET /kv/{key}`
and `PUT /kv/{key}` through node1 in each, over HTTPS in the second. Rows
plain_get, plain_put, tls_get, tls_put. Target: TLS req/s >= 0.7 x plain.

Then one more run per op with the TLS cluster already warm, counting TLS
handshakes (kvstore_tls_handshakes_total) around it: the peer side (summed
over the three nodes' outgoing connections) per 10,000 client requests is
what connection reuse leaves in the steady state; wrk's own connections
(64 per run, each a handshake at node1) are counted apart.
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack
from pathlib import Path

from bench.lib.cluster_nodes import metric, start_cluster
from bench.lib.cluster_quorum import OPS, wrk_each_op
from bench.lib.cluster_report import Report
from bench.lib.common import run_wrk
from bench.lib.loader import preload
from tests.harness.certs import tls_mode

HANDSHAKES = "kvstore_tls_handshakes_total"


def section_tls(report: Report, *, args: argparse.Namespace, logdir: Path, luas: dict[str, Path]) -> None:
    print("\n[tls] 3 nodes at N=3 via node1: plain HTTP, then HTTPS with mutual TLS between nodes", flush=True)
    for mode in ("plain", "tls"):
        tls = tls_mode(logdir / "tls-certs") if mode == "tls" else None
        with ExitStack() as stack:
            cluster = start_cluster(stack, logdir=logdir, name=f"tls-{mode}", rf=3, storage=args.storage, tls=tls)
            context = cluster.ssl_context
            url = cluster.node("node1").url
            preload(url, context=context)
            urls = list(cluster.direct_peers.values())
            wrk_each_op(
                report,
                args=args,
                url=url,
                luas=luas,
                server_pids=cluster.pids(),
                row_prefix=mode,
                label=f"N=3 quorum {{op}} via node1, {'mutual TLS' if tls else 'plain HTTP'}",
            )
            if tls is None:
                continue
            for op in OPS:
                peer_before = sum(metric(u, HANDSHAKES, 'side="client"', context=context) or 0.0 for u in urls)
                server_before = metric(url, HANDSHAKES, 'side="server"', context=context) or 0.0
                steady = run_wrk(
                    f"steady {op}",
                    url,
                    lua=luas[op],
                    duration_s=args.duration,
                    warmup_s=0,
                    server_pids=cluster.pids(),
                )
                peer = sum(metric(u, HANDSHAKES, 'side="client"', context=context) or 0.0 for u in urls) - peer_before
                # node1's accepted handshakes: wrk's 64 connections plus its peers'; the /metrics reads add 2.
                server = (metric(url, HANDSHAKES, 'side="server"', context=context) or 0.0) - server_before - 2
                report.notes.append(
                    f"TLS handshakes in a steady {args.duration:g} s quorum {op.upper()} run of "
                    f"{steady.requests:,} requests: {peer:.0f} between nodes "
                    f"({peer / steady.requests * 10_000:.2f} per 10k requests); node1 accepted {server:.0f} "
                    f"(wrk's own connections: 64)"
                )
