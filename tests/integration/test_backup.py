"""Backup and restore against real node processes, through the real CLI:
`kvstore backup` of a cluster under write load, `kvstore restore` into a
cluster of another size, newer versions surviving a restore, a second
restore changing nothing, corrupted files refused, and the token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from app.storage.backup_format import MAGIC
from tests.harness.processes import Cluster
from tests.integration.history import Load, Op, check, observe, record_writes

CLI_TIMEOUT_S = 120.0
EXPIRES_HEADER = "x-kvstore-expires"
VERSION_HEADER = "x-kvstore-version"


def kvstore(*args: str, token: str | None = None, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "KVSTORE_CLUSTER_TOKEN"}
    if token is not None:
        env["KVSTORE_CLUSTER_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        capture_output=True,
        timeout=CLI_TIMEOUT_S,
        env=env,
        input=stdin,
        check=False,
    )


def backup(url: str, path: Path, *extra: str) -> dict[str, Any]:
    done = kvstore("backup", "--url", url, "-o", str(path), *extra)
    assert done.returncode == 0, done.stderr.decode()
    summary: dict[str, Any] = json.loads(done.stdout)
    return summary


def restore(url: str, path: Path) -> tuple[int, dict[str, Any], str]:
    done = kvstore("restore", "--url", url, str(path))
    summary = json.loads(done.stdout)
    return done.returncode, summary, done.stderr.decode()


def stored(url: str, key: str) -> httpx.Response:
    """The node's own copy of key (the replica route: version and expiry headers)."""
    return httpx.get(f"{url}/internal/v1/kv/{quote(key, safe='')}", timeout=5)


def copies(cluster: Cluster, key: str) -> list[tuple[str, str]]:
    """(version, expiry) of every copy of key held by the cluster's nodes."""
    found = []
    for node in cluster.nodes:
        resp = stored(node.url, key)
        if resp.status_code == 200:
            found.append((resp.headers[VERSION_HEADER], resp.headers.get(EXPIRES_HEADER, "0")))
    return found


def as_of(ops: list[Op], started: float) -> list[Op]:
    """The history as a backup that started at `started` must reflect it:
    writes acknowledged before then stay acknowledged; writes still in flight
    or sent later may or may not be in the backup (unknown). Reads dropped."""
    judged = []
    for op in ops:
        if not op.is_write:
            continue
        if op.outcome == "ok" and op.acked is not None and op.acked < started:
            judged.append(op)
        elif op.outcome != "failed":
            judged.append(replace(op, acked=None, outcome="unknown"))
    return judged


def test_backup_under_load_restores_into_a_five_node_cluster(
    make_cluster: Callable[..., Cluster], start_load: Callable[..., Load], tmp_path: Path
) -> None:
    source = make_cluster(3)
    url = source[0].url
    keys = [f"k{i}" for i in range(300)]
    ops = record_writes(url, ((key, f"v1-{key}".encode()) for key in keys))
    ops += record_writes(url, ((key, None) for key in keys[:40]))  # tombstones
    ttl_keys = [f"ttl{i}" for i in range(20)]
    ops += record_writes(url, ((key, f"t-{key}".encode()) for key in ttl_keys), ttl_s=3600)
    originals = {key: copies(source, key) for key in ttl_keys + keys[:5]}
    load = start_load(urls=list(source.direct_peers.values()), keys=keys[100:200], clients=4, name="during")
    load.run_for(0.5, min_ops=20)
    started = time.monotonic()
    summary = backup(source[1].url, tmp_path / "cluster.kvbak")
    load.run_for(0.2)
    ops += load.stop()
    assert summary["ok"] is True and summary["records"] == 320, summary  # 300 keys (40 tombstones) + 20 TTLs
    assert (tmp_path / "cluster.kvbak").read_bytes().startswith(MAGIC)

    target = make_cluster(5)
    code, restored, stderr = restore(target[2].url, tmp_path / "cluster.kvbak")
    assert code == 0, stderr
    assert restored["records"] == 320 and restored["applied"] == 320, restored

    verdict = check(as_of(ops, started), observe(target.direct_peers, keys + ttl_keys))
    assert verdict.lost == 0, verdict.summary()
    assert verdict.acknowledged > 300
    for key in keys[:40]:
        assert httpx.get(f"{target[0].url}/kv/{key}", timeout=5).status_code == 404
    for key in ttl_keys + keys[:5]:
        # Same version and same absolute expiry on each of the N copies in the new ring.
        assert set(copies(target, key)) == set(originals[key]), key
        assert len(copies(target, key)) == 3
    assert all(int(expiry) > 0 for key in ttl_keys for _, expiry in originals[key])


