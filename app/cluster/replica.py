"""The replica side of a node: what the internal routes (and the in-process
fake transport) call on the node that holds a key's copy. Reads and writes the
local store, holds hints for other nodes, answers digests and range fetches
for anti-entropy and rebalancing. Never forwards anything.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from app.clock import HybridClock, wall_ms
from app.ring import ArcSet, stable_hash
from app.storage.base import DIGEST_BYTES, Record, Store, fingerprint
from app.storage.hints import HintStore
from app.transport.base import ReadAnswer, WriteAck

FULL_SCAN_ABOVE_ARCS = 64  # past this many arcs one pass over the store beats a range scan per arc


class Replica:
    def __init__(self, *, store: Store, hints: HintStore, clock: HybridClock) -> None:
        self.store = store
        self.hints = hints
        self.clock = clock
        self.syncing = ArcSet(())  # ranges still being pulled after a membership change

    def read(self, key: bytes) -> ReadAnswer:
        record = self.store.get(key)
        if self.syncing.arcs and stable_hash(key) in self.syncing:
            return ReadAnswer(record, authoritative=False)
        return ReadAnswer(record)

    async def write(self, key: bytes, record: Record, *, hint_for: str | None = None) -> WriteAck:
        """Apply (or hold for hint_for) a write; return once durable under the policy."""
        self.clock.observe(record.version)
        if hint_for is not None:
            self.hints.add(hint_for, key, record)
            await _durable(self.hints.wait_durable())
            return WriteAck(applied=True, existed=False)
        result = self.store.apply(key, record)
        await _durable(self.store.wait_durable())
        previous = result.previous
        return WriteAck(applied=result.applied, existed=previous is not None and previous.live(wall_ms()))

    def read_many(self, keys: list[bytes]) -> list[ReadAnswer]:
        return [self.read(key) for key in keys]

    async def write_many(self, writes: list[tuple[bytes, Record, str | None]]) -> list[WriteAck]:
        """Several writes (coalesced by the sender), each as `write` would
        apply it; one wait for durability covers them all."""
        acks = []
        held = applied_here = False
        now = wall_ms()
        for key, record, hint_for in writes:
            self.clock.observe(record.version)
            if hint_for is not None:
                self.hints.add(hint_for, key, record)
                acks.append(WriteAck(applied=True, existed=False))
                held = True
            else:
                result = self.store.apply(key, record)
                previous = result.previous
                acks.append(WriteAck(applied=result.applied, existed=previous is not None and previous.live(now)))
                applied_here = True
        if applied_here:
            await _durable(self.store.wait_durable())
        if held:
            await _durable(self.hints.wait_durable())
        return acks

    async def write_batch(self, records: list[tuple[bytes, Record]]) -> int:
        applied = 0
        for key, record in records:
            self.clock.observe(record.version)
            applied += self.store.apply(key, record).applied
        await _durable(self.store.wait_durable())
        return applied

    def records_in(self, arcs: list[tuple[int, int]]) -> Iterator[tuple[int, bytes, Record]]:
        """(arc index, key, record) for every stored record inside the arcs."""
        if len(arcs) > FULL_SCAN_ABOVE_ARCS:
            index = ArcSet(arcs)
            positions = {arc: i for i, arc in enumerate(arcs)}
            for key, record in self.store.iter_range(0, 0):
                found = index.locate(stable_hash(key))
                if found is not None:
                    yield positions[index.arcs[found]], key, record
        else:
            for i, (start, end) in enumerate(arcs):
                for key, record in self.store.iter_range(start, end):
                    yield i, key, record

    def digests(self, arcs: list[tuple[int, int]]) -> list[bytes]:
        """One digest per arc (the same function as Store.digest, computed in
        one pass when there are many arcs); blocking: callers use a thread."""
        if len(arcs) <= FULL_SCAN_ABOVE_ARCS:
            return [self.store.digest(start, end) for start, end in arcs]
        sums = [0] * len(arcs)
        for i, key, record in self.records_in(arcs):
            sums[i] ^= fingerprint(key, record.version.hlc, record.version.node.encode())
        return [value.to_bytes(DIGEST_BYTES, "big") for value in sums]

    def range(self, arcs: list[tuple[int, int]]) -> list[tuple[bytes, Record]]:
        """Every record inside the arcs; blocking (callers run it in a thread)."""
        return [(key, record) for _, key, record in self.records_in(arcs)]


async def _durable(waiter: object) -> None:
    if waiter is not None:
        await asyncio.wrap_future(waiter)  # type: ignore[arg-type]
