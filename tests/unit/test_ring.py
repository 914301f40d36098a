"""The ring: determinism, preference lists, balance and movement."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from app.ring import HASH_SPACE, HashRing, stable_hash

KEYS = [f"key-{i}".encode() for i in range(100_000)]
member_names = st.lists(st.text("abcdefghij0123456789-", min_size=1, max_size=12), min_size=1, max_size=6, unique=True)


def test_stable_hash_is_fixed_across_releases() -> None:
    # Golden values, written down as literals (64-bit BLAKE2b, big-endian):
    # if these change, every deployed ring reshuffles and every data dir's
    # keys land on the wrong nodes.
    assert stable_hash(b"alpha") == 5982700193828047002
    assert stable_hash(b"bravo") == 6655117143818746637
    assert stable_hash(b"") == 16476032584258269876
    assert stable_hash(b"\x00") == 10734006239897485896
    assert stable_hash(b"key-0") == 9679884382612836663
    assert 0 <= stable_hash(b"bravo") < HASH_SPACE


def test_default_ring_places_keys_where_it_always_did() -> None:
    # Golden preference lists of the seed's three nodes with the default
    # vnodes: a change of hash, vnode naming or vnode count moves them.
    ring = HashRing(["node1", "node2", "node3"])
    assert ring.owners(b"alpha", 3) == ("node3", "node1", "node2")
    assert ring.owners(b"bravo", 3) == ("node1", "node2", "node3")
    assert ring.owners(b"charlie", 3) == ("node2", "node1", "node3")
    assert ring.owners(b"key-0", 3) == ("node2", "node1", "node3")
    assert ring.owners(b"key-1", 3) == ("node3", "node1", "node2")


def test_owners_agree_across_processes_with_different_hash_seeds() -> None:
    script = (
        "from app.ring import HashRing;"
        "r = HashRing(['node1', 'node2', 'node3'], vnodes=64);"
        "print([r.owners(f'k{i}'.encode(), 2) for i in range(200)])"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        ).stdout
        for seed in ("1", "2", "12345")
    }
    assert len(outputs) == 1


@settings(max_examples=30, deadline=None)
@given(members=member_names, key=st.binary(min_size=1, max_size=64), data=st.data())
def test_rings_built_in_any_order_agree(members: list[str], key: bytes, data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(members))
    a, b = HashRing(members, vnodes=16), HashRing(shuffled, vnodes=16)
    assert a.owners(key, len(members)) == b.owners(key, len(members))


@settings(max_examples=50, deadline=None)
@given(members=member_names, key=st.binary(max_size=64), n=st.integers(min_value=1, max_value=8))
def test_preference_list_is_distinct_prefix_consistent_and_capped(members: list[str], key: bytes, n: int) -> None:
    ring = HashRing(members, vnodes=8)
    owners = ring.owners(key, n)
    assert len(owners) == min(n, len(members))
    assert len(set(owners)) == len(owners)
    assert owners[0] == ring.owner(key)
    assert ring.owners(key, n + 1)[: len(owners)] == owners


def test_colliding_points_break_ties_by_member_id() -> None:
    ring = HashRing(["b", "a", "c"], vnodes=4, hash_fn=lambda data: 42)  # every point collides
    assert ring.owners(b"anything", 3) == ("a", "b", "c")


def test_long_preference_lists_are_walked_on_demand() -> None:
    members = [f"n{i}" for i in range(12)]
    ring = HashRing(members, vnodes=4)
    owners = ring.owners(b"k", 12)
    assert sorted(owners) == sorted(members)
    assert owners[:8] == ring.owners(b"k", 8)


def test_shares_cover_the_circle_once_per_replica() -> None:
    ring = HashRing(["a", "b", "c", "d"], vnodes=32)
    assert abs(sum(ring.shares().values()) - 1.0) < 1e-9
    assert abs(sum(ring.shares(3).values()) - 3.0) < 1e-9


def test_replica_ranges_hold_exactly_the_replicated_keys() -> None:
    ring = HashRing(["a", "b", "c"], vnodes=16)
    arcs = ring.replica_ranges("a", 2)
    for key in KEYS[:2000]:
        token = stable_hash(key)
        inside = any((s < token <= e) if s < e else (token > s or token <= e) for s, e in arcs)
        assert inside == ("a" in ring.owners(key, 2))


def test_default_vnodes_balance_three_nodes_within_ten_percent() -> None:
    ring = HashRing(["node1", "node2", "node3"])
    counts = Counter(ring.owner(key) for key in KEYS)
    mean = len(KEYS) / 3
    assert max(counts.values()) <= 1.10 * mean, counts


def test_adding_a_fourth_node_moves_about_a_quarter_of_keys_only_onto_it() -> None:
    before = HashRing(["node1", "node2", "node3"])
    after = HashRing(["node1", "node2", "node3", "node4"])
    moved = [key for key in KEYS if before.owner(key) != after.owner(key)]
    assert 0.90 * len(KEYS) / 4 <= len(moved) <= 1.10 * len(KEYS) / 4, len(moved)
    assert all(after.owner(key) == "node4" for key in moved)


def test_removing_a_node_moves_only_its_keys() -> None:
    before = HashRing(["node1", "node2", "node3", "node4"])
    after = HashRing(["node1", "node2", "node4"])
    for key in KEYS[:20_000]:
        if before.owner(key) != "node3":
            assert after.owner(key) == before.owner(key)