def test_restore_keeps_newer_versions_and_a_second_restore_changes_nothing(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    source, target = make_cluster(3), make_cluster(4)
    keys = [f"k{i}" for i in range(100)]
    record_writes(source[0].url, ((key, b"old") for key in keys))
    backup(source[0].url, tmp_path / "b.kvbak", "--compression", "none")
    # Written after the backup, so with later versions: these must survive.
    record_writes(target[0].url, ((key, b"newer") for key in keys[:20]))
    record_writes(target[0].url, ((key, None) for key in keys[20:30]))

    code, first, stderr = restore(target[1].url, tmp_path / "b.kvbak")
    assert code == 0, stderr
    assert first["records"] == 100 and first["applied"] == 70 and first["unchanged"] == 30, first
    code, second, stderr = restore(target[3].url, tmp_path / "b.kvbak")
    assert code == 0, stderr
    assert second["applied"] == 0 and second["replica_writes_applied"] == 0 and second["unchanged"] == 100, second

    for node in target.nodes:
        for i, key in enumerate(keys):
            resp = httpx.get(f"{node.url}/kv/{key}", timeout=5)
            if i < 20:
                assert resp.content == b"newer", key
            elif i < 30:
                assert resp.status_code == 404, key
            else:
                assert resp.content == b"old", key


def test_corrupted_files_stop_the_restore_and_name_the_chunk(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    source = make_cluster(3)
    # ~3 MB of incompressible values: several 1 MiB chunks.
    record_writes(source[0].url, ((f"big{i}", os.urandom(10_000)) for i in range(300)))
    good = tmp_path / "good.kvbak"
    summary = backup(source[0].url, good)
    assert isinstance(summary["chunks"], int) and summary["chunks"] >= 3, summary
    data = good.read_bytes()
    target = make_cluster(3)

    flipped = bytearray(data)
    flipped[len(data) - 1000] ^= 0x01  # inside the last chunk's payload
    (tmp_path / "flipped.kvbak").write_bytes(bytes(flipped))
    code, result, stderr = restore(target[0].url, tmp_path / "flipped.kvbak")
    last = summary["chunks"]
    assert code == 1
    assert f"chunk {last} is corrupt: checksum mismatch" in stderr, stderr
    assert result["ok"] is False and result["chunks"] == last - 1 and result["records"] > 0, result
    assert f"{last - 1} chunks" in stderr

    (tmp_path / "truncated.kvbak").write_bytes(data[: len(data) // 2])
    code, result, stderr = restore(target[0].url, tmp_path / "truncated.kvbak")
    assert code == 1 and "truncated in chunk" in stderr, stderr
    assert result["ok"] is False and "truncated in chunk" in str(result["error"])

    header_end = len(MAGIC) + 4 + int.from_bytes(data[len(MAGIC) : len(MAGIC) + 4], "big")
    edited = data[:header_end].replace(b'"format": 1', b'"format": 2')
    assert edited != data[:header_end]
    (tmp_path / "future.kvbak").write_bytes(edited + data[header_end:])
    code, result, stderr = restore(target[0].url, tmp_path / "future.kvbak")
    assert code == 1 and "format version 2 is not supported" in stderr, stderr
    assert result["records"] == 0

    # Nothing corrupt was written: the good file still restores in full.
    code, result, stderr = restore(target[0].url, good)
    assert code == 0 and result["records"] == 300, stderr


def test_backup_to_stdout_and_restore_from_stdin(make_cluster: Callable[..., Cluster]) -> None:
    source, target = make_cluster(3), make_cluster(2, args=["--replication-factor", "2"])
    record_writes(source[0].url, ((f"s{i}", f"v{i}".encode()) for i in range(50)))
    out = kvstore("backup", "--url", source[0].url, "-")
    assert out.returncode == 0, out.stderr.decode()
    assert json.loads(out.stderr.decode().strip().splitlines()[-1])["records"] == 50
    done = kvstore("restore", "--url", target[0].url, "-", stdin=out.stdout)
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout)["applied"] == 50
    assert httpx.get(f"{target[1].url}/kv/s7", timeout=5).content == b"v7"


def test_the_backup_routes_need_the_cluster_token(make_cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    cluster = make_cluster(3, args=["--cluster-token", "s3cret"])
    url = cluster[0].url
    for method, path in (("GET", "/admin/backup"), ("POST", "/admin/restore")):
        missing = httpx.request(method, url + path, timeout=5)
        assert missing.status_code == 401 and "token" in missing.json()["error"]
        wrong = httpx.request(method, url + path, headers={"x-kvstore-token": "nope"}, timeout=5)
        assert wrong.status_code == 403 and "token" in wrong.json()["error"]
    denied = kvstore("backup", "--url", url, "-o", str(tmp_path / "x.kvbak"))
    assert denied.returncode == 1 and b"401" in denied.stderr
    assert not (tmp_path / "x.kvbak").exists() and not (tmp_path / "x.kvbak.partial").exists()
    allowed = kvstore("backup", "--url", url, "-o", str(tmp_path / "x.kvbak"), token="s3cret")
    assert allowed.returncode == 0, allowed.stderr.decode()
    bad = httpx.post(url + "/admin/restore", content=b"not a chunk", headers={"x-kvstore-token": "s3cret"}, timeout=5)
    assert bad.status_code == 400 and "not a backup chunk frame" in bad.json()["error"]
    bogus = httpx.get(url + "/admin/backup?compression=lz4", headers={"x-kvstore-token": "s3cret"}, timeout=5)
    assert bogus.status_code == 400 and "compression" in bogus.json()["error"]


def test_a_backup_with_too_few_replicas_fails_clearly(make_cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    cluster = make_cluster(3)
    record_writes(cluster[0].url, ((f"q{i}", b"v") for i in range(20)))
    cluster[1].kill()
    cluster[2].kill()
    # Whether node1 has noticed yet (a 503 before any byte) or not (the
    # digests fail mid-stream), the backup stops with the reason, exit 1.
    done = kvstore("backup", "--url", cluster[0].url, "-o", str(tmp_path / "q.kvbak"))
    assert done.returncode == 1
    assert b"1 of 3 replicas" in done.stderr or b"N - W + 1" in done.stderr, done.stderr
    assert not (tmp_path / "q.kvbak").exists()
