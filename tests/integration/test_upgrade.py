"""A rolling upgrade and a rollback under load, across a real version boundary:
the previous release (RELEASES, built from this repository's history by
tests/harness/releases.py) and this code, in one cluster.

Three nodes of release X-1 with data directories; each replaced in turn by
this release (SIGTERM, same flags, same data directory) while clients write
and read at quorum; in the mixed state, an old node SIGKILLed (its hints are
delivered by a new node), a record only anti-entropy can spread (new to old),
a new node joining through an old one, and a backup through a new node of
data the old ones hold; then one node rolled back to X-1 and upgraded again.
The history checker judges it: nothing acknowledged lost, no 5xx, no stale
quorum read. Every wait is bounded; the test takes 70 to 130 s on a loaded
2-core machine once the release is built (the first run on a machine builds
it: 1 to 2.5 min more), and prints how long each phase took.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import lmdb
import pytest

from app import __version__
from app.clock import LOGICAL_BITS, Version
from app.ring import HashRing
from app.storage import LmdbStore
from app.storage.backup_format import BackupReader
from app.transport.protocol import PROTOCOL
from tests.harness.processes import Cluster, NodeProcess
from tests.harness.releases import Release, build_previous_release
from tests.integration.history import Load, check, observe, record_writes, stale_reads
from tests.integration.probes import (
    admin_get,
    change_membership,
    membership_disagreement,
    rebalancing_left,
    unreachable_peers,
    wait_converged,
    wait_for,
)

N = 3
TOKEN = "upgrade-test-token"
# Flags both releases take, unchanged across every restart.
NODE_ARGS = [
    "--replication-factor",
    str(N),
    "--peer-timeout",
    "0.5",
    "--anti-entropy-interval",
    "1",
    "--cluster-token",
    TOKEN,
]
KEYS = [f"key-{i:03d}" for i in range(150)]
CLIENTS = 4
BACKUP_KEYS = [f"backup-{i:02d}" for i in range(30)]
REJOIN_WITHIN_S = 15.0  # a restarted node is seen reachable by every other node
SPREAD_WITHIN_S = 15.0  # anti-entropy (every second) carries a record to every replica; hints are delivered
REBALANCE_WITHIN_S = 30.0
SETTLE_WITHIN_S = 30.0
MIN_ACKNOWLEDGED = 300  # a history too thin to prove anything fails the test instead

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def previous() -> Release:
    return build_previous_release()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Three nodes (not started); every node of it, added ones too, stopped at teardown."""
    # LMDB on every node: the previous release cannot open a RocksDB data dir (nor knows --storage rocksdb).
    built = Cluster(size=3, log_dir=tmp_path, args=NODE_ARGS, data_root=tmp_path / "data", engines=("lmdb",))
    try:
        yield built
    finally:
        built.stop()


def run_as(node: NodeProcess, release: Release | None) -> None:
    """The release the node runs at its next start (None: this code)."""
    node.python = str(release.python) if release else sys.executable
    node.cwd = release.tree if release else None


def replace(cluster: Cluster, node_id: str, release: Release | None) -> None:
    """SIGTERM the node, start the other release on the same flags and data
    dir, and wait until every node sees every node again."""
    node = cluster.node(node_id)
    node.stop()
    run_as(node, release)
    node.start().wait_ready()
    wait_for(
        lambda: unreachable_peers(cluster.running_urls(), expect=cluster.direct_peers, token=TOKEN),
        timeout=REJOIN_WITHIN_S,
        what=f"every node sees every node after {node_id} restarted",
    )


def ring(url: str) -> dict[str, Any]:  # the /ring JSON
    return admin_get(url, "/ring", token=TOKEN)


def versions_seen(url: str) -> dict[str, str | None]:
    """{member: the version this (current) node has heard it runs}."""
    return {m["node_id"]: m["version"] for m in ring(url)["members"]}


def expect_view(url: str, *, versions: dict[str, str], cluster_protocol: int) -> Callable[[], str | None]:
    def check_view() -> str | None:
        view = ring(url)
        seen = versions_seen(url)
        shown = view["cluster"]["protocol"]
        if seen != versions or shown != cluster_protocol:
            return f"versions {seen}, cluster protocol {shown}; want {versions}, {cluster_protocol}"
        return None

    return check_view


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} not in {url}/metrics"
    return float(found.group(1))


