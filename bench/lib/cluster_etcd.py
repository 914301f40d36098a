"""The cluster benchmark's etcd section: the external reference. Three etcd
members (etcd.py) on loopback; the same wrk drives the leader's JSON
gateway: POST /v3/kv/put (100-byte value), POST /v3/kv/range (linearizable,
then serializable). Rows etcd_put, etcd_range, etcd_range_serial; a missing
etcd fails the section.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

from bench.lib.cluster_nodes import PUT_KEYSPACE, SPREAD_KEYS, VALUE
from bench.lib.cluster_report import Report
from bench.lib.common import run_wrk, write_lua
from bench.lib.etcd import ETCD_HINT, b64, etcd_cluster, etcd_key, etcd_lua, etcd_post


def section_etcd(report: Report, *, args: argparse.Namespace, logdir: Path) -> None:
    print("\n[etcd] 3 members on loopback, wrk through the leader's JSON gateway", flush=True)
    if shutil.which("etcd") is None:
        print(ETCD_HINT, flush=True)
        report.failed_sections.append("etcd (not installed: apt-get install -y etcd-server)")
        return
    version = subprocess.run(["etcd", "--version"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
    with etcd_cluster(logdir) as (client, servers):
        leader_url = client[0]
        for url in client:
            status, body = etcd_post(url, "/v3/maintenance/status", "{}")
            if status == 200:
                data = json.loads(body)
                if data.get("leader") == data.get("header", {}).get("member_id"):
                    leader_url = url
        report.notes.append(
            f"etcd: {version.strip()}, 3 members, default durability (WAL fsync per raft batch), "
            f"load through the leader ({leader_url})"
        )
        for i in range(SPREAD_KEYS):
            body_json = f'{{"key":"{b64(etcd_key(i))}","value":"{b64(VALUE)}"}}'
            status, body = etcd_post(leader_url, "/v3/kv/put", body_json)
            if status != 200:
                raise RuntimeError(f"bench: etcd put answered {status}: {body[:200]!r}")
        status, body = etcd_post(leader_url, "/v3/kv/range", f'{{"key":"{b64(etcd_key(7))}"}}')
        if status != 200 or b64(VALUE).encode() not in body:
            raise RuntimeError(f"bench: etcd range of a preloaded key answered {status}: {body[:300]!r}")
        pids = [pid for server in servers for pid in server.pids()]
        runs = [
            ("etcd_put", "etcd 3 members PUT /v3/kv/put (leader)", "/v3/kv/put", PUT_KEYSPACE, ""),
            ("etcd_range", "etcd 3 members range, linearizable (leader)", "/v3/kv/range", SPREAD_KEYS, ""),
            (
                "etcd_range_serial",
                "etcd 3 members range, serializable (leader)",
                "/v3/kv/range",
                SPREAD_KEYS,
                ',"serializable":true',
            ),
        ]
        for key, label, path, keyspace, extra in runs:
            lua = write_lua(logdir, key, etcd_lua(path, keyspace, extra))
            report.add(
                key,
                run_wrk(label, leader_url, lua=lua, duration_s=args.duration, warmup_s=args.warmup, server_pids=pids),
            )
