"""The client library (client/, kvstore_client) against real nodes: five
nodes, N=3, the client given one seed URL. It finds the others; its reads at
`one` go straight to a replica (no node-to-node read at all); it survives a
SIGKILL under a quorum writer-reader loop with no failed operation and
nothing lost by the history checker; it follows a membership change (a node
added, one removed) without a restart; the async client carries 500
concurrent operations; the nodes' refusals (401, 403 under --auth-file, 413)
arrive as typed errors; and `pip install ./client` works on its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from kvstore_client import AsyncClient, BadRequest, Client, Forbidden, KvstoreError, Unauthorized
from tests.harness.processes import Cluster
from tests.integration.history import Op, check, observe
from tests.integration.probes import change_membership, membership_disagreement, wait_for

N = 3
NODE_ARGS = ["--replication-factor", str(N), "--peer-timeout", "0.5", "--max-value-bytes", "65536"]
KEYS = [f"client-{i:03d}" for i in range(60)]
LOOP_CLIENTS = 4  # threads sharing one Client in the writer-reader loop
MIN_ACKNOWLEDGED = 150  # a history too thin to prove anything fails the test instead

REPO = Path(__file__).resolve().parents[2]

MakeCluster = Callable[..., Cluster]


TOKENS = {"app": "client-test-app-token", "reader": "client-test-reader-token"}  # users of the shared cluster
AUTH = {
    "users": {
        "app": {"token_sha256": hashlib.sha256(TOKENS["app"].encode()).hexdigest(), "roles": ["all"]},
        "reader": {"token_sha256": hashlib.sha256(TOKENS["reader"].encode()).hexdigest(), "roles": ["app-read"]},
    },
    "roles": {
        "all": [{"prefix": "", "permissions": ["read", "write"]}],
        "app-read": [{"prefix": "app/", "permissions": ["read"]}],
    },
}


@pytest.fixture(scope="module")
def five(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Five nodes shared by the tests that do not hurt them, with access control on."""
    root = tmp_path_factory.mktemp("client-five")
    auth_file = root / "users.json"
    auth_file.write_text(json.dumps(AUTH))
    args = [*NODE_ARGS, "--auth-file", str(auth_file), "--cluster-token", "client-test-cluster-token"]
    cluster = Cluster(size=5, log_dir=root, args=args)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def internal_reads(cluster: Cluster) -> float:
    """Replica reads the nodes served to each other, summed over the nodes."""
    total = 0.0
    for url in cluster.running_urls().values():
        text = httpx.get(url + "/metrics", timeout=5).text
        match = re.search(r'^kvstore_internal_requests_total\{op="read"\} (\S+)$', text, re.MULTILINE)
        assert match is not None, "kvstore_internal_requests_total{op=read} is missing"
        total += float(match.group(1))
    return total


def test_one_seed_finds_every_node_and_reads_at_one_need_no_node_to_node_read(five: Cluster) -> None:
    with Client([five[0].url], token=TOKENS["app"]) as kv:
        kv.put_many({key: f"v-{key}" for key in KEYS})
        assert kv.router.view is not None
        assert kv.router.view.urls == five.direct_peers and kv.router.view.replication_factor == N
        before = internal_reads(five)
        for key in KEYS:
            assert kv.get(key, consistency="one") == f"v-{key}".encode()
        assert kv.get_many([*KEYS, "absent"], consistency="one") == {key: f"v-{key}".encode() for key in KEYS}
        assert internal_reads(five) == before, "a read at `one` went through a node that is no replica"
        # A quorum read does read from a second replica: the counter can move.
        for key in KEYS[:10]:
            kv.get(key)
        assert internal_reads(five) > before
        assert {m["node_id"] for m in kv.ring()["members"]} == set(five.direct_peers)
        kv.delete(KEYS[0])
        assert kv.get(KEYS[0]) is None


def test_the_nodes_refusals_are_typed_errors(five: Cluster) -> None:
    url = five[0].url
    with Client([url]) as anonymous:
        with pytest.raises(Unauthorized) as missing:
            anonymous.get("app/a")
        assert missing.value.status == 401 and "credentials" in missing.value.message
    with Client([url], token="not-a-token") as stranger, pytest.raises(Unauthorized, match="unknown token"):
        stranger.put("app/a", b"v")
    with Client([url], token=TOKENS["app"]) as app:
        app.put_many({"app/a": b"1", "app/b": b"2", "other": b"3"})
    with Client([url], token=TOKENS["reader"]) as reader:
        assert reader.get_many(["app/a", "app/b"]) == {"app/a": b"1", "app/b": b"2"}
        with pytest.raises(Forbidden) as denied:
            reader.put("app/a", b"mine")
        assert denied.value.status == 403 and "lacks write" in denied.value.message
        with pytest.raises(Forbidden, match="'other'"):  # every key of a batch is checked
            reader.get_many(["app/a", "other"])
        with pytest.raises(Forbidden):
            reader.put_many({"app/c": b"x"})
        assert reader.get("app/a") == b"1"
    with Client([url], token=TOKENS["app"]) as kv:
        with pytest.raises(BadRequest) as too_big:
            kv.put("big", b"x" * 70_000)
        assert too_big.value.status == 413 and "exceeds the limit" in too_big.value.message
        with pytest.raises(BadRequest) as empty:
            kv.get("")
        assert empty.value.status is None, "the client itself refuses an empty key"
        with pytest.raises(BadRequest) as oversized_batch:
            kv.put_many({"ok": b"v", "big": b"x" * 70_000})
        assert oversized_batch.value.status == 413
        assert isinstance(oversized_batch.value, KvstoreError)


