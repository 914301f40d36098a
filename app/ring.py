"""Consistent hashing: the immutable HashRing and the stable key hash.

Pure: stdlib only, no I/O. Topology changes build a new ring and swap the
reference (see app.cluster.topology); nobody ever sees a half-built ring.
The coordinator asks it for a key's preference list, storage and repair ask it
for the token ranges a node replicates.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Iterable

from app.config import DEFAULT_VNODES

HASH_BITS = 64
HASH_SPACE = 1 << HASH_BITS
# stable_hash, named for clients that route keys themselves (GET /ring/tokens):
# BLAKE2b with an 8-byte digest of the key's UTF-8 bytes, read as a big-endian
# unsigned integer. A key belongs to the first token >= its hash, wrapping to the first.
HASH_NAME = "blake2b-64-be"
PRECOMPUTED_WALK = 8  # replication factors above this are walked per lookup (slower, never seen)


def stable_hash(data: bytes) -> int:
    """A 64-bit hash that is the same in every process and every release.

    Never Python's hash(): it is salted per process.
    """
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class HashRing:
    """Members placed on a 64-bit circle, `vnodes` points each.

    A key belongs to the first point clockwise from its hash; its preference
    list is the first n *distinct* members met walking on from there.
    Points that collide are ordered by member id, so every process that
    builds a ring from the same members gets the same ring, whatever order
    the members were given in.
    """

    __slots__ = (
        "_fingerprint",
        "_hash",
        "_members",
        "_owners",
        "_preference",
        "_replica_sets",
        "_shares",
        "_tokens",
        "_vnodes",
    )

    def __init__(
        self,
        members: Iterable[str],
        *,
        vnodes: int = DEFAULT_VNODES,
        hash_fn: Callable[[bytes], int] = stable_hash,
    ) -> None:
        if vnodes < 1:
            raise ValueError("vnodes must be >= 1")
        self._members = tuple(sorted(set(members)))
        self._vnodes = vnodes
        self._hash = hash_fn
        points = sorted((hash_fn(f"{member}#{i}".encode()), member) for member in self._members for i in range(vnodes))
        self._tokens = [token for token, _ in points]
        self._owners = [member for _, member in points]
        # The distinct-member walk from each point, computed once up to
        # PRECOMPUTED_WALK members: owners(key, n) is then a bisect and a slice.
        self._preference = [self._walk(i, PRECOMPUTED_WALK) for i in range(len(points))]
        # Names the ring across processes: two nodes whose fingerprints match
        # cut the circle into the same arcs with the same owners.
        identity = "\n".join([str(vnodes), *self._members]).encode()
        self._fingerprint = hashlib.blake2b(identity, digest_size=16).hexdigest()
        self._replica_sets: dict[int, list[tuple[tuple[int, int], tuple[str, ...]]]] = {}
        self._shares: dict[int, dict[str, float]] = {}

    def _walk(self, start: int, n: int) -> tuple[str, ...]:
        count, wanted = len(self._owners), min(n, len(self._members))
        seen: dict[str, None] = {}
        index = start
        while len(seen) < wanted:
            seen.setdefault(self._owners[index % count])
            index += 1
        return tuple(seen)

    @property
    def fingerprint(self) -> str:
        """The same on every process that built a ring of these members and vnodes."""
        return self._fingerprint

    @property
    def members(self) -> tuple[str, ...]:
        return self._members

    @property
    def vnodes(self) -> int:
        return self._vnodes

    def __len__(self) -> int:
        return len(self._members)

    def points(self) -> list[tuple[int, str]]:
        """Every (token, member) point, in token order: what a client needs to
        place keys exactly as the nodes do (see HASH_NAME)."""
        return list(zip(self._tokens, self._owners, strict=True))

    def __contains__(self, member: object) -> bool:
        return member in self._members

    def hash_key(self, key: bytes) -> int:
        return self._hash(key)

    def _point_index(self, token: int) -> int:
        index = bisect.bisect_left(self._tokens, token)
        return 0 if index == len(self._tokens) else index

    def owner(self, key: bytes) -> str:
        """The first member clockwise from the key's hash."""
        if not self._owners:
            raise LookupError("the ring has no members")
        return self._owners[self._point_index(self._hash(key))]

    def owners(self, key: bytes, n: int) -> tuple[str, ...]:
        """The key's preference list: the first n distinct members clockwise."""
        if not self._preference:
            raise LookupError("the ring has no members")
        return self.owners_of_token(self._hash(key), n)

    def owners_of_token(self, token: int, n: int) -> tuple[str, ...]:
        if not self._preference:
            raise LookupError("the ring has no members")
        index = self._point_index(token)
        if n <= PRECOMPUTED_WALK:
            return self._preference[index][:n]
        return self._walk(index, n)

    def ranges(self) -> list[tuple[int, int]]:
        """Every arc of the circle as (start, end]: a key with hash h is in the
        arc whose end is the first token >= h. The first arc wraps past zero."""
        if not self._tokens:
            return []
        bounds = self._tokens
        return [((bounds[i - 1] if i else bounds[-1]), bounds[i]) for i in range(len(bounds))]

    def replica_sets(self, n: int) -> list[tuple[tuple[int, int], tuple[str, ...]]]:
        """Every arc with its n replicas, computed once per ring and n and
        kept: building it takes ~1.2 ms for 3,072 arcs, too long to repeat on
        the event loop at every anti-entropy round's surplus check. The list
        is shared: callers must not change it."""
        if n not in self._replica_sets:
            self._replica_sets[n] = [(arc, self.owners_of_token(arc[1], n)) for arc in self.ranges()]
        return self._replica_sets[n]

    def replica_ranges(self, member: str, n: int) -> list[tuple[int, int]]:
        """The arcs (start, end] for which `member` is one of the n replicas."""
        return (
            [
                (start, end)
                for (start, end), walk in zip(self.ranges(), self._preference, strict=True)
                if member in walk[:n]
            ]
            if n <= PRECOMPUTED_WALK
            else [arc for i, arc in enumerate(self.ranges()) if member in self._walk(i, n)]
        )

    def shares(self, n: int = 1) -> dict[str, float]:
        """Fraction of the key space each member replicates (n=1: owns).
        Computed once per ring and n: a walk of every arc, ~5 ms for 3,072
        arcs, which /ring paid twice per call (and the console's poll on
        every node)."""
        if n not in self._shares:
            self._shares[n] = self._compute_shares(n)
        return dict(self._shares[n])

    def _compute_shares(self, n: int) -> dict[str, float]:
        share = dict.fromkeys(self._members, 0.0)
        for index, (start, end) in enumerate(self.ranges()):
            walk = self._preference[index] if n <= PRECOMPUTED_WALK else self._walk(index, n)
            width = (end - start) % HASH_SPACE or (HASH_SPACE if len(self._tokens) == 1 else 0)
            for member in walk[:n]:
                share[member] += width / HASH_SPACE
        return share

    def __repr__(self) -> str:
        return f"HashRing(members={list(self._members)!r}, vnodes={self._vnodes})"


