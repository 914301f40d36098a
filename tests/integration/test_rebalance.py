"""Rebalancing with real node processes: a join moves each record once (one
source per arc, the others checked by digest), the old nodes drop their
surplus copies right after the hand-off, and a write one source missed is
found by the digest check. Anti-entropy is off (--anti-entropy-interval 3600)
so only the rebalancing machinery can move anything."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from app.ring import HashRing
from tests.harness.processes import Cluster
from tests.integration.history import Op, check, observe, record_writes
from tests.integration.probes import (
    admin_get,
    change_membership,
    read_replicas,
    rebalancing_left,
    wait_for,
)

N = 3
TOKEN = "rebalance-test-token"
NODE_ARGS = [
    "--replication-factor",
    str(N),
    "--peer-timeout",
    "0.5",
    "--anti-entropy-interval",
    "3600",
    "--cluster-token",
    TOKEN,
]
JOIN_KEYS = [f"join-{i:05d}" for i in range(2000)]
MISSED_KEYS = [f"missed-{i:04d}" for i in range(200)]
# Generous bounds for robustness on a loaded machine, not performance claims
# (bench/scale.py measures how fast it really is).
READY_WITHIN_S = 60.0
SURPLUS_DROPPED_WITHIN_S = 20.0
PULL_OVERHEAD = 1.05  # records pulled per record needed: each record moved once

pytestmark = pytest.mark.slow

MakeCluster = Callable[..., Cluster]


def owners_in(ids: list[str]) -> Callable[[str], set[str]]:
    ring = HashRing(ids)
    return lambda key: set(ring.owners(key.encode(), N))


def misplaced(urls: dict[str, str], keys: list[str]) -> str | None:
    """None when every key is live on exactly its N owners and nowhere else."""
    owners = owners_in(list(urls))
    records = read_replicas(urls, keys, token=TOKEN)
    wrong = []
    for key in keys:
        holders = {node_id for node_id in urls if records[node_id, key].live}
        if holders != owners(key):
            wrong.append(f"{key} on {sorted(holders)}, owners {sorted(owners(key))}")
    return f"{len(wrong)} keys not on exactly their owners, e.g. {wrong[:3]}" if wrong else None


def assert_nothing_lost(urls: dict[str, str], keys: list[str], ops: list[Op]) -> None:
    verdict = check(ops, observe(urls, keys))
    print(f"read through {sorted(urls)}: {verdict.summary()}")
    assert verdict.acknowledged >= len(keys) // 2, verdict.summary()
    assert verdict.lost == 0, verdict.summary()


def test_a_join_pulls_each_record_once_and_old_nodes_drop_their_surplus(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(3, args=NODE_ARGS, durable=True)
    ops = record_writes(cluster.node("node1").url, ((key, f"v-{key}".encode()) for key in JOIN_KEYS))
    assert all(op.outcome == "ok" for op in ops), [op.error for op in ops if op.outcome != "ok"][:3]

    newcomer = cluster.add_node()
    newcomer.start().wait_serving()
    peers = cluster.direct_peers
    change_membership(cluster.node("node1").url, peers, token=TOKEN)
    newcomer.wait_ready(timeout=READY_WITHIN_S)

    status = admin_get(newcomer.url, "/admin/rebalance", token=TOKEN)
    owned = sum(1 for key in JOIN_KEYS if newcomer.node_id in owners_in(list(peers))(key))
    print(f"{newcomer.node_id}: {status}; owns {owned} of {len(JOIN_KEYS)} keys")
    assert status["records_needed"] == owned, status
    assert status["records_pulled"] <= PULL_OVERHEAD * status["records_needed"], status

    took = wait_for(lambda: rebalancing_left(peers, token=TOKEN), timeout=SURPLUS_DROPPED_WITHIN_S, what="hand-off")
    print(f"every node reports no surplus {took:.1f}s after the new node was ready")
    wait_for(lambda: misplaced(peers, JOIN_KEYS), timeout=SURPLUS_DROPPED_WITHIN_S, what="each key on its owners only")
    for node_id, url in peers.items():
        status = admin_get(url, "/admin/rebalance", token=TOKEN)
        assert status["surplus_keys"] == 0 and status["surplus_ranges"] == 0, (node_id, status)
    metrics = _get_metrics(newcomer.url)
    assert f"kvstore_rebalance_needed_records {float(owned)}" in metrics
    assert_nothing_lost(peers, JOIN_KEYS, ops)


def test_the_digest_check_pulls_writes_the_streaming_source_missed(make_cluster: MakeCluster) -> None:
    """node1 sleeps through writes acknowledged by node2 and node3; node2 (the
    only holder of node1's hints) dies. The joining node must sync every arc
    from node1 and node3 (2 of 3 old replicas at W=2): the arcs it streams
    from node1 are stale, and only the digest check against node3 finds it."""
    cluster = make_cluster(3, args=NODE_ARGS, durable=True)
    node1, node2, node3 = (cluster.node(f"node{i}") for i in (1, 2, 3))
    ops = record_writes(node2.url, ((key, b"old") for key in MISSED_KEYS))
    node1.pause()
    try:
        ops += record_writes(node2.url, ((key, b"new") for key in MISSED_KEYS))
        node2.kill()  # before node1 wakes: its hints for node1 die with it
    finally:
        node1.resume()
    acknowledged = sum(op.outcome == "ok" for op in ops)
    assert acknowledged == 2 * len(MISSED_KEYS), [op.error for op in ops if op.outcome != "ok"][:3]
    stale = read_replicas({"node1": node1.url, "node3": node3.url}, MISSED_KEYS, token=TOKEN)
    missed = [key for key in MISSED_KEYS if stale["node1", key].value != b"new"]
    assert missed, "node1 was paused through the writes and should have missed some"
    assert all(stale["node3", key].value == b"new" for key in MISSED_KEYS)

    newcomer = cluster.add_node()
    newcomer.start()
    newcomer.wait_ready(timeout=READY_WITHIN_S)
    owners = owners_in(list(cluster.direct_peers))
    mine = [key for key in MISSED_KEYS if newcomer.node_id in owners(key)]
    held = read_replicas({newcomer.node_id: newcomer.url}, mine, token=TOKEN)
    wrong = [key for key in mine if held[newcomer.node_id, key].value != b"new"]
    print(f"node1 missed {len(missed)} writes; the new node owns {len(mine)} keys, {len(wrong)} of them stale")
    assert not wrong, f"the new node holds stale values for {wrong[:5]}\n{newcomer.log_tail(80)}"
    assert_nothing_lost({"node1": node1.url, "node3": node3.url, newcomer.node_id: newcomer.url}, MISSED_KEYS, ops)


def _get_metrics(url: str) -> str:
    resp = httpx.get(url + "/metrics", timeout=10)
    resp.raise_for_status()
    return resp.text