def replica_version(url: str, key: str) -> str | None:
    resp = httpx.get(f"{url}/internal/v1/kv/{quote(key, safe='')}", headers={"x-kvstore-token": TOKEN}, timeout=5)
    return resp.headers.get("x-kvstore-version") if resp.status_code == 200 else None


def test_rolling_upgrade_and_rollback_under_load(
    previous: Release, cluster: Cluster, start_load: Callable[..., Load]
) -> None:
    old, new = previous.version, __version__
    started = time.monotonic()
    marks: list[tuple[str, float]] = []

    def mark(phase: str) -> None:
        marks.append((phase, time.monotonic()))

    for node in cluster.nodes:
        run_as(node, previous)
    cluster.start()
    assert "version" not in ring(cluster.node("node1").url), f"node1 does not run {old}"
    urls = cluster.direct_peers
    load = start_load(urls=list(urls.values()), keys=KEYS, clients=CLIENTS, name="upgrade")
    load.run_for(1.5, min_ops=150)
    mark(f"three {old} nodes up")

    # -- node1 upgraded: a mixed cluster, running the old protocol -------------------
    replace(cluster, "node1", None)
    node1 = urls["node1"]
    wait_for(
        expect_view(node1, versions={"node1": new, "node2": old, "node3": old}, cluster_protocol=1),
        timeout=REJOIN_WITHIN_S,
        what="node1 hears the old nodes as the old release",
    )
    load.run_for(1.0, min_ops=100)
    mark("node1 upgraded")

    # Anti-entropy across the boundary: a record only node1 (new) holds reaches node2 and node3 (old).
    key = "anti-entropy-probe"
    stamp = Version((int(time.time() * 1000) << LOGICAL_BITS), "node1").encode()
    put = httpx.put(
        f"{node1}/internal/v1/kv/{key}",
        content=b"only-on-node1",
        headers={"x-kvstore-token": TOKEN, "x-kvstore-version": stamp},
        timeout=5,
    )
    assert put.status_code == 200, put.text
    wait_for(
        lambda: (
            None
            if all(replica_version(urls[n], key) == stamp for n in ("node2", "node3"))
            else {n: replica_version(urls[n], key) for n in ("node2", "node3")}.__repr__()
        ),
        timeout=SPREAD_WITHIN_S,
        what="anti-entropy carries node1's record to the old nodes",
    )
    mark("anti-entropy new to old")

    # A crash in the mixed state: old node3 SIGKILLed under load; node1 (new) keeps
    # hints for it and delivers them to it once it is back (new to old).
    delivered_before = metric(node1, "kvstore_hints_delivered_total")
    victim = cluster.node("node3")
    victim.kill()
    load.run_for(2.0, min_ops=150)
    assert metric(node1, "kvstore_hints_pending") > 0, "node1 held no hints for the crashed node"
    victim.start().wait_ready()
    wait_for(
        lambda: None if metric(node1, "kvstore_hints_pending") == 0 else "node1 still holds hints",
        timeout=SPREAD_WITHIN_S,
        what="node1 delivers its hints to the restarted old node3",
    )
    assert metric(node1, "kvstore_hints_delivered_total") > delivered_before
    mark("crash, hints new to old")

    # A join through an old node: node4 (new) admitted by node2 (old), which tells everyone;
    # node4 pulls its arcs from old and new replicas alike.
    newcomer = cluster.add_node()
    newcomer.start().wait_serving()
    urls = cluster.direct_peers
    change_membership(urls["node2"], urls, token=TOKEN)
    newcomer.wait_ready()
    load.urls = list(urls.values())
    wait_for(
        lambda: membership_disagreement(urls, members=urls, token=TOKEN), timeout=REJOIN_WITHIN_S, what="4 members"
    )
    wait_for(lambda: rebalancing_left(urls, token=TOKEN), timeout=REBALANCE_WITHIN_S, what="rebalancing done")
    for node in cluster.nodes:  # as an operator would: later restarts name the four members in --peers
        node.peers = dict(urls)
    mark("join through an old node")

    # A backup through a new node of what old nodes hold.
    backup_ops = record_writes(urls["node2"], ((k, f"kept-{k}".encode()) for k in BACKUP_KEYS))
    assert all(op.outcome == "ok" for op in backup_ops), [op.error for op in backup_ops if op.outcome != "ok"][:3]
    answer = httpx.get(f"{node1}/admin/backup", headers={"x-kvstore-token": TOKEN}, timeout=60)
    assert answer.status_code == 200, answer.text[:300]
    in_backup = {k: r.value for chunk in BackupReader(io.BytesIO(answer.content)) for k, r in chunk.decode()}
    assert {k: in_backup.get(k.encode()) for k in BACKUP_KEYS} == {k: f"kept-{k}".encode() for k in BACKUP_KEYS}
    mark("backup through a new node")

    # -- the rest upgraded; one rolled back; upgraded again ---------------------------
    for node_id in ("node2", "node3"):
        replace(cluster, node_id, None)
        load.run_for(1.0, min_ops=100)
    everyone_new = {node_id: new for node_id in urls}
    wait_for(
        expect_view(node1, versions=everyone_new, cluster_protocol=PROTOCOL), timeout=REJOIN_WITHIN_S, what="all new"
    )
    mark("node2, node3 upgraded")

    replace(cluster, "node2", previous)  # rollback: the old release opens the store the new one wrote
    wait_for(
        expect_view(node1, versions=everyone_new | {"node2": old}, cluster_protocol=1),
        timeout=REJOIN_WITHIN_S,
        what="node1 sees node2 back on the old release, and the cluster back in the old protocol",
    )
    load.run_for(1.5, min_ops=150)
    mark("node2 rolled back")

    replace(cluster, "node2", None)
    for url in urls.values():
        wait_for(
            expect_view(url, versions=everyone_new, cluster_protocol=PROTOCOL),
            timeout=REJOIN_WITHIN_S,
            what=f"{url} sees every node on {new}",
        )
    load.run_for(1.0, min_ops=100)
    ops = load.stop()
    mark("node2 upgraded again")

    # -- the verdict ------------------------------------------------------------------
    server_errors = [op.error for op in ops if "HTTP 5" in op.error]
    assert not server_errors, f"{len(server_errors)} 5xx answers, e.g. {server_errors[:5]}"
    stale = stale_reads(ops)
    assert not stale, f"{len(stale)} stale quorum reads, e.g. {stale[:3]}"
    owners = HashRing(list(urls))
    wait_converged(urls, KEYS, owners=lambda k: owners.owners(k.encode(), N), token=TOKEN, timeout=SETTLE_WITHIN_S)
    verdict = check(ops, observe(urls, KEYS))
    mark("converged and judged")
    steps, last = [], started
    for phase, at in marks:
        steps.append(f"{phase} {at - last:.1f}s")
        last = at
    print(f"{verdict.summary()}\nphases: {'; '.join(steps)}; whole test {time.monotonic() - started:.1f}s")
    assert verdict.acknowledged >= MIN_ACKNOWLEDGED, verdict.summary()
    assert verdict.lost == 0, verdict.summary()


def test_a_node_refuses_a_store_of_a_newer_format_at_start(tmp_path: Path) -> None:
    """The release before a format change meets a store its successor migrated:
    it exits at start with one clear line, and the store is left as it was."""
    data = tmp_path / "node1"
    store = LmdbStore(path=str(data), node_id="node1", fsync="never", fsync_window_ms=5, tombstone_grace_s=60)
    store.close()
    env = lmdb.open(str(data), max_dbs=4)
    with env.begin(write=True, db=env.open_db(b"meta")) as txn:
        txn.put(b"format", b"2")
        txn.put(b"release", b"0.9.0")
    env.close()
    before = (data / "data.mdb").read_bytes()
    done = subprocess.run(
        [sys.executable, "-m", "app", "node", "--node-id", "node1", "--listen", "127.0.0.1:9", "--data-dir", str(data)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    stderr = done.stderr.decode()
    assert done.returncode == 1, stderr
    assert "on-disk format 2, written by kvstore 0.9.0" in stderr and "nothing in it was changed" in stderr, stderr
    assert (data / "data.mdb").read_bytes() == before