def test_async_client_under_500_concurrent_operations(five: Cluster) -> None:
    async def main() -> list[bytes | None]:
        async with AsyncClient(
            [five[1].url], token=TOKENS["app"], timeout=60
        ) as kv:  # the last of 500 queued calls waits for the others

            async def one(i: int) -> bytes | None:
                await kv.put(f"async-{i}", f"value-{i}")
                return await kv.get(f"async-{i}", consistency="one")

            return await asyncio.gather(*(one(i) for i in range(500)))

    started = time.monotonic()
    values = asyncio.run(main())
    assert values == [f"value-{i}".encode() for i in range(500)]
    print(f"500 concurrent put+get through the async client: {time.monotonic() - started:.2f}s")


def writer_reader_loop(kv: Client, stop: threading.Event, ops: list[Op], index: int) -> None:
    """Write a unique value to a random key at quorum, read a random key at quorum; record both."""
    rng = random.Random(index)
    count = 0
    while not stop.is_set():
        key = rng.choice(KEYS)
        count += 1
        value = f"{index}-{count}".encode()
        sent = time.monotonic()
        try:
            kv.put(key, value, consistency="quorum")
            now = time.monotonic()
            ops.append(Op(index, "put", key, value, sent, now, "ok", finished=now))
        except KvstoreError as exc:
            ops.append(Op(index, "put", key, value, sent, None, "unknown", error=str(exc), finished=time.monotonic()))
        key = rng.choice(KEYS)
        sent = time.monotonic()
        try:
            got = kv.get(key, consistency="quorum")
            now = time.monotonic()
            ops.append(Op(index, "get", key, got, sent, now, "ok", finished=now))
        except KvstoreError as exc:
            ops.append(Op(index, "get", key, None, sent, None, "failed", error=str(exc), finished=time.monotonic()))


def test_a_sigkill_under_a_quorum_loop_fails_no_operation_and_loses_nothing(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(5, args=NODE_ARGS)
    ops: list[Op] = []
    stop = threading.Event()
    with Client([cluster[0].url]) as kv:
        threads = [
            threading.Thread(target=writer_reader_loop, args=(kv, stop, ops, i), daemon=True)
            for i in range(LOOP_CLIENTS)
        ]
        for thread in threads:
            thread.start()
        try:
            time.sleep(2.0)
            cluster[2].kill()  # SIGKILL, mid-flight
            time.sleep(3.0)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
    failed = [op for op in ops if op.outcome != "ok"]
    verdict = check(ops, observe(cluster.running_urls(), KEYS))
    print(f"{len(ops)} operations, {len(failed)} failed; {verdict.summary()}")
    assert not failed, [op.error for op in failed[:5]]
    assert verdict.acknowledged >= MIN_ACKNOWLEDGED, verdict.summary()
    assert verdict.lost == 0, verdict.summary()


def test_the_client_follows_a_membership_change_without_a_restart(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(5, args=NODE_ARGS)
    with Client([cluster[0].url]) as kv:
        kv.put_many({key: b"before" for key in KEYS})
        first = kv.router.view
        assert first is not None and set(first.urls) == {f"node{i}" for i in range(1, 6)}

        newcomer = cluster.add_node()  # node6
        newcomer.start().wait_serving()
        peers = {node_id: url for node_id, url in cluster.direct_peers.items() if node_id != "node5"}
        change_membership(cluster[0].url, peers)
        newcomer.wait_ready()
        wait_for(
            lambda: membership_disagreement(peers, members=peers),
            timeout=15,
            what="every node has the new members",
        )

        # Calls keep working; an answer's epoch header brings the new ring in within the debounce.
        deadline = time.monotonic() + 10
        while kv.router.view is first or set(kv.router.view.urls) != set(peers):
            assert time.monotonic() < deadline, f"the client still routes by {sorted(kv.router.view.urls)}"
            assert kv.get_many(KEYS) == dict.fromkeys(KEYS, b"before")
            time.sleep(0.1)
        assert kv.router.view.urls == peers and kv.router.view.epoch != first.epoch
        kv.put_many({key: b"after" for key in KEYS})
        assert kv.get_many(KEYS, consistency="quorum") == dict.fromkeys(KEYS, b"after")
        newcomer_keys = [key for key in KEYS if "node6" in kv.router.view.replicas(key.encode())]
        assert newcomer_keys, "the new node replicates none of the keys"


def test_the_client_distribution_installs_on_its_own(tmp_path: Path) -> None:
    """`pip install ./client` works: it installs kvstore_client, typed
    (py.typed), requiring httpx alone, and it imports without the server."""
    target = tmp_path / "site"
    source = shutil.copytree(  # a copy: pip builds in the tree, and this one is the developer's
        REPO / "client", tmp_path / "client", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    assert (target / "kvstore_client" / "py.typed").exists()
    assert not (target / "app").exists()
    (metadata,) = target.glob("kvstore_client-*.dist-info/METADATA")
    assert re.findall(r"^Requires-Dist: (.*)$", metadata.read_text(), re.MULTILINE) == ["httpx>=0.27"]
    # No site-packages (-S): the installed copy first, then httpx's home for httpx alone.
    httpx_home = str(Path(httpx.__file__).parent.parent)
    probe = (
        f"import sys; sys.path[:0] = [{str(target)!r}]; sys.path.append({httpx_home!r}); import kvstore_client; "
        "assert 'app' not in sys.modules, 'the client imported the server'; print(kvstore_client.__file__)"
    )
    run = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True, check=False, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.startswith(str(target)), run.stderr + run.stdout
