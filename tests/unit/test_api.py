"""The HTTP API of one node, through the ASGI app: the seed's routes, the REST
routes, operations routes, and every kind of bad input.

In-process (no server socket). Two tests give the node a second member at
127.0.0.1:1, where nothing listens: the node's real peer client tries it and
the kernel refuses at once, with no server and nothing to wait for; that
refusal is the unreachable peer they need, so they stay unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.testclient import TestClient

from app.clock import Version
from app.cluster.node import Node
from app.cluster.replica import FULL_SCAN_ABOVE_ARCS
from app.storage.base import DIGEST_BYTES, Record
from app.transport import codec
from app.web.app import create_app
from app.web.dataplane import DataPlane
from tests.unit.nodes import single_node_config


def node_of(client: TestClient) -> Node:
    """The node behind a TestClient's app."""
    plane = client.app
    assert isinstance(plane, DataPlane)
    return plane.slot.require()


def test_seed_put_get_delete_roundtrip(client: TestClient) -> None:
    resp = client.put("/put", content=b'{"key":"alpha", "value":"value1"}')
    assert resp.status_code == 200 and resp.json()["key"] == "alpha"
    resp = client.get("/get", params={"key": "alpha"})
    assert resp.status_code == 200
    assert resp.json() == {"key": "alpha", "value": "value1"}
    assert client.delete("/delete", params={"key": "alpha"}).status_code == 200
    resp = client.get("/get", params={"key": "alpha"})
    assert resp.status_code == 404 and "error" in resp.json()
    assert client.delete("/delete", params={"key": "alpha"}).status_code == 404


def test_health_is_plain_ok(client: TestClient) -> None:
    resp = client.get("/health")
    assert resp.status_code == 200 and resp.text == "OK"


def test_rest_values_are_binary_safe(client: TestClient) -> None:
    value = bytes(range(256)) * 3
    assert client.put("/kv/bin%2Fkey", content=value).status_code == 204
    resp = client.get("/kv/bin%2Fkey")
    assert resp.status_code == 200 and resp.content == value
    assert resp.headers["content-type"] == "application/octet-stream"
    assert resp.headers["x-kvstore-version"].endswith(".n1")
    # The seed's JSON route refuses to mangle binary values.
    assert client.get("/get", params={"key": "bin/key"}).status_code == 406
    assert client.delete("/kv/bin%2Fkey").status_code == 204
    assert client.get("/kv/bin%2Fkey").status_code == 404
    assert client.delete("/kv/never-there").status_code == 204


def test_unicode_keys_work_on_both_apis(client: TestClient) -> None:
    assert client.put("/put", json={"key": "café ☕", "value": "crème"}).status_code == 200
    assert client.get("/kv/caf%C3%A9%20%E2%98%95").content == "crème".encode()


def test_ready_ring_metrics(client: TestClient) -> None:
    assert client.get("/ready").json() == {"status": "ready"}
    ring = client.get("/ring").json()
    assert ring["node_id"] == "n1" and ring["members"][0]["share"] == pytest.approx(1.0)
    client.put("/put", json={"key": "k", "value": "v"})
    client.get("/get", params={"key": "k"})
    text = client.get("/metrics").text
    assert 'kvstore_requests_total{op="put",status="200"} 1.0' in text
    assert 'kvstore_request_duration_seconds_bucket{le="0.0002",op="get"}' in text
    assert "kvstore_keys 1.0" in text
    assert "kvstore_forwarded_requests_total" in text
    # In memory there is no limit: both storage gauges read 0 (the alerts divide only by a limit > 0).
    assert "kvstore_storage_used_bytes 0.0" in text and "kvstore_storage_limit_bytes 0.0" in text
    assert "kvstore_ranges_below_quorum 0.0" in text  # one node, itself up: every arc has its quorum
    assert 'kvstore_rebalance_keys_streamed_total{direction="in"} 0.0' in text, "known label values start at 0"


def test_fsync_counters_count_each_sync_and_the_writes_it_covered(tmp_path: Path) -> None:
    config = single_node_config(storage="lmdb", data_dir=str(tmp_path), fsync="always")
    with TestClient(create_app(config)) as client:
        assert client.put("/kv/a", content=b"1").status_code == 204
        assert client.put("/kv/b", content=b"2").status_code == 204
        text = client.get("/metrics").text
        syncs = _sample(text, 'kvstore_storage_syncs_total{policy="always",store="data"}')
        assert syncs == 2  # one writer at a time: each PUT waits for a sync of its own
        assert _sample(text, 'kvstore_storage_synced_writes_total{policy="always",store="data"}') == 2
        assert _sample(text, 'kvstore_storage_sync_seconds_total{policy="always",store="data"}') > 0
        assert _sample(text, 'kvstore_storage_syncs_total{policy="always",store="hints"}') == 0  # no hint taken


def test_an_engine_that_never_syncs_exports_no_fsync_counters(client: TestClient) -> None:
    assert client.put("/kv/a", content=b"1").status_code == 204
    assert "kvstore_storage_syncs_total{" not in client.get("/metrics").text  # memory: nothing to sync


