"""What the nodes publish for the client library, through the ASGI app of one
node: GET /ring/tokens, the x-kvstore-epoch header on every answer, and the
batch routes /batch/get and /batch/put with their validation (app/web/routes_ops.py,
app/web/routes_batch.py, app/web/dataplane.py)."""

from __future__ import annotations

import base64

import pytest
from starlette.testclient import TestClient

from app.config import MAX_BATCH_KEYS
from app.ring import HashRing, stable_hash
from kvstore_client.ring import RingView


def b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def test_ring_tokens_give_a_client_the_nodes_ring(client: TestClient) -> None:
    doc = client.get("/ring/tokens").json()
    assert doc["format"] == 1 and doc["hash"] == "blake2b-64-be"
    assert doc["replication_factor"] == 1 and doc["members"][0]["node_id"] == "n1"
    assert doc["batch"]["max_keys"] == MAX_BATCH_KEYS
    ring = HashRing(["n1"], vnodes=doc["vnodes"], hash_fn=stable_hash)
    assert doc["tokens"] == [token for token, _ in ring.points()]
    assert RingView.parse(doc).replicas(b"any key") == ("n1",)


def test_every_answer_carries_the_ring_epoch(client: TestClient) -> None:
    epoch = client.get("/ring/tokens").json()["epoch"]
    assert len(epoch) == 16
    answers = [
        client.put("/kv/k", content=b"v"),
        client.get("/kv/k"),
        client.get("/kv/absent"),
        client.get("/get", params={"key": ""}),
        client.get("/health"),
        client.get("/ring"),
        client.get("/no/such/route"),
        client.post("/batch/get", json={"keys": ["k"]}),
    ]
    assert [resp.headers.get("x-kvstore-epoch") for resp in answers] == [epoch] * len(answers)


def test_batch_put_then_get_roundtrip_binary_values(client: TestClient) -> None:
    items = {"a": b"\x00\xff", "b/é": b"two", "c": b""}
    resp = client.post("/batch/put", json={"items": {k: b64(v) for k, v in items.items()}})
    assert resp.status_code == 200, resp.text
    assert set(resp.json()["versions"]) == set(items)
    assert client.get("/kv/b%2F%C3%A9").content == b"two"
    got = client.post("/batch/get?consistency=one", json={"keys": ["a", "b/é", "c", "missing", "a"]})
    assert got.status_code == 200
    assert {k: base64.b64decode(v) for k, v in got.json()["values"].items()} == items
    assert client.post("/batch/put", json={"items": {"t": b64(b"x")}, "ttl": 60}).status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/batch/get", b"not json", 400, "not valid JSON"),
        ("/batch/get", b"[1]", 400, "JSON object"),
        ("/batch/get", b'{"keys": "a"}', 400, "list of strings"),
        ("/batch/get", b'{"keys": [""]}', 400, "empty"),
        ("/batch/get", b'{"keys": ["' + b"k" * 1025 + b'"]}', 400, "limit is 1024"),
        ("/batch/put", b'{"items": ["a"]}', 400, "base64 value"),
        ("/batch/put", b'{"items": {"a": "***"}}', 400, "not valid base64"),
        ("/batch/put", b'{"items": {"a": "' + base64.b64encode(b"v" * 5000) + b'"}}', 413, "exceeds the limit"),
        ("/batch/put", b'{"items": {"a": "dg=="}, "ttl": -1}', 400, "ttl"),
    ],
)
def test_bad_batches_get_a_4xx_with_the_reason(
    client: TestClient, path: str, body: bytes, status: int, says: str
) -> None:
    resp = client.post(path, content=body)
    assert resp.status_code == status and says in resp.json()["error"], resp.text


def test_batches_are_bounded_and_checked_whole_before_anything_is_written(client: TestClient) -> None:
    too_many = {"keys": [f"k{i}" for i in range(MAX_BATCH_KEYS + 1)]}
    resp = client.post("/batch/get", json=too_many)
    assert resp.status_code == 400 and f"the limit is {MAX_BATCH_KEYS}" in resp.json()["error"]
    one_bad = {"items": {"good": b64(b"v"), "": b64(b"v")}}
    assert client.post("/batch/put", json=one_bad).status_code == 400
    assert client.get("/kv/good").status_code == 404, "a batch with a bad key wrote its good keys"
    assert client.get("/batch/get").status_code == 405
