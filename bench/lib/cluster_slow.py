"""The cluster benchmark's slow section: what one slow replica costs quorum
reads. Three nodes, N=3, node3 reached by node1 and node2 only through the
harness's TCP proxy (tests/harness/proxy.py); quorum GET through node1 with
the proxy adding nothing, then (same processes) with it delaying every chunk
sent to node3 by 20 ms. Rows slow_none, slow_one.

The proxy runs in this process, on the load core, and must cost little
enough not to be what is measured: the +0 ms row is the baseline, so a
proxy that slowed it would hide the slow node's cost. Each row's note gives
the share of a core this process (proxy and all) used.
"""

from __future__ import annotations

import argparse
import os
from contextlib import ExitStack
from pathlib import Path

from bench.lib.cluster_nodes import reads_sent, start_cluster
from bench.lib.cluster_report import Report
from bench.lib.common import run_wrk
from bench.lib.loader import preload
from tests.harness.proxy import Proxy, ProxyLoop

SLOW_DELAY_S = 0.020  # 20 ms added towards node3: the delay the slow-replica target (p99 <= 1.5x) is stated for


def section_slow(report: Report, *, args: argparse.Namespace, logdir: Path, luas: dict[str, Path]) -> None:
    print(
        f"\n[slow] N=3 quorum GET via node1; node3 behind a proxy adding 0, then {SLOW_DELAY_S * 1000:.0f} ms",
        flush=True,
    )
    with ExitStack() as stack:
        loop = ProxyLoop()  # a thread of this process: on the load core, like the loader
        stack.callback(loop.close)
        proxies: list[Proxy] = []

        def node3_behind_proxy(node_id: str, direct: dict[str, str]) -> dict[str, str]:
            """node1 and node2 reach node3 through one proxy; node3 knows its own address."""
            if node_id == "node3":
                return direct
            if not proxies:
                proxies.append(Proxy(loop=loop, target_url=direct["node3"]))
                stack.callback(proxies[0].close)
            return {**direct, "node3": proxies[0].url}

        cluster = start_cluster(
            stack, logdir=logdir, name="slow", rf=3, storage=args.storage, peers_for=node3_behind_proxy
        )
        [proxy] = proxies
        url = cluster.node("node1").url
        preload(url)
        for key, delay, label in (
            ("slow_none", 0.0, "none slowed (proxy +0 ms)"),
            ("slow_one", SLOW_DELAY_S, f"node3 slowed (+{SLOW_DELAY_S * 1000:.0f} ms)"),
        ):
            proxy.delay = delay
            before = {peer: reads_sent(url, peer) for peer in ("node2", "node3")}
            result = report.add(
                key,
                run_wrk(
                    f"N=3 quorum GET via node1, {label}",
                    url,
                    lua=luas["get"],
                    duration_s=args.duration,
                    warmup_s=args.warmup,
                    server_pids=cluster.pids(),
                    other_pids=[os.getpid()],
                ),
            )
            sent = {peer: reads_sent(url, peer) - before[peer] for peer in ("node2", "node3")}
            share = sent["node3"] / (sent["node2"] + sent["node3"]) if sum(sent.values()) else 0.0
            report.notes.append(
                f"slow, {label}: node1 sent {share:.1%} of its replica reads to node3 "
                f"({sent['node3']:,.0f} of {sum(sent.values()):,.0f}, warm-up included); "
                f"the proxy (this script, load core) used {result.other_cpu_s / result.seconds:.0%}"
                f" of a core"
            )
            print(f"    {report.notes[-1]}", flush=True)
        proxy.delay = 0.0