def _sample(exposition: str, series: str) -> float:
    found = [line.split()[-1] for line in exposition.splitlines() if line.startswith(series + " ")]
    assert len(found) == 1, f"{series} not exported once in:\n{exposition}"
    return float(found[0])


def test_openapi_describes_every_route(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for route in ("/put", "/get", "/delete", "/health", "/kv/{key}", "/ready", "/ring", "/metrics"):
        assert route in paths, route
    assert set(paths["/kv/{key}"]) == {"get", "put", "delete"}


BAD_REQUESTS = [
    # (method, path, body, expected status, words the error must contain)
    ("GET", "/get", None, 400, "missing"),
    ("GET", "/get?key=", None, 400, "empty"),
    ("GET", "/get?key=" + "k" * 1025, None, 400, "1025 bytes"),
    ("GET", "/get?key=%FF%FE", None, 400, "UTF-8"),
    ("GET", "/kv/%FF", None, 400, "UTF-8"),
    ("PUT", "/kv/" + "k" * 1025, b"v", 400, "limit"),
    ("PUT", "/put", b"not json", 400, "JSON"),
    ("PUT", "/put", b"[1, 2]", 400, "object"),
    ("PUT", "/put", b'{"key": "a"}', 400, "value"),
    ("PUT", "/put", b'{"value": "a"}', 400, "key"),
    ("PUT", "/put", b'{"key": 5, "value": "a"}', 400, "key"),
    ("PUT", "/put", b'{"key": "a", "value": {"x": 1}}', 400, "value"),
    ("PUT", "/put", b'{"key": "", "value": "a"}', 400, "empty"),
    ("PUT", "/put", b'{"key": "a", "value": "b", "ttl": -1}', 400, "ttl"),
    ("PUT", "/put", b'{"key": "a", "value": "b", "ttl": "soon"}', 400, "ttl"),
    ("PUT", "/kv/a?ttl=0", b"v", 400, "ttl"),
    ("GET", "/get?key=a&consistency=most", None, 400, "consistency"),
    ("PUT", "/put", b'{"key": "a", "value": "' + b"x" * 5000 + b'"}', 413, "limit"),
    ("PUT", "/kv/big", b"x" * 5000, 413, "limit"),
    ("POST", "/get?key=a", None, 405, "GET"),
    ("GET", "/put", None, 405, "PUT"),
    ("PUT", "/delete?key=a", None, 405, "DELETE"),
    ("PATCH", "/kv/a", b"x", 405, "PUT"),
    ("POST", "/health", None, 405, "GET"),
    ("POST", "/ready", None, 405, "not allowed"),
    ("GET", "/no/such/route", None, 404, "no route"),
    ("GET", "/internal/v1/kv/%FF", None, 400, "UTF-8"),
    ("PUT", "/internal/v1/kv/a", b"v", 400, "version"),
    ("POST", "/internal/v1/writes", b"\x05ab", 400, "malformed"),
    (
        "POST",
        "/internal/v1/writes",
        codec.encode_writes([(b"big", Record(Version(1, "n1"), b"x" * 5000, 0), None)]),
        413,
        "limit",
    ),
    ("GET", "/internal/v1/writes", None, 405, "POST"),
    ("POST", "/internal/v1/reads", b"\x00", 400, "malformed"),
    ("POST", "/internal/v1/reads", codec.encode_keys([b"a", b""]), 400, "empty"),
    ("POST", "/internal/v1/reads", codec.encode_keys([b"k"] * 65), 400, "limit"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "words"), BAD_REQUESTS)
def test_bad_input_is_a_4xx_with_a_json_error_and_harms_nothing(
    client: TestClient, method: str, path: str, body: bytes | None, status: int, words: str
) -> None:
    client.put("/put", json={"key": "survivor", "value": "still here"})
    resp = client.request(method, path, content=body)
    assert resp.status_code == status, resp.text
    assert words in resp.json()["error"]
    # The node still serves, and the earlier write is intact.
    assert client.get("/get", params={"key": "survivor"}).json()["value"] == "still here"
    assert client.put("/put", json={"key": "after", "value": "ok"}).status_code == 200


def test_ttl_makes_a_key_expire(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    import app.clock

    now = [app.clock.wall_ms()]
    for module in ("app.clock", "app.cluster.coordinator"):
        monkeypatch.setattr(f"{module}.wall_ms", lambda: now[0])
    assert client.put("/kv/ephemeral?ttl=5", content=b"v").status_code == 204
    assert client.put("/put", json={"key": "e2", "value": "v", "ttl": 5}).status_code == 200
    assert client.get("/kv/ephemeral").status_code == 200
    now[0] += 6000
    assert client.get("/kv/ephemeral").status_code == 404
    assert client.get("/get", params={"key": "e2"}).status_code == 404


def test_internal_routes_require_the_cluster_token_when_set() -> None:
    with TestClient(create_app(single_node_config(cluster_token="s3cret"))) as client:
        assert client.get("/internal/v1/kv/a").status_code == 401
        assert client.get("/internal/v1/kv/a", headers={"x-kvstore-token": "wrong"}).status_code == 403
        assert client.get("/internal/v1/kv/a", headers={"x-kvstore-token": "s3cret"}).status_code == 404
        keys = codec.encode_keys([b"a"])
        assert client.post("/internal/v1/reads", content=keys).status_code == 401
        assert client.post("/internal/v1/writes", content=b"", headers={"x-kvstore-token": "wrong"}).status_code == 403
        assert client.post("/internal/v1/reads", content=keys, headers={"x-kvstore-token": "s3cret"}).status_code == 200
        # Client routes stay open.
        assert client.put("/kv/a", content=b"v").status_code == 204


def test_coalesced_replica_calls_apply_each_write_and_answer_each_read(client: TestClient) -> None:
    old, new = Version(100, "n9"), Version(200, "n9")
    client.post("/internal/v1/writes", content=codec.encode_writes([(b"lww", Record(new, b"new", 0), None)]))
    answer = client.post(
        "/internal/v1/writes",
        content=codec.encode_writes(
            [
                (b"c1", Record(new, b"one", 0), None),
                (b"lww", Record(old, b"older", 0), None),  # older than what is stored: ignored
                (b"gone", Record(new, None, 0), None),  # a tombstone for a key never written
            ]
        ),
    )
    assert answer.status_code == 200
    # The older write lost: its ack names the newer version the replica kept.
    assert codec.decode_acks(answer.content) == [(True, False, None), (False, True, new), (True, False, None)]
    reads = client.post("/internal/v1/reads", content=codec.encode_keys([b"c1", b"lww", b"gone", b"never"]))
    assert codec.decode_read_answers(reads.content) == [
        (Record(new, b"one", 0), False),
        (Record(new, b"new", 0), False),
        (Record(new, None, 0), False),
        (None, False),
    ]
    assert client.get("/kv/c1").content == b"one"
    held = client.post(
        "/internal/v1/writes",
        content=codec.encode_writes(
            [
                (b"for-n7", Record(new, b"held", 0), "n7"),  # a hint: held for n7, not stored as ours
                (b"c2", Record(new, b"two", 0), None),
            ]
        ),
    )
    assert list(held.content) == [codec.ACK_APPLIED, codec.ACK_APPLIED]
    assert client.get("/kv/for-n7").status_code == 404
    assert client.get("/kv/c2").content == b"two"
    node = node_of(client)
    assert node.replica.hints.for_target("n7", 10) == [(b"for-n7", Record(new, b"held", 0))]


def test_a_503_says_when_to_retry_and_a_405_what_is_allowed() -> None:
    # A two-member ring whose second member listens nowhere: a write at `all` cannot reach it.
    config = single_node_config(peers="n1=http://127.0.0.1:9,n2=http://127.0.0.1:1", replication_factor="2")
    with TestClient(create_app(config)) as client:
        refused = client.put("/kv/k?consistency=all", content=b"v")
        assert refused.status_code == 503 and "quorum not reached" in refused.json()["error"]
        assert refused.headers["retry-after"] == "1"
        wrong = client.post("/kv/k")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, HEAD, PUT, DELETE"


def test_many_arcs_digests_are_refused_with_a_409_while_the_index_builds(client: TestClient) -> None:
    """Not a 503: that would mark an up node down for client traffic."""
    node = node_of(client)
    arcs = node.topology.current.ring.ranges()[: FULL_SCAN_ABOVE_ARCS + 1]
    node.store.digests_ready = lambda: False
    refused = client.post("/internal/v1/digests", content=codec.encode_arcs(arcs))
    assert refused.status_code == 409 and "still being built" in refused.json()["error"]
    few = client.post("/internal/v1/digests", content=codec.encode_arcs(arcs[:FULL_SCAN_ABOVE_ARCS]))
    assert few.status_code == 200 and len(codec.decode_digests(few.content)) == FULL_SCAN_ABOVE_ARCS
    del node.store.digests_ready
    assert client.post("/internal/v1/digests", content=codec.encode_arcs(arcs)).status_code == 200


def test_the_shared_digest_route_answers_on_the_same_ring_and_refuses_otherwise() -> None:
    config = single_node_config(peers="n1=http://127.0.0.1:9,n2=http://127.0.0.1:1", replication_factor="2")
    with TestClient(create_app(config)) as client:
        node = node_of(client)
        assert node.store.wait_digests(10)
        ring = node.anti_entropy.ring_name()
        ok = client.post("/internal/v1/shared-digest", json={"asker": "n2", "ring": ring})
        assert ok.status_code == 200 and len(bytes.fromhex(ok.json()["digest"])) == DIGEST_BYTES
        other = client.post("/internal/v1/shared-digest", json={"asker": "n2", "ring": "elsewhere/2"})
        assert other.status_code == 409 and "ring" in other.json()["error"]
        stranger = client.post("/internal/v1/shared-digest", json={"asker": "n9", "ring": ring})
        assert stranger.status_code == 409
        for bad in (b"[]", b"{", b'{"asker": 1, "ring": "x"}'):
            answer = client.post("/internal/v1/shared-digest", content=bad)
            assert answer.status_code == 400 and "error" in answer.json(), bad
