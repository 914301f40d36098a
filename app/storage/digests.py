"""Maintained anti-entropy digests: one XOR accumulator per interval of the hash circle.

An arc's digest (Store.digest) is the XOR of its records' fingerprints, so a
write changes it by XOR-ing out the old record's fingerprint and XOR-ing in
the new one's: O(log n) per write, no read. The intervals are the current
ring's arcs, each cut into DIGEST_SUBARCS equal sub-arcs (split_arc): both
replicas of an arc derive the same sub-arcs from the same ring, so anti-entropy
narrows a mismatched arc to its sub-arcs (a one-level Merkle tree) through the
ordinary digests call, and reads records only there.

DigestIndex is the pure structure (bisect over sorted boundaries).
MaintainedDigests keeps one current beside an engine: the engine reports
every committed change under its write lock, and one worker thread builds
the index at open and re-cuts it when the ring changes, from a snapshot
taken under that lock, while writes keep landing (XOR deltas commute).
LMDB saves the index at a clean close and restores it at open (to_bytes,
restore), so a restart reads no records. Used by app.storage.memory and
app.storage.lmdb_store; pure, no asyncio.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from functools import reduce
from itertools import pairwise
from operator import xor

from app.ring import HASH_SPACE

log = logging.getLogger(__name__)

_SAVED_FORMAT = b"\x01"  # first byte of a saved index: bumped if the layout changes
INTERRUPT_EVERY = 4096  # records scanned between looks at whether the engine is closing

Scan = Callable[[int, int], Iterable[tuple[int, int]]]  # arc (start, end] -> (key hash, fingerprint) pairs


def split_arc(start: int, end: int, parts: int) -> list[tuple[int, int]]:
    """The arc (start, end] cut into `parts` equal sub-arcs, clockwise (fewer
    when the arc is narrower than `parts`). start == end is the whole circle."""
    width = (end - start) % HASH_SPACE or HASH_SPACE
    cuts = [(start + width * k // parts) % HASH_SPACE for k in range(parts + 1)]
    cuts[-1] = end
    return [(a, b) for a, b in pairwise(cuts) if a != b] or [(start, end)]


def subarc_boundaries(arcs: Iterable[tuple[int, int]], parts: int) -> list[int]:
    """Sorted distinct interval ends: every arc's sub-arc ends. No arcs (an
    empty ring): one interval, the whole circle."""
    ends = {end for start, stop in arcs for _, end in split_arc(start, stop, parts)}
    return sorted(ends) or [0]


class DigestIndex:
    """XOR accumulators over the intervals (b[i-1], b[i]] of sorted boundaries
    b (interval 0 wraps past zero; a single boundary is the whole circle)."""

    __slots__ = ("acc", "boundaries")

    def __init__(self, boundaries: Sequence[int]) -> None:
        if not boundaries:
            raise ValueError("a digest index needs at least one boundary")
        self.boundaries = list(boundaries)
        self.acc = [0] * len(self.boundaries)

    def locate(self, token: int) -> int:
        """The interval holding token."""
        index = bisect.bisect_left(self.boundaries, token)
        return 0 if index == len(self.boundaries) else index

    def changed(self, token: int, delta: int) -> None:
        """A record hashed to token changed: delta is old fingerprint XOR new (0 for none)."""
        self.acc[self.locate(token)] ^= delta

    def range_digest(self, start: int, end: int) -> tuple[int, list[tuple[int, int]]]:
        """The XOR over the whole intervals inside the arc (start, end], and the
        arcs left over at its ends (not aligned to boundaries) that the caller
        must scan; both empty-handed when nothing of the arc is aligned."""
        bounds, n = self.boundaries, len(self.boundaries)
        if start == end:
            return reduce(xor, self.acc, 0), []
        first = bisect.bisect_right(bounds, start) % n  # first boundary clockwise after start
        if not _inside(bounds[first], start, end):
            return 0, [(start, end)]
        last = (bisect.bisect_right(bounds, end) - 1) % n  # last boundary at or before end
        aligned = bounds[first - 1] == start
        edges = [] if aligned else [(start, bounds[first])]
        whole_from = first if aligned else (first + 1) % n
        whole = (last - first) % n + aligned  # how many whole intervals lie inside
        if bounds[last] != end:
            edges.append((bounds[last], end))
        if whole == 0:
            return 0, edges
        stop = whole_from + whole
        chosen = self.acc[whole_from:stop] if stop <= n else self.acc[whole_from:] + self.acc[: stop - n]
        return reduce(xor, chosen, 0), edges

    def realigned(self, boundaries: Sequence[int], scan: Scan) -> DigestIndex:
        """A new index over `boundaries` with the same digests: an interval no
        new boundary cuts moves whole (merged by XOR), one that is cut is
        re-read through scan and its records binned."""
        new = DigestIndex(boundaries)
        old = self.boundaries
        cut = {self.locate(b) for b in set(boundaries).difference(old)}
        for i, value in enumerate(self.acc):
            if i not in cut and value:
                new.acc[new.locate(old[i])] ^= value
        for i in sorted(cut):
            new.absorb(scan(old[i - 1], old[i]))
        return new

    def absorb(self, pairs: Iterable[tuple[int, int]]) -> None:
        """XOR (token, fingerprint) pairs in: records being added to the index."""
        acc, bounds, n = self.acc, self.boundaries, len(self.boundaries)
        for token, fp in pairs:
            index = bisect.bisect_left(bounds, token)
            acc[0 if index == n else index] ^= fp

    def to_bytes(self) -> bytes:
        """The index as stored beside the data at a clean close (LmdbStore)."""
        n = len(self.boundaries)
        return b"".join(
            [
                _SAVED_FORMAT,
                n.to_bytes(4, "big"),
                *(b.to_bytes(8, "big") for b in self.boundaries),
                *(a.to_bytes(16, "big") for a in self.acc),
            ]
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> DigestIndex | None:
        """An index saved by to_bytes; None for anything else (it is then rebuilt)."""
        if raw[:1] != _SAVED_FORMAT or len(raw) < 5:
            return None
        n = int.from_bytes(raw[1:5], "big")
        if n == 0 or len(raw) != 5 + 24 * n:
            return None
        acc_at = 5 + 8 * n
        index = cls([int.from_bytes(raw[i : i + 8], "big") for i in range(5, acc_at, 8)])
        index.acc = [int.from_bytes(raw[i : i + 16], "big") for i in range(acc_at, len(raw), 16)]
        return index

    def merge(self, other: DigestIndex) -> None:
        """XOR another index over the same boundaries into this one."""
        self.acc = [a ^ b for a, b in zip(self.acc, other.acc, strict=True)]


def _inside(token: int, start: int, end: int) -> bool:
    if start < end:
        return start < token <= end
    return token > start or token <= end


class _ClosedError(Exception):
    """The engine closed while the index was being built."""


class Snapshot(AbstractContextManager["Snapshot"]):
    """A consistent view of an engine's records, opened under its write lock."""

    def scan(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        raise NotImplementedError

    def __exit__(self, *exc: object) -> None:
        return None


class MaintainedDigests:
    """The digest index an engine keeps current.

    The engine holds `lock` around each write and its changed() call, after
    the write committed (a failed commit reports nothing). align() hands the
    worker the ring's arcs; the worker builds or re-cuts the index in the
    background: under the lock it opens a snapshot and starts a fresh index
    that every later write updates too, then outside the lock it adds what
    the snapshot holds. Until the first build is done, ready() is False and
    digests are computed by scanning.
    """

    def __init__(self, *, lock: threading.Lock, snapshot: Callable[[], Snapshot], parts: int, name: str) -> None:
        self.lock = lock
        self._snapshot = snapshot
        self._parts = parts
        self._name = name
        self._served: DigestIndex | None = None  # complete and current: queries read it
        self._building: DigestIndex | None = None  # writes since its snapshot; complete once absorbed
        self._wake = threading.Condition()
        self._target: list[tuple[int, int]] | None = None
        self._target_seq = 0
        self._done_seq = 0
        self._closed = False
        self._built = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_build_s = 0.0  # how long the last build or re-cut took (reported by benchmarks)
        # Bumped on every change and every swap of the served index: a digest
        # computed at one generation still holds while it is unchanged.
        self.generation = 0

    @property
    def tracking(self) -> bool:
        """Whether writes must report changes (no index built or being built: no)."""
        return self._served is not None or self._building is not None

    def changed(self, token: int, delta: int) -> None:
        """Caller holds lock, after its write committed."""
        if not delta:
            return
        self.generation += 1
        if self._served is not None:
            self._served.changed(token, delta)
        if self._building is not None:
            self._building.changed(token, delta)

    def restore(self, index: DigestIndex) -> None:
        """Serve an index saved at the last clean close (before any write or
        align): the first align() then re-cuts it instead of reading everything."""
        with self.lock:
            self._served = index
            self.generation += 1
        self._built.set()

    def saved(self) -> DigestIndex | None:
        """The complete index, to save at close (caller holds lock, after close())."""
        return self._served

    def ready(self) -> bool:
        return self._served is not None

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._built.wait(timeout)

    def wait_aligned(self, timeout: float | None = None) -> bool:
        """Wait until the worker has handled the last align() call; True if
        the index is then built (False: timed out, or the build failed)."""
        with self._wake:
            self._wake.wait_for(lambda: self._closed or self._done_seq == self._target_seq, timeout)
            return self._served is not None and self._done_seq == self._target_seq

    def index(self) -> DigestIndex | None:
        """The served index (read without the lock: a writer's XOR of one
        accumulator is atomic, and a re-cut swaps the whole object)."""
        return self._served

    def align(self, arcs: list[tuple[int, int]]) -> None:
        """Cut the index at these ring arcs and their sub-arcs (built first if
        it never was); returns at once, the worker does it."""
        with self._wake:
            if self._closed:
                return
            self._target = arcs
            self._target_seq += 1
            self._wake.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"{self._name}-digests", daemon=True)
                self._thread.start()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and self._done_seq == self._target_seq:
                    self._wake.wait()
                if self._closed:
                    return
                arcs, seq = self._target, self._target_seq
            assert arcs is not None
            try:
                self._rebuild(subarc_boundaries(arcs, self._parts))
            except _ClosedError:
                return
            except Exception:
                # The index is dropped (digests are scanned again) and rebuilt
                # from scratch at the next alignment.
                log.exception(
                    "%s: building the digest index failed; digests are scanned until the next ring change", self._name
                )
                with self.lock:
                    self._served = self._building = None
                    self.generation += 1
                self._built.clear()
            with self._wake:
                self._done_seq = seq
                self._wake.notify_all()

    def _interruptible(self, pairs: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
        """The pairs, until the engine closes: close() need not wait for a whole build."""
        for count, pair in enumerate(pairs):
            if not count % INTERRUPT_EVERY and self._closed:
                raise _ClosedError
            yield pair

    def _rebuild(self, boundaries: list[int]) -> None:
        started = time.monotonic()
        fresh = DigestIndex(boundaries)
        with self.lock:
            snapshot = self._snapshot()
            source = self._served
            copied: DigestIndex | None = None
            if source is not None:
                # Frozen at the snapshot: the served one keeps taking writes.
                copied = DigestIndex(source.boundaries)
                copied.acc = list(source.acc)
            self._building = DigestIndex(boundaries)
        with snapshot:
            if copied is None:
                fresh.absorb(self._interruptible(snapshot.scan(0, 0)))
            else:
                fresh = copied.realigned(boundaries, lambda start, end: self._interruptible(snapshot.scan(start, end)))
        with self.lock:
            building = self._building
            building.merge(fresh)
            self._served, self._building = building, None
            self.generation += 1
        self._built.set()
        self.last_build_s = time.monotonic() - started
        log.info("%s: digest index over %d intervals built in %.2f s", self._name, len(boundaries), self.last_build_s)
