"""A node whose store is full (a tiny --map-size; for RocksDB, a tiny volume): writes get a clear 507 with
a JSON body, nothing acknowledged is lost (read back at once and after a
restart), reads keep being served, and in a cluster its peers see a refusal
(it stays reachable, writes reach quorum on the others), not an outage.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from tests.harness.processes import Cluster

TINY_MAP = "1Mi"  # 256 pages: full after a few dozen 16 KiB values
VALUE_BYTES = 16 * 1024
MAX_WRITES = 400  # a bound: 1 MiB holds far fewer 16 KiB values than this


def value(i: int) -> bytes:
    return (f"{i:06d}".encode() * (VALUE_BYTES // 6 + 1))[:VALUE_BYTES]


def fill_until_refused(client: httpx.Client, url: str) -> tuple[dict[str, bytes], httpx.Response | None]:
    """PUT distinct values until the node answers 507 (at most MAX_WRITES):
    what it acknowledged, and the refusal (None if every write fit)."""
    acked: dict[str, bytes] = {}
    for i in range(MAX_WRITES):
        response = client.put(f"{url}/kv/k{i}", content=value(i))
        if response.status_code == 507:
            return acked, response
        assert response.status_code == 204, response.text
        acked[f"k{i}"] = value(i)
    return acked, None


def assert_holds(client: httpx.Client, url: str, acked: dict[str, bytes], *, after: str = "") -> None:
    """Every acknowledged write reads back from the node."""
    for key, expected in acked.items():
        assert client.get(f"{url}/kv/{key}").content == expected, f"{key} lost{after}"


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported by {url}")


def test_a_full_node_answers_507_and_keeps_every_acknowledged_write(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(size=1, durable=True, args=["--map-size", TINY_MAP])
    node = cluster[0]
    with httpx.Client(timeout=5) as client:
        acked, refused = fill_until_refused(client, node.url)
        assert refused is not None, f"{MAX_WRITES} writes fit in a {TINY_MAP} map"
        assert refused.headers["content-type"].startswith("application/json")
        assert "full" in refused.json()["error"] and "--map-size" in refused.json()["error"]
        seed = client.put(f"{node.url}/put", json={"key": "seed", "value": "x" * VALUE_BYTES})
        assert seed.status_code == 507 and "error" in seed.json()
        assert len(acked) > 10
        assert _metric(node.url, "kvstore_storage_used_bytes") / _metric(node.url, "kvstore_storage_limit_bytes") > 0.9
        assert _metric(node.url, "kvstore_storage_limit_bytes") == 1 << 20
        assert client.get(f"{node.url}/ready").status_code == 200, "a full node still serves reads"
        assert_holds(client, node.url, acked)

    node.stop()
    node.start().wait_ready()
    with httpx.Client(timeout=5) as client:
        assert_holds(client, node.url, acked, after=" across the restart")


def test_peers_see_a_full_replica_refuse_not_vanish(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(durable=True, env_for={"node3": {"KVSTORE_MAP_SIZE": TINY_MAP}})
    node1, node2, node3 = cluster.nodes
    acked: dict[str, bytes] = {}
    full = False
    with httpx.Client(timeout=5) as client:
        for i in range(MAX_WRITES):
            response = client.put(f"{node1.url}/kv/k{i}", content=value(i))
            assert response.status_code == 204, (
                f"write {i} through a healthy node: {response.status_code} {response.text}"
            )
            acked[f"k{i}"] = value(i)
            if i % 5 == 4:
                probe = client.put(f"{node3.url}/kv/probe{i}", content=value(i))
                if probe.status_code == 507:
                    full = True
                    break
                assert probe.status_code == 204, probe.text
                acked[f"probe{i}"] = value(i)
        assert full, f"node3 never filled its {TINY_MAP} map"
        for _ in range(5):  # more writes that node3 must refuse: each still reaches quorum on node1 and node2
            i += 1
            assert client.put(f"{node2.url}/kv/k{i}", content=value(i)).status_code == 204
            acked[f"k{i}"] = value(i)
        for url in (node1.url, node2.url):
            ring = client.get(f"{url}/ring").json()
            members = {m["node_id"]: m for m in ring["members"]}
            assert members["node3"]["reachable"] is True, f"{url} counts a full node as down: {members['node3']}"
        for url in (node1.url, node2.url, node3.url):
            for key, expected in acked.items():
                assert client.get(f"{url}/kv/{key}").content == expected, f"{key} through {url}"


TINY_VOLUME = "4m"  # a tmpfs this size: RocksDB's files and a few hundred 16 KiB values
GROWN_VOLUME = "16m"


@contextlib.contextmanager
def tiny_volume(path: Path) -> Iterator[Path]:
    """A volume of TINY_VOLUME (a tmpfs: needs root, as on our machines and CI), unmounted after."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TINY_VOLUME}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_volume_refuses_rocksdb_writes_with_507_and_keeps_every_acknowledged_one(tmp_path: Path) -> None:
    """RocksDB has no map: it fills its volume. The write that meets ENOSPC is
    refused (507, JSON), reads go on; the fix is a bigger volume and a restart."""
    with tiny_volume(tmp_path / "volume") as volume:
        cluster = Cluster(size=1, log_dir=tmp_path, data_root=volume, args=["--storage", "rocksdb"])
        try:
            node = cluster.start()[0]
            with httpx.Client(timeout=5) as client:
                acked, refused = fill_until_refused(client, node.url)
                assert refused is not None, f"{MAX_WRITES} writes fit in a {TINY_VOLUME} volume"
                assert "full" in refused.json()["error"] and "grow the volume" in refused.json()["error"]
                assert len(acked) > 10
                used = _metric(node.url, "kvstore_storage_used_bytes")
                assert used / _metric(node.url, "kvstore_storage_limit_bytes") > 0.9
                assert client.get(f"{node.url}/ready").status_code == 200, "a full node still serves reads"
                assert_holds(client, node.url, acked)
            node.stop()
            subprocess.run(["mount", "-o", f"remount,size={GROWN_VOLUME}", str(volume)], check=True)
            node.start().wait_ready()
            with httpx.Client(timeout=5) as client:
                assert_holds(client, node.url, acked, after=" across the restart")
                assert client.put(f"{node.url}/kv/after", content=b"v").status_code == 204
        finally:
            cluster.stop()
