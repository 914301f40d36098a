"""No acknowledged write lost when one node's clock is 30 s fast or slow.

Real node processes, one of them under libfaketime, judged by the history
checker. The schedules are the ones that lost writes before versions had to
win: v1 is written through node1, then v2 to the same keys through node3,
each after the previous answer came, so v2 must be what every read sees:

- quiet: nothing else happens (v1 at `one` for half the keys, `quorum` for the rest);
- hint: node3 is stalled while v1 is written, so it gets v1 only as a hint;
- restart: node3 is killed and restarted on its data dir between v1 and v2;
- load: clients keep writing through every node while node3 is restarted;
- ttl: v2 carries a TTL and expires while node3 still holds v1.

The skewed node is the one whose clock does harm: node1 runs 30 s fast (its
v1 is stamped ahead), or node3 runs 30 s slow (its v2 is stamped behind). In
these tests --max-clock-offset is wide open, so the versions alone must keep
every write; the guard that refuses a skewed node has its own test at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import httpx
import pytest

from app.ring import HashRing
from tests.harness.processes import Cluster, NodeProcess, skewed_clock
from tests.integration.history import Load, Op, check, observe, record_writes
from tests.integration.probes import admin_get, wait_converged, wait_for

N = 3
TOKEN = "skew-test-token"
SKEW_S = 30.0
WIDE_OPEN = str(4 * SKEW_S)  # a --max-clock-offset that lets a 30 s skew through to the versions
NODE_ARGS = ["--replication-factor", str(N), "--peer-timeout", "0.5", "--cluster-token", TOKEN]
# The sequential schedules keep anti-entropy at its default pace, as a user
# would: a fast one would hand node3 every v1 moments after it resumes and
# hide what hints and restarts do. Those that end by waiting for replicas to
# agree run it fast.
FAST_REPAIR = ["--anti-entropy-interval", "0.5"]
KEYS = [f"skew-{i:03d}" for i in range(100)]
STALL_S = 1.0  # a stalled node is marked down after the 0.5 s peer timeout
CHECK_AFTER_S = (0.05, 5.0)  # read everything this long after the last write, and again later
TTL_S = 1.0
MIN_ACKED = 0.95  # of each phase's writes: a history mostly refused proves nothing

pytestmark = pytest.mark.slow

MakeCluster = Callable[..., Cluster]
StartLoad = Callable[..., Load]
SKEWS = pytest.mark.parametrize("skew", [+SKEW_S, -SKEW_S], ids=["fast", "slow"])


def skewed_cluster(make_cluster: MakeCluster, skew: float, *, args: Iterable[str] = ()) -> Cluster:
    """node1 fast, or node3 slow: the clock that hurts in these schedules."""
    victim = "node1" if skew > 0 else "node3"
    cluster = make_cluster(
        3, args=[*NODE_ARGS, "--max-clock-offset", WIDE_OPEN, *args], durable=True, env_for={victim: skewed_clock(skew)}
    )
    wait_for(lambda: _skew_seen(cluster, victim, skew), timeout=10, what=f"the cluster measures {victim}'s skew")
    return cluster


def _skew_seen(cluster: Cluster, victim: str, skew: float) -> str | None:
    observer = next(node for node in cluster.nodes if node.node_id != victim)
    members = {m["node_id"]: m for m in admin_get(observer.url, "/ring", token=TOKEN)["members"]}
    offset = members[victim]["clock_offset_ms"]
    return None if offset is not None and abs(offset / 1000 - skew) < 1 else f"{observer.node_id} measures {offset} ms"


def stall(node: NodeProcess, *, coordinator: NodeProcess) -> None:
    """SIGSTOP `node`, and have `coordinator` mark it down with one write to
    a key of its own, so that the writes that follow reach it only as hints
    (that write itself sits in the stalled node's socket until it resumes)."""
    node.pause()
    time.sleep(STALL_S)
    marker = record_writes(coordinator.url, [(f"stall-marker-{node.node_id}", b"x")], consistency="one")[0]
    assert marker.outcome == "ok", marker.error


def values(tag: str, keys: Iterable[str]) -> list[tuple[str, bytes]]:
    return [(key, f"{tag}:{key}".encode()) for key in keys]


def acked(ops: list[Op], what: str) -> None:
    ok = sum(op.outcome == "ok" for op in ops)
    errors = [op.error for op in ops if op.outcome != "ok"][:3]
    assert ok >= MIN_ACKED * len(ops), f"{what}: only {ok} of {len(ops)} acknowledged, e.g. {errors}"


def judge(cluster: Cluster, ops: list[Op], *, expiry_slack_s: float = 0.0) -> None:
    """Read every key through every node at quorum and at all, just after the
    writes and again later: nothing acknowledged may be missing."""
    last = max(op.finished or op.sent for op in ops)
    urls = cluster.running_urls()
    for delay in CHECK_AFTER_S:
        time.sleep(max(0.0, last + delay - time.monotonic()))
        for consistency in ("quorum", "all"):
            verdict = check(ops, observe(urls, KEYS, consistency=consistency), expiry_slack_s=expiry_slack_s)
            print(f"{delay}s later, at {consistency}: {verdict.summary()}")
            assert verdict.lost == 0, verdict.summary()


@SKEWS
def test_quiet_overwrites_through_another_node(make_cluster: MakeCluster, skew: float) -> None:
    cluster = skewed_cluster(make_cluster, skew)
    half = len(KEYS) // 2
    v1 = record_writes(cluster[0].url, values("v1", KEYS[:half]), consistency="one")
    v1 += record_writes(cluster[0].url, values("v1", KEYS[half:]), consistency="quorum")
    acked(v1, "v1")
    v2 = record_writes(cluster[2].url, values("v2", KEYS), client=1)
    acked(v2, "v2")
    judge(cluster, v1 + v2)


@SKEWS
def test_v1_delivered_as_a_hint_to_the_next_coordinator(make_cluster: MakeCluster, skew: float) -> None:
    cluster = skewed_cluster(make_cluster, skew)
    try:
        stall(cluster[2], coordinator=cluster[0])
        v1 = record_writes(cluster[0].url, values("v1", KEYS))  # node3's copy is held by node1 as a hint
        acked(v1, "v1")
        # node1 stalls with the hints before it can deliver them; node3 is
        # back, and coordinates v2 without having seen v1's versions (no
        # marker write this time: it would carry a version above v1 to node3).
        cluster[0].pause()
        cluster[2].resume()
        v2 = record_writes(cluster[2].url, values("v2", KEYS), client=1)
        acked(v2, "v2")
    finally:
        cluster[0].resume()
        cluster[2].resume()
    wait_for(lambda: _hints_left(cluster[0].url), timeout=15, what="node1 delivers its hints to node3")
    judge(cluster, v1 + v2)


def _hints_left(url: str) -> str | None:
    pending = admin_get(url, "/admin/rebalance", token=TOKEN)["hints_pending"]
    return f"{pending} hints pending" if pending else None


@SKEWS
def test_coordinator_restarted_between_the_writes(make_cluster: MakeCluster, skew: float) -> None:
    cluster = skewed_cluster(make_cluster, skew)
    v1 = record_writes(cluster[0].url, values("v1", KEYS), consistency="all")
    acked(v1, "v1")
    cluster[2].kill()
    cluster[2].start().wait_ready()
    v2 = record_writes(cluster[2].url, values("v2", KEYS), client=1)
    acked(v2, "v2")
    judge(cluster, v1 + v2)


@SKEWS
def test_node_restarted_while_clients_keep_writing(
    make_cluster: MakeCluster, start_load: StartLoad, skew: float
) -> None:
    cluster = skewed_cluster(make_cluster, skew, args=FAST_REPAIR)
    load = start_load(urls=list(cluster.direct_peers.values()), keys=KEYS, clients=6, name="skew", read_ratio=0.1)
    load.run_for(2.0, min_ops=300)
    cluster[2].kill()
    load.run_for(1.0, min_ops=100)
    cluster[2].start().wait_ready()
    load.run_for(2.0, min_ops=300)
    ops = load.stop()
    ring = HashRing(list(cluster.direct_peers))
    wait_converged(cluster.direct_peers, KEYS, owners=lambda key: ring.owners(key.encode(), N), token=TOKEN, timeout=30)
    judge(cluster, ops)


@SKEWS
def test_ttl_expires_while_one_replica_holds_an_older_value(make_cluster: MakeCluster, skew: float) -> None:
    cluster = skewed_cluster(make_cluster, skew, args=FAST_REPAIR)
    v1 = record_writes(cluster[0].url, values("v1", KEYS), consistency="all")
    acked(v1, "v1")
    try:
        stall(cluster[2], coordinator=cluster[1])
        v2 = record_writes(cluster[1].url, values("v2", KEYS), client=1, ttl_s=TTL_S)
        time.sleep(TTL_S + 0.5)  # v2 is dead before node3 hears of it: its hint arrives expired
    finally:
        cluster[2].resume()
    acked(v2, "v2")
    ring = HashRing(list(cluster.direct_peers))
    wait_converged(cluster.direct_peers, KEYS, owners=lambda key: ring.owners(key.encode(), N), token=TOKEN, timeout=30)
    # A read through the skewed node judges expiry by its own clock, up to the
    # skew late; v1, which v2 superseded, is never allowed back.
    judge(cluster, v1 + v2, expiry_slack_s=SKEW_S + 2)


# -- the guard: a node whose clock is off stops coordinating ------------------------

GUARD_SKEW_S = 5.5  # 5 s beyond the default --max-clock-offset of 0.5 s


def test_a_node_beyond_max_clock_offset_refuses_writes_and_recovers_once_its_clock_is_fixed(
    make_cluster: MakeCluster,
    start_load: StartLoad,
) -> None:
    cluster = make_cluster(
        3,
        args=[*NODE_ARGS, *FAST_REPAIR],
        durable=True,
        env_for={"node3": skewed_clock(GUARD_SKEW_S)},
        unready=["node3"],
    )
    healthy = {node_id: url for node_id, url in cluster.direct_peers.items() if node_id != "node3"}
    load = start_load(urls=list(healthy.values()), keys=KEYS, clients=4, name="guard")

    def node3_unready() -> str | None:
        resp = httpx.get(cluster[2].url + "/ready", timeout=2)
        return (
            None if resp.status_code == 503 and "max-clock-offset" in resp.text else f"{resp.status_code} {resp.text}"
        )

    wait_for(node3_unready, timeout=10, what="node3 reports its clock offset as not ready")
    refused = httpx.put(cluster[2].url + "/kv/guarded", content=b"v", timeout=5)
    assert refused.status_code == 503 and "max-clock-offset" in refused.json()["error"], refused.text
    for url in healthy.values():
        assert httpx.get(url + "/ready", timeout=2).status_code == 200
    members = {m["node_id"]: m for m in admin_get(cluster[0].url, "/ring", token=TOKEN)["members"]}
    assert abs(members["node3"]["clock_offset_ms"] / 1000 - GUARD_SKEW_S) < 0.5, members["node3"]
    metrics = httpx.get(cluster[0].url + "/metrics", timeout=2).text
    assert 'kvstore_clock_offset_seconds{peer="node3"} 5.' in metrics
    load.run_for(1.0, min_ops=100)

    cluster[2].stop()
    cluster[2].env = {}  # its time sync is fixed
    cluster[2].start().wait_ready()
    assert httpx.put(cluster[2].url + "/kv/guarded", content=b"v", timeout=5).status_code == 204
    load.urls = list(cluster.direct_peers.values())
    load.run_for(1.0, min_ops=100)
    ops = load.stop()
    ring = HashRing(list(cluster.direct_peers))
    wait_converged(cluster.direct_peers, KEYS, owners=lambda key: ring.owners(key.encode(), N), token=TOKEN, timeout=30)
    verdict = check(ops, observe(cluster.direct_peers, KEYS, consistency="all"))
    print(verdict.summary())
    assert verdict.acknowledged >= 200 and verdict.lost == 0, verdict.summary()
