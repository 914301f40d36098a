"""The cluster benchmark's converge section: how fast a node that missed
writes catches up. Three nodes with data dirs, N=3; 1,000 keys written, node3
killed (SIGKILL), 100,000 distinct keys written through node1 and node2
(quorum still succeeds with 2 of 3; the coordinators keep hints for node3),
node3 restarted on its data dir; the time from its restart until its
`kvstore_keys` gauge holds every key. Once per anti-entropy pace
(--converge-paces); which mechanism did the work (hints delivered,
anti-entropy repairs, read repairs) is reported.
"""

from __future__ import annotations

import argparse
import time
from contextlib import ExitStack
from pathlib import Path

from bench.lib.cluster_nodes import SPREAD_KEYS, metric, start_cluster
from bench.lib.cluster_report import Report
from bench.lib.common import http_request
from bench.lib.loader import preload, put_all

CONVERGE_WRITES = 100_000  # writes the restarted node missed: enough that hints alone take a while
CONVERGE_TIMEOUT_S = 240.0  # per pace; a run that has not converged by then is reported as such
PACES = {"default": [], "fast": ["--anti-entropy-interval", "1"]}
PROGRESS_EVERY_S = 5  # one progress sample this often: a readable line, not a flood


def section_converge(report: Report, *, args: argparse.Namespace, logdir: Path) -> None:
    print(
        f"\n[converge] node3 killed, {args.converge_writes:,} writes through node1/node2, node3 restarted", flush=True
    )
    for pace in args.converge_paces:
        with ExitStack() as stack:
            cluster = start_cluster(stack, logdir=logdir, name=f"c-{pace}", rf=3, storage="lmdb", extra=PACES[pace])
            n1, n2, n3 = (node.url for node in cluster.nodes)
            preload(n1)
            cluster.node("node3").kill()
            acked, failed, load_s = put_all([n1, n2], [f"/kv/c{i}" for i in range(args.converge_writes)])
            expected = SPREAD_KEYS + acked
            held = {n: metric(cluster.node(n).url, "kvstore_keys") for n in ("node1", "node2")}
            time.sleep(1.5)  # the hints_pending gauge is refreshed by the once-a-second delivery loop
            hints_pending = sum(metric(u, "kvstore_hints_pending") or 0 for u in (n1, n2))
            before = {u: (metric(u, "kvstore_hints_delivered_total") or 0) for u in (n1, n2)}
            print(
                f"  pace {pace}: {acked:,} writes acknowledged ({failed} failed) in {load_s:.1f} s "
                f"({acked / load_s:,.0f}/s) with node3 down; node1/node2 hold {held}, "
                f"{hints_pending:,.0f} hints pending",
                flush=True,
            )
            started = time.monotonic()
            cluster.node("node3").start()
            ready_s = converged_s = None
            last = 0.0
            samples: list[tuple[float, float]] = []
            deadline = started + CONVERGE_TIMEOUT_S
            while time.monotonic() < deadline:
                if not cluster.node("node3").running:
                    raise RuntimeError(f"bench: node3 exited on restart:\n{cluster.node('node3').log_tail()}")
                now = time.monotonic() - started
                if ready_s is None and http_request(n3, "GET", "/ready")[0] == 200:
                    ready_s = now
                keys = metric(n3, "kvstore_keys")
                if keys is not None:
                    last = keys
                    if not samples or now - samples[-1][0] >= PROGRESS_EVERY_S:
                        samples.append((now, keys))
                    if keys >= expected:
                        converged_s = now
                        break
                time.sleep(0.1)
            delivered = sum((metric(u, "kvstore_hints_delivered_total") or 0) - before[u] for u in (n1, n2))
            repaired = sum(metric(u, "kvstore_anti_entropy_keys_repaired_total") or 0 for u in (n1, n2, n3))
            read_repairs = sum(metric(u, "kvstore_read_repairs_total") or 0 for u in (n1, n2, n3))
            entry = {
                "pace": pace,
                "flags": " ".join(PACES[pace]) or "(defaults: --anti-entropy-interval 30)",
                "acked": acked,
                "failed": failed,
                "load_s": load_s,
                "expected": expected,
                "ready_s": ready_s,
                "converged_s": converged_s,
                "held": last,
                "timeout_s": CONVERGE_TIMEOUT_S,
                "hints_delivered": delivered,
                "ae_repaired": repaired,
                "read_repairs": read_repairs,
                "progress": samples,
            }
            report.converge.append(entry)
            status = (
                f"converged in {converged_s:.1f} s"
                if converged_s is not None
                else f"NOT converged after {CONVERGE_TIMEOUT_S:.0f} s ({last:,.0f} of {expected:,} keys)"
            )
            print(
                f"  pace {pace}: node3 ready after {ready_s if ready_s is None else round(ready_s, 1)} s, "
                f"{status}; hints delivered {delivered:,.0f}, anti-entropy repairs {repaired:,.0f}, "
                f"read repairs {read_repairs:,.0f}",
                flush=True,
            )
            print("    progress (s, keys on node3): " + ", ".join(f"{t:.0f}: {k:,.0f}" for t, k in samples), flush=True)
