"""The client library's pure parts: its ring places keys exactly as the
nodes' does, the router orders replicas by load and puts failed nodes last,
refreshes are debounced, retries back off within the deadline, and bad keys
are refused before anything is sent (kvstore_client.ring, .routing, .calls)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.ring import HASH_NAME, HashRing, stable_hash
from kvstore_client import BadRequest, Forbidden, KvstoreError, StorageFull, Unauthorized, Unavailable, calls
from kvstore_client.errors import from_answer
from kvstore_client.ring import RingFormatError, RingView, key_hash
from kvstore_client.routing import BACKOFF_CAP_S, REFRESH_INTERVAL_S, SUSPECT_S, Router

MEMBERS = {f"node{i}": f"http://10.0.0.{i}:8080" for i in range(1, 6)}
RING = HashRing(MEMBERS, vnodes=64)


def tokens_doc(ring: HashRing = RING, *, rf: int = 3, epoch: str = "e1", **changes: object) -> dict[str, object]:
    """What GET /ring/tokens answers (app/web/routes_ops.py ring_tokens), for this ring."""
    ids = sorted(MEMBERS)
    points = ring.points()
    doc: dict[str, object] = {
        "format": 1,
        "epoch": epoch,
        "hash": HASH_NAME,
        "replication_factor": rf,
        "vnodes": ring.vnodes,
        "members": [{"node_id": node_id, "url": MEMBERS[node_id], "reachable": True} for node_id in ids],
        "batch": {"max_keys": 256},
        "tokens": [token for token, _ in points],
        "owners": [ids.index(owner) for _, owner in points],
    }
    return doc | changes


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def router(*, view: bool = True) -> tuple[Router, Clock]:
    clock = Clock()
    r = Router(["http://seed:8080"], clock=clock, rng=random.Random(7))
    if view:
        r.install(RingView.parse(tokens_doc()))
    return r, clock


@settings(max_examples=300)
@given(st.binary(min_size=1, max_size=64))
def test_the_client_places_every_key_on_the_replicas_the_nodes_use(key: bytes) -> None:
    view = RingView.parse(tokens_doc())
    assert key_hash(key) == stable_hash(key)
    assert view.replicas(key) == RING.owners(key, 3)


def test_a_ring_of_another_format_or_hash_is_refused() -> None:
    with pytest.raises(RingFormatError, match="format"):
        RingView.parse(tokens_doc(format=2))
    with pytest.raises(RingFormatError, match="hash"):
        RingView.parse(tokens_doc(hash="murmur3"))
    with pytest.raises(RingFormatError, match="malformed"):
        RingView.parse(tokens_doc(owners=[0]))
    with pytest.raises(RingFormatError, match="malformed"):
        RingView.parse({"format": 1})


def test_reads_go_to_the_least_loaded_replica_then_every_other_node() -> None:
    r, _ = router()
    key = b"user/42"
    replicas = r.replica_urls(key)
    assert len(replicas) == 3
    r.begin(replicas[0])
    r.begin(replicas[0])
    r.begin(replicas[1])
    order = r.targets(key)
    assert order[0] == replicas[2]
    assert order[:3] == [replicas[2], replicas[1], replicas[0]]
    assert set(order[3:]) == set(MEMBERS.values()) - set(replicas) | {"http://seed:8080"}
    # Ties are broken at random: idle replicas all get their turn.
    for url in replicas:
        while r.outstanding.get(url):
            r.end(url)
    assert {r.targets(key)[0] for _ in range(60)} == set(replicas)


def test_a_node_that_failed_is_tried_last_until_it_answers_or_time_passes() -> None:
    r, clock = router()
    key = b"k"
    first = r.targets(key)[0]
    r.failed(first)
    assert r.targets(key)[-1] == first
    clock.now += SUSPECT_S + 0.01
    assert first in r.targets(key)[:3]
    r.failed(first)
    r.answered(first, epoch="e1")
    assert first in r.targets(key)[:3]


def test_without_a_view_calls_go_to_the_seeds() -> None:
    r, _ = router(view=False)
    assert r.targets(b"k") == ["http://seed:8080"]
    assert r.group([b"a", b"b"]) == {"http://seed:8080": [b"a", b"b"]}


def test_refreshes_are_debounced_however_many_calls_see_the_change() -> None:
    r, clock = router()
    assert not r.refresh_due()
    for url in MEMBERS.values():  # a failover seen by many calls at once
        r.failed(url)
        r.answered(url, epoch="e2")
    assert r.refresh_due()
    r.refresh_sources()  # one caller starts the refresh
    assert not r.refresh_due(), "a second refresh within the interval"
    r.refresh_failed()
    clock.now += REFRESH_INTERVAL_S / 2
    assert not r.refresh_due()
    clock.now += REFRESH_INTERVAL_S
    assert r.refresh_due()
    r.install(RingView.parse(tokens_doc(epoch="e2")))
    assert not r.refresh_due()
    r.answered("http://10.0.0.1:8080", epoch="e2")
    clock.now += 10
    assert not r.refresh_due(), "the same epoch wants no refresh"


def test_a_new_epoch_is_fetched_first_from_the_node_that_announced_it() -> None:
    r, clock = router()
    clock.now += 10
    r.answered("http://10.0.0.4:8080", epoch="e9")
    assert r.refresh_due()
    assert r.refresh_sources()[0] == "http://10.0.0.4:8080"


def test_backoff_is_jittered_capped_and_never_past_the_deadline() -> None:
    r, clock = router()
    waits = [r.backoff(retry, clock.now + 60) for retry in range(1, 30)]
    assert max(waits) <= BACKOFF_CAP_S
    assert len(set(waits)) > 20, "no jitter"
    assert r.backoff(30, clock.now + 0.001) <= 0.001 + 1e-9
    attempts = list(r.attempts(["a", "b"], clock.now - 1))
    assert attempts == []


def test_attempts_cycle_the_nodes_and_leave_time_for_the_next() -> None:
    r, clock = router()
    attempts = iter(r.attempts(["a", "b", "c"], clock.now + 4.0))
    first = next(attempts)
    assert (first.url, first.timeout_s, first.connect_s) == ("a", 2.0, 1.0)
    clock.now += 2.0
    second = next(attempts)
    assert (second.url, second.timeout_s) == ("b", 1.0)
    clock.now += 1.9
    third = next(attempts)
    assert third.url == "c" and third.timeout_s == pytest.approx(0.1)
    clock.now += 0.1
    assert next(attempts, None) is None


def test_a_batch_is_grouped_by_replica_and_spread_over_them() -> None:
    r, _ = router()
    keys = [f"key-{i}".encode() for i in range(600)]
    groups = r.group(keys)
    assert sorted(k for group in groups.values() for k in group) == sorted(keys)
    for url, group in groups.items():
        assert all(url in r.replica_urls(key) for key in group)
    sizes = sorted(len(group) for group in groups.values())
    assert len(sizes) == 5 and sizes[0] > 60, sizes
    assert [len(c) for c in calls.chunks(keys, 256)] == [256, 256, 88]


@pytest.mark.parametrize("key", ["", b"", "k" * 1025, b"\xff\xfe", 42])
def test_keys_the_nodes_would_refuse_are_refused_before_sending(key: object) -> None:
    with pytest.raises(BadRequest):
        calls.key_bytes(key)  # type: ignore[arg-type]  # the test passes what a caller should not


def test_a_key_of_1024_bytes_is_fine() -> None:
    assert calls.key_bytes("é" * 512) == "é".encode() * 512


@pytest.mark.parametrize(
    ("status", "kind"),
    [(401, Unauthorized), (403, Forbidden), (400, BadRequest), (413, BadRequest), (409, BadRequest),
     (503, Unavailable), (507, StorageFull), (500, KvstoreError)],
)  # fmt: skip
def test_each_status_is_its_error_type_with_the_server_s_message(status: int, kind: type[KvstoreError]) -> None:
    error = from_answer(status, b'{"error": "the server said so"}', node="http://n1")
    assert type(error) is kind and isinstance(error, KvstoreError)
    assert (error.message, error.status, error.node) == ("the server said so", status, "http://n1")
    assert str(error) == f"http://n1: {status}: the server said so"


def test_bad_consistency_and_ttl_are_refused_before_sending() -> None:
    with pytest.raises(BadRequest, match="consistency"):
        calls.get(b"k", "some")
    with pytest.raises(BadRequest, match="ttl"):
        calls.put(b"k", b"v", ttl=0, consistency=None)