def in_arc(token: int, start: int, end: int) -> bool:
    """Whether token lies on the arc (start, end], which may wrap past zero.
    start == end means the whole circle (a ring with a single point)."""
    if start < end:
        return start < token <= end
    return token > start or token <= end


class ArcSet:
    """A set of disjoint arcs with O(log n) membership of a token.

    Used for the ranges a node is still syncing, and to bin records into the
    arcs anti-entropy compares."""

    __slots__ = ("_ends", "_wrap", "arcs")

    def __init__(self, arcs: Iterable[tuple[int, int]]) -> None:
        ordered = sorted(arcs, key=lambda arc: arc[1])
        self.arcs = ordered
        self._ends = [end for _, end in ordered]
        # At most one arc wraps past zero; when present it sorts first by end.
        self._wrap = next((i for i, (start, end) in enumerate(ordered) if start >= end), None)

    def __len__(self) -> int:
        return len(self.arcs)

    def locate(self, token: int) -> int | None:
        """Index (in .arcs) of the arc holding token, or None."""
        if not self.arcs:
            return None
        index = bisect.bisect_left(self._ends, token)
        if index < len(self.arcs):
            start, end = self.arcs[index]
            if in_arc(token, start, end):
                return index
        if self._wrap is not None and in_arc(token, *self.arcs[self._wrap]):
            return self._wrap
        return None

    def __contains__(self, token: object) -> bool:
        return isinstance(token, int) and self.locate(token) is not None


def segments(old: HashRing, new: HashRing, n: int) -> list[tuple[int, int, tuple[str, ...], tuple[str, ...]]]:
    """Cut the circle at every token of both rings: each piece (start, end] has
    one replica set before and one after a membership change.
    Returns (start, end, old_replicas, new_replicas) for every piece."""
    bounds = sorted(set(old._tokens) | set(new._tokens))
    if not bounds:
        return []
    pieces = []
    for i, end in enumerate(bounds):
        start = bounds[i - 1] if i else bounds[-1]
        before = old.owners_of_token(end, n) if len(old) else ()
        after = new.owners_of_token(end, n) if len(new) else ()
        pieces.append((start, end, before, after))
    return pieces
