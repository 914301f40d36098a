"""The replica side of a node: what the internal routes (and the in-process
fake transport) call on the node that holds a key's copy. Reads and writes the
local store, holds hints for other nodes, answers digests and range fetches
for anti-entropy and rebalancing. Never forwards anything.

Every version that arrives advances the node's clock first; one from further
ahead than --max-clock-offset is refused (FutureVersionError) before anything
is applied, whether it comes alone, coalesced or in a batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

from app.clock import HybridClock, wall_ms
from app.coalesce import Coalescer, DurableWaits
from app.errors import DigestsBuildingError
from app.ring import ArcSet, stable_hash
from app.storage.base import DIGEST_BYTES, ApplyResult, Record, Store
from app.storage.hints import HintStore
from app.transport.base import ReadAnswer, WriteAck, ack_for

HELD = WriteAck(applied=True, existed=False)  # a hint taken: what the target holds is not known here
APPLY_CHUNK = 2000  # records per storage transaction when applying a pulled batch (~10 ms in LMDB)
FULL_SCAN_ABOVE_ARCS = 64  # past this many arcs one pass over the store beats a range scan per arc
DIGEST_CHUNK = 256  # arcs digested between GIL releases (~0.5 ms of index lookups)
COMBINED_CACHE_SIZE = 64  # combined digests kept (one per peer and ring); cleared when full


class Replica:
    def __init__(self, *, store: Store, hints: HintStore, clock: HybridClock) -> None:
        self.store = store
        self.hints = hints
        self.clock = clock
        self.syncing = ArcSet(())  # ranges still being pulled after a membership change
        # Writes arriving in one event-loop turn are applied together in one
        # storage transaction (one commit instead of one per write); each is
        # acknowledged only once that transaction committed and (--fsync
        # always) a sync covered it. Every writer of a turn, whichever path
        # it came by, shares one durable wait per store.
        self._applies: Coalescer[tuple[bytes, Record], ApplyResult] = Coalescer(self._apply_batch)
        self._store_durable = DurableWaits(store.wait_durable)
        self._hints_durable = DurableWaits(hints.wait_durable)
        # id(arcs) -> (arcs, digest generation, combined digest); see combined_digest
        self._combined: dict[int, tuple[list[tuple[int, int]], int, bytes]] = {}

    def read(self, key: bytes) -> ReadAnswer:
        record = self.store.get(key)
        if self.syncing.arcs and stable_hash(key) in self.syncing:
            return ReadAnswer(record, authoritative=False)
        return ReadAnswer(record)

    async def write(self, key: bytes, record: Record, *, hint_for: str | None = None) -> WriteAck:
        """Apply (or hold for hint_for) a write; return once durable under the policy.
        The ack says whether the replica kept a newer version instead."""
        self.clock.observe(record.version)
        if hint_for is not None:
            self.hints.add(hint_for, key, record)
            await self._hints_durable.wait()
            return HELD
        result = await self._applies.submit((key, record))  # committed and durable
        return ack_for(record, applied=result.applied, previous=result.previous, now_ms=wall_ms())

    def write_soon(self, key: bytes, record: Record) -> asyncio.Future[WriteAck]:
        """write() of a record without a hint, as a future of its ack: the
        coordinator's own copy of a write, without a task (~3 us) per write.
        Resolves, like write(), once the record is committed and durable."""
        self.clock.observe(record.version)
        applied = self._applies.enqueue((key, record))
        ack: asyncio.Future[WriteAck] = asyncio.get_running_loop().create_future()

        def answer(done: asyncio.Future[ApplyResult]) -> None:
            if ack.done():
                return
            if done.cancelled():
                ack.cancel()
            elif (exc := done.exception()) is not None:
                ack.set_exception(exc)
            else:
                result = done.result()
                ack.set_result(ack_for(record, applied=result.applied, previous=result.previous, now_ms=wall_ms()))

        applied.add_done_callback(answer)
        return ack

    async def _apply_batch(self, writes: list[tuple[bytes, Record]]) -> list[ApplyResult]:
        """One transaction, then one durable wait for the batch: its writers
        wake once, when both are done (a failed sync fails each of them)."""
        results = self.store.apply_many(writes)
        await self._store_durable.wait()
        return results

    def read_many(self, keys: list[bytes]) -> list[ReadAnswer]:
        return [self.read(key) for key in keys]

    async def write_many(self, writes: list[tuple[bytes, Record, str | None]]) -> list[WriteAck]:
        """Several writes (coalesced by the sender), each as `write` would
        apply it; one wait for durability covers them all."""
        acks: dict[int, WriteAck] = {}
        local: list[tuple[int, bytes, Record]] = []  # applied together, in one transaction
        now = wall_ms()
        for _, record, _ in writes:
            self.clock.observe(record.version)  # all checked before any is applied
        for position, (key, record, hint_for) in enumerate(writes):
            if hint_for is not None:
                self.hints.add(hint_for, key, record)
                acks[position] = HELD
            else:
                local.append((position, key, record))
        if local:
            results = self.store.apply_many([(key, record) for _, key, record in local])
            for (position, _, record), result in zip(local, results, strict=True):
                acks[position] = ack_for(record, applied=result.applied, previous=result.previous, now_ms=now)
            await self._store_durable.wait()
        if len(local) < len(writes):
            await self._hints_durable.wait()
        return [acks[position] for position in range(len(writes))]

    async def write_batch(self, records: list[tuple[bytes, Record]]) -> int:
        for _, record in records:
            self.clock.observe(record.version)
        applied = sum(result.applied for result in self.store.apply_many(records))
        await self._store_durable.wait()
        return applied

    async def write_pulled(self, records: list[tuple[bytes, Record]]) -> tuple[int, int]:
        """Apply a rebalancing batch (last writer wins) in a worker thread, in
        transactions of APPLY_CHUNK so a client write never waits behind one
        long commit. Returns (applied, new keys): a pull's contribution to what
        this node holds."""
        if not records:
            return 0, 0
        self.clock.observe(max(record.version for _, record in records))  # the highest checks them all

        def apply() -> tuple[int, int]:
            applied = new = 0
            for i in range(0, len(records), APPLY_CHUNK):
                for result in self.store.apply_many(records[i : i + APPLY_CHUNK]):
                    applied += result.applied
                    new += result.applied and result.previous is None
            return applied, new

        counts = await asyncio.to_thread(apply)
        await self._store_durable.wait()
        return counts

    def syncing_arcs(self) -> list[tuple[int, int]]:
        return list(self.syncing.arcs)

    def _indexed_records(self, arcs: list[tuple[int, int]]) -> Iterator[tuple[int, bytes, Record]]:
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

    def digests_ready(self) -> bool:
        """Whether the store answers digests from its maintained index."""
        return self.store.digests_ready()

    def digests(self, arcs: list[tuple[int, int]]) -> list[bytes]:
        """One digest per arc (the same function as Store.digest): from the
        store's maintained index once built (no record read for an arc cut at
        its boundaries), else by reading each arc. Before the index is built,
        more than FULL_SCAN_ABOVE_ARCS arcs at once (anti-entropy's requests)
        are refused with DigestsBuildingError: profiled at 1M keys, peers whose
        index was ready sent those to a node still building, and each cost a
        whole-store read (~3 s of CPU) in client latency. Blocking: callers
        use a thread."""
        if len(arcs) > FULL_SCAN_ABOVE_ARCS and not self.store.digests_ready():
            raise DigestsBuildingError(
                f"this node's digest index is still being built; ask for {len(arcs)} arcs' digests again later"
            )
        return [self.store.digest(start, end) for start, end in arcs]

    def combined_digest(self, arcs: list[tuple[int, int]]) -> bytes:
        """The XOR of the arcs' digests: the digest of every record in them,
        one value to compare for all of them. Kept while the store's digest
        generation is unchanged (an idle or read-only node recomputes
        nothing); computed DIGEST_CHUNK arcs at a time, with the GIL let go
        between chunks. Blocking: callers use a thread."""
        generation = self.store.digest_generation()  # before computing: a racing change invalidates
        cached = self._combined.get(id(arcs))
        if generation is not None and cached is not None and cached[0] is arcs and cached[1] == generation:
            return cached[2]
        acc = 0
        for i in range(0, len(arcs), DIGEST_CHUNK):
            for digest in self.digests(arcs[i : i + DIGEST_CHUNK]):
                acc ^= int.from_bytes(digest, "big")
            time.sleep(0)  # releases the GIL: the event loop's thread never waits for a whole pass
        combined = acc.to_bytes(DIGEST_BYTES, "big")
        if generation is not None:
            if len(self._combined) >= COMBINED_CACHE_SIZE:
                self._combined.clear()
            self._combined[id(arcs)] = (arcs, generation, combined)
        return combined

    def records_in_arcs(self, arcs: list[tuple[int, int]]) -> list[tuple[bytes, Record]]:
        """Every record inside the arcs; blocking (callers run it in a thread)."""
        return [(key, record) for _, key, record in self._indexed_records(arcs)]
