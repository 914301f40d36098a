"""Clock offsets to each peer, as this node's probes measure them, and the
max-offset rule that decides whether this node's own clock can be trusted.

A probe reads a peer's wall clock (GET /internal/v1/clock) between two reads
of ours; the peer's answer minus our midpoint is its offset, give or take half
the round trip. As in CockroachDB (--max-offset): when most peers measured
recently sit further than the bound from us, the odd one out is us, so this
node stops coordinating writes and reports not-ready until its clock is back.
Fed by app.cluster.node's probe loop; read by the coordinator, /ready, /ring.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

FRESH_FOR_S = 10.0  # a sample older than this says nothing about now (the peer may be gone)
VERDICT_FOR_S = 0.1  # refusal() runs on every write: its answer is reused this long (probes come once a second)
MAX_TRUSTED_RTT_MS = 1000.0  # a probe slower than this measures the network, not the clock


@dataclass(frozen=True, slots=True)
class OffsetSample:
    offset_ms: float  # the peer's wall clock minus ours
    uncertainty_ms: float  # half the round trip: the true offset lies within offset ± this
    measured_at: float  # monotonic seconds


class ClockOffsets:
    def __init__(self, *, max_offset_ms: int, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.max_offset_ms = max_offset_ms
        self._monotonic = monotonic
        self._samples: dict[str, OffsetSample] = {}
        self._verdict: str | None = None
        self._verdict_until = -1.0

    def record(self, peer_id: str, *, sent_wall_ms: float, round_trip_ms: float, peer_wall_ms: float) -> None:
        """One probe: our wall clock when it left, how long it took, what the peer said."""
        if round_trip_ms > MAX_TRUSTED_RTT_MS:
            return
        midpoint = sent_wall_ms + round_trip_ms / 2
        self._samples[peer_id] = OffsetSample(peer_wall_ms - midpoint, round_trip_ms / 2, self._monotonic())
        self._verdict_until = -1.0

    def forget(self, peer_id: str) -> None:
        self._samples.pop(peer_id, None)
        self._verdict_until = -1.0

    def offset_ms(self, peer_id: str) -> float | None:
        sample = self._fresh().get(peer_id)
        return None if sample is None else sample.offset_ms

    def _fresh(self) -> dict[str, OffsetSample]:
        horizon = self._monotonic() - FRESH_FOR_S
        return {peer: sample for peer, sample in self._samples.items() if sample.measured_at >= horizon}

    def refusal(self) -> str | None:
        """Why this node must not coordinate writes, or None. Off when more
        than half of the peers measured recently are beyond the bound even
        allowing for each probe's uncertainty (with two nodes, one far peer
        is enough: neither can tell which clock is wrong, so both stop)."""
        now = self._monotonic()
        if now >= self._verdict_until:
            self._verdict, self._verdict_until = self._judge(), now + VERDICT_FOR_S
        return self._verdict

    def _judge(self) -> str | None:
        fresh = self._fresh()
        far = {
            peer: s.offset_ms for peer, s in fresh.items() if abs(s.offset_ms) - s.uncertainty_ms > self.max_offset_ms
        }
        if not fresh or len(far) * 2 <= len(fresh):
            return None
        shown = ", ".join(f"{peer} {offset / 1000:+.3f}s" for peer, offset in sorted(far.items()))
        return (
            f"clock: this node's clock is off from {len(far)} of {len(fresh)} peers by more than "
            f"--max-clock-offset ({self.max_offset_ms / 1000:g}s; their clocks minus ours: {shown}); "
            "fix its time sync (NTP): it serves again by itself once the offset is back within the bound"
        )
