"""Three real node processes on loopback: routing, the seed's walkthrough,
concurrency, an unreachable owner, bad input against a live node."""

from __future__ import annotations

import asyncio
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import httpx

from app.ring import HashRing
from tests.harness.processes import Cluster, free_port_run, wait_ready
from tests.unit.test_api import BAD_REQUESTS

COMMAND_UP_WITHIN_S = 20.0  # `kvstore cluster` already waited for /ready: its nodes serve at once

# The seed document's "Test the System" and "Health Check" commands, verbatim
# except for the host:port each is pointed at.
SEED_WALKTHROUGH = [
    ("""curl -X PUT http://localhost:8080/put -d '{"key":"alpha", "value":"value1"}'""", 200, None),
    ("""curl -X PUT http://localhost:8080/put -d '{"key":"bravo", "value":"value2"}'""", 200, None),
    ("""curl -X PUT http://localhost:8080/put -d '{"key":"charlie", "value":"value3"}'""", 200, None),
    ("""curl http://localhost:8080/get?key=alpha""", 200, '{"key":"alpha","value":"value1"}'),
    ("""curl http://localhost:8080/get?key=bravo""", 200, '{"key":"bravo","value":"value2"}'),
    ("""curl http://localhost:8080/get?key=charlie""", 200, '{"key":"charlie","value":"value3"}'),
    ("""curl -X DELETE http://localhost:8080/delete?key=alpha""", 200, None),
    ("""curl -X DELETE http://localhost:8080/delete?key=bravo""", 200, None),
    ("""curl -X DELETE http://localhost:8080/delete?key=charlie""", 200, None),
    ("""curl http://localhost:8080/health""", 200, "OK"),
    ("""curl http://localhost:8081/health""", 200, "OK"),
    ("""curl http://localhost:8082/health""", 200, "OK"),
]


def owned_key(cluster: Cluster, owner: str, prefix: str = "key") -> str:
    ring = HashRing(cluster[0].peers)
    return next(f"{prefix}-{i}" for i in range(10_000) if ring.owner(f"{prefix}-{i}".encode()) == owner)


