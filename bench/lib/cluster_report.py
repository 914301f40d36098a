"""What the cluster benchmark (bench/cluster.py) found: the rows each section
adds (one wrk run each), the convergence runs, notes; printed as the tables
BENCHMARKS.md quotes, and checked against the targets.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from bench.lib.cluster_nodes import SPREAD_KEYS
from bench.lib.common import Result, format_table

# Targets: N=3 quorum req/s at least half of N=1's; at least etcd's; a slowed
# node adds at most half again to quorum GET p99.
TARGETS = {"quorum_vs_n1": 0.5, "vs_etcd": 1.0, "slow_p99": 1.5, "tls_vs_plain": 0.7}


@dataclass
class Report:
    rows: dict[str, Result] = field(default_factory=dict)
    converge: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed_sections: list[str] = field(default_factory=list)
    profile: str = ""

    def add(self, key: str, result: Result) -> Result:
        self.rows[key] = result
        print(
            f"  {result.label:<52} {result.rps:>8,.0f} req/s  p50 {result.p50_ms:6.2f} ms  "
            f"p99 {result.p99_ms:6.2f} ms  core {result.server_core_busy:4.0%}  errors {result.errors}",
            flush=True,
        )
        return result


def print_report(report: Report, args: argparse.Namespace) -> None:
    if report.rows:
        headers = ["scenario", "req/s", "p50 ms", "p99 ms", "server CPU us/req", "server core busy", "errors"]
        rows = [
            [
                r.label,
                f"{r.rps:,.0f}",
                f"{r.p50_ms:.2f}",
                f"{r.p99_ms:.2f}",
                f"{r.cpu_us_per_request:.0f}",
                f"{r.server_core_busy:.0%}",
                str(r.errors),
            ]
            for r in report.rows.values()
        ]
        print()
        print(format_table(headers, rows, markdown=args.markdown))
        durability = f" (LMDB; --fsync {args.fsync} for the quorum rows, batch for the slow rows)"
        print(
            f"\n({args.duration:g} s per run after a {args.warmup:g} s warm-up; storage {args.storage}"
            f"{durability if args.storage == 'lmdb' else ''})"
        )
    if report.converge:
        headers = [
            "anti-entropy pace",
            "writes missed by node3",
            "load rate (node3 down)",
            "node3 ready after",
            "node3 holds every key after",
            "hints delivered",
            "anti-entropy repairs",
            "read repairs",
        ]
        rows = []
        for c in report.converge:
            conv = (
                f"{c['converged_s']:.1f} s"
                if c["converged_s"] is not None
                else f"not within {c['timeout_s']:.0f} s ({c['held']:,.0f} of {c['expected']:,})"
            )
            ready = f"{c['ready_s']:.1f} s" if c["ready_s"] is not None else "-"
            rows.append(
                [
                    str(c["flags"]),
                    f"{c['acked']:,}",
                    f"{c['acked'] / c['load_s']:,.0f} writes/s",
                    ready,
                    conv,
                    f"{c['hints_delivered']:,.0f}",
                    f"{c['ae_repaired']:,.0f}",
                    f"{c['read_repairs']:,.0f}",
                ]
            )
        print()
        print(format_table(headers, rows, markdown=args.markdown))
        print(
            f"\n(times from node3's restart on its data dir; 'holds every key' = its kvstore_keys gauge reaches "
            f"the {SPREAD_KEYS:,} preloaded + the acknowledged writes; LMDB data dirs, --fsync batch)"
        )
    for note in report.notes:
        print(f"note: {note}")


def check_targets(report: Report) -> bool:
    rows = report.rows
    checks: list[tuple[str, float, float, str]] = []
    for op in ("get", "put"):
        if f"n1_{op}" in rows and f"n3_{op}" in rows:
            checks.append(
                (
                    f"N=3 quorum {op.upper()} / N=1",
                    rows[f"n3_{op}"].rps / rows[f"n1_{op}"].rps,
                    TARGETS["quorum_vs_n1"],
                    ">=",
                )
            )
    for ours, theirs, name in (("n3_put", "etcd_put", "PUT / etcd put"), ("n3_get", "etcd_range", "GET / etcd range")):
        if ours in rows and theirs in rows:
            checks.append((f"N=3 quorum {name}", rows[ours].rps / rows[theirs].rps, TARGETS["vs_etcd"], ">="))
    for op in ("get", "put"):
        if f"plain_{op}" in rows and f"tls_{op}" in rows:
            checks.append(
                (
                    f"N=3 quorum {op.upper()} mutual TLS / plain",
                    rows[f"tls_{op}"].rps / rows[f"plain_{op}"].rps,
                    TARGETS["tls_vs_plain"],
                    ">=",
                )
            )
    if "slow_none" in rows and "slow_one" in rows:
        checks.append(
            ("GET p99 one slowed / none", rows["slow_one"].p99_ms / rows["slow_none"].p99_ms, TARGETS["slow_p99"], "<=")
        )
    ok = True
    print("\ntargets (replication cost, convergence, a slow node, etcd, TLS):")
    for name, ratio, target, sense in checks:
        met = ratio >= target if sense == ">=" else ratio <= target
        ok &= met
        print(f"  {name:<34} {ratio:5.2f}x  target {sense} {target}x  {'met' if met else 'MISSED'}")
    for c in report.converge:
        if c["converged_s"] is None or c["failed"]:
            ok = False
            print(
                f"  convergence ({c['pace']} pace): MISSED (not converged within {c['timeout_s']:.0f} s"
                f" or {c['failed']} writes failed)"
            )
    for section in report.failed_sections:
        ok = False
        print(f"  section not run: {section}")
    starved = [r.label for r in rows.values() if r.server_core_busy < 0.85]
    if starved:
        print(f"  WARNING: server core under 85% busy in: {', '.join(starved)} (machine contention or latency-bound)")
    bad = [r.label for r in rows.values() if r.errors]
    if bad:
        print(f"  errors (socket errors or non-2xx) in: {', '.join(bad)}")
        ok = False
    return ok