def test_seed_curl_walkthrough_works_verbatim_against_every_node(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(3)
    ports = {f"localhost:{8080 + i}": f"127.0.0.1:{node.port}" for i, node in enumerate(cluster.nodes)}
    for entry in range(3):  # run the whole walkthrough against each node in turn
        target = f"127.0.0.1:{cluster[entry].port}"
        for command, status, body in SEED_WALKTHROUGH:
            argv = shlex.split(command)
            argv = [arg.replace("localhost:8080", target) for arg in argv]
            for seed_host, real in ports.items():
                argv = [arg.replace(seed_host, real) for arg in argv]
            done = subprocess.run(
                [*argv, "-s", "-w", "\n%{http_code}"], capture_output=True, text=True, timeout=10, check=True
            )
            out, _, code = done.stdout.rpartition("\n")
            assert int(code) == status, (command, done.stdout)
            if body is not None:
                assert out == body, (command, out)


def test_write_through_one_node_read_and_delete_through_the_others(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(3)
    keys = [f"user:{i}" for i in range(60)]
    with httpx.Client(timeout=5) as client:
        for key in keys:
            assert client.put(f"{cluster[0].url}/kv/{key}", content=f"v-{key}".encode()).status_code == 204
        for node in cluster.nodes[1:]:
            for key in keys:
                resp = client.get(f"{node.url}/kv/{key}")
                assert resp.status_code == 200 and resp.content == f"v-{key}".encode()
        for key in keys:
            assert client.delete(f"{cluster[2].url}/kv/{key}").status_code == 204
        for node in cluster.nodes:
            assert all(client.get(f"{node.url}/kv/{key}").status_code == 404 for key in keys)
        # The keys are spread by owner: each node is the first owner of some of them, and the
        # node they were written through sent every write to both other replicas (N=3 on three nodes).
        ring = HashRing(cluster[0].peers)
        assert {ring.owner(key.encode()) for key in keys} == {node.node_id for node in cluster.nodes}
        metrics = client.get(f"{cluster[0].url}/metrics").text
        sent = {
            peer: float(count)
            for peer, count in re.findall(
                r'kvstore_forwarded_requests_total\{op="write",peer="([^"]+)"\} (\S+)', metrics
            )
        }
        assert sent == {node.node_id: len(keys) for node in cluster.nodes[1:]}, sent


def test_internal_routes_are_never_forwarded(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(3, args=["--replication-factor", "1"])
    key = owned_key(cluster, "node2")
    with httpx.Client(timeout=5) as client:
        client.put(f"{cluster[0].url}/kv/{key}", content=b"v")
        assert client.get(f"{cluster[1].url}/internal/v1/kv/{key}").status_code == 200
        # node1 is not the owner: a replica read there answers from its own store, no hop.
        assert client.get(f"{cluster[0].url}/internal/v1/kv/{key}").status_code == 404


def test_concurrent_clients_on_distinct_keys_lose_no_writes(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(3)
    urls = [node.url for node in cluster.nodes]

    async def client_task(worker: int) -> dict[str, bytes]:
        written = {}
        rng = random.Random(worker)
        async with httpx.AsyncClient(timeout=10) as client:
            for i in range(120):
                key, value = f"w{worker}-k{i}", f"{worker}:{i}:{rng.random()}".encode()
                resp = await client.put(f"{rng.choice(urls)}/kv/{key}", content=value)
                assert resp.status_code == 204
                written[key] = value
        return written

    async def run() -> dict[str, bytes]:
        results = await asyncio.gather(*(client_task(w) for w in range(8)))
        return {k: v for result in results for k, v in result.items()}

    written = asyncio.run(run())
    assert len(written) == 960
    with httpx.Client(timeout=5) as client:
        for key, value in written.items():
            assert client.get(f"{random.choice(urls)}/kv/{key}").content == value


def test_unreachable_owner_gives_a_prompt_503_naming_it(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(3, args=["--replication-factor", "1"])
    key = owned_key(cluster, "node3")
    other = owned_key(cluster, "node2")
    with httpx.Client(timeout=10) as client:
        assert client.put(f"{cluster[0].url}/kv/{other}", content=b"fine").status_code == 204
        cluster[2].kill()
        started = time.monotonic()
        resp = client.get(f"{cluster[0].url}/get", params={"key": key})
        assert resp.status_code == 503
        assert "node3" in resp.json()["error"] and cluster[2].url in resp.json()["error"]
        assert time.monotonic() - started < 2.0
        # Keys owned by live nodes are unaffected, and /ring shows node3 down.
        assert client.get(f"{cluster[0].url}/kv/{other}").content == b"fine"
        members = {m["node_id"]: m for m in client.get(f"{cluster[0].url}/ring").json()["members"]}
        assert members["node3"]["reachable"] is False
        # Writes are taken meanwhile (sloppy quorum: a spare node holds a hint).
        assert client.put(f"{cluster[0].url}/kv/{key}", content=b"again").status_code == 204
        # It comes back on the same port; the probe marks it up and the hint is delivered.
        cluster[2].start().wait_ready()
        deadline = time.monotonic() + 10
        while client.get(f"{cluster[1].url}/kv/{key}").content != b"again":
            assert time.monotonic() < deadline, "hinted write never reached the restarted owner"
            time.sleep(0.1)


def test_bad_input_against_a_live_node_is_4xx_and_harmless(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(1, args=["--max-value-bytes", "4096"])
    url = cluster[0].url
    with httpx.Client(timeout=5) as client:
        client.put(f"{url}/put", json={"key": "survivor", "value": "still here"})
        for method, path, body, status, _words in BAD_REQUESTS:
            resp = client.request(method, url + path, content=body)
            assert resp.status_code == status, (method, path, resp.text)
            assert "error" in resp.json()
        # A chunked body over the limit (no Content-Length) is refused too.
        chunks = (b"x" * 1024 for _ in range(8))
        assert client.put(f"{url}/kv/streamed", content=chunks).status_code == 413
        assert client.get(f"{url}/get", params={"key": "survivor"}).json()["value"] == "still here"
        assert client.put(f"{url}/kv/after", content=b"ok").status_code == 204
        assert cluster[0].proc is not None and cluster[0].proc.poll() is None


def test_cluster_command_starts_three_nodes_and_stops_them_on_sigint_or_sigterm() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        base = free_port_run(3)
        proc = subprocess.Popen(
            [sys.executable, "-m", "app", "cluster", "--nodes", "3", "--base-port", str(base)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        pids = []
        try:
            assert proc.stdout is not None
            for _ in range(4):
                line = proc.stdout.readline()
                if "(pid " in line:
                    pids.append(int(line.rsplit("(pid ", 1)[1].rstrip(")\n")))
            assert len(pids) == 3
            assert "every node ready" in line  # said only once each node's /ready answers 200
            urls = [f"http://127.0.0.1:{port}" for port in range(base, base + 3)]
            wait_ready(urls, procs=[proc], path="/health", timeout=COMMAND_UP_WITHIN_S)
            assert all(httpx.get(url + "/health", timeout=1).text == "OK" for url in urls)
            assert (
                httpx.put(f"http://127.0.0.1:{base}/put", content=b'{"key":"alpha", "value":"value1"}').status_code
                == 200
            )
            assert httpx.get(f"http://127.0.0.1:{base + 2}/get?key=alpha").json()["value"] == "value1"
            started = time.monotonic()
            proc.send_signal(signum)
            assert proc.wait(timeout=10) == 0
            assert time.monotonic() - started < 6
            for pid in pids:
                assert not _alive(pid), f"node pid {pid} outlived the cluster command"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            for pid in pids:
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
            if proc.stdout is not None:
                proc.stdout.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes; its parent reaps it.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
