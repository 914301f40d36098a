"""Reachability and load of each peer, as this node sees them.

Distinct from membership on purpose: a crashed node stays a member and keeps
its ranges; it is only marked down here, and routing reacts. Failed calls mark
a peer down; successful calls and the node's periodic probe mark it up.
Outstanding requests and a latency EWMA per peer drive replica choice for
reads (power of two choices), so a slow node sheds read load.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.errors import PeerError, PeerUnavailableError

EWMA_WEIGHT = 0.2  # each new sample moves the average a fifth of the way: reacts within ~10 calls
INITIAL_LATENCY_S = 0.001  # a peer we have not timed yet is assumed fast, so it gets tried
# The latency EWMA already includes queueing at the peer, so outstanding
# requests only nudge the score: 64 in flight (a full pool) double it. Scoring
# (outstanding + 1) x latency double-counted the queue: under 64-way load the
# busy healthy peer looked as slow as a peer slowed by 20 ms, and ~4% of reads
# went to the slow one (BENCHMARKS.md, replication: the slowed-replica p99).
OUTSTANDING_SCALE = 64
# A reachable peer not asked for this long gets the next read, so the estimate
# of a peer that was slow and recovered is refreshed: about one read a second
# per peer, far under 1% of a loaded node's reads, so it never shows in p99.
EXPLORE_AFTER_S = 1.0


@dataclass
class PeerState:
    up: bool = True  # optimistic: a peer is reachable until a call says otherwise
    since: float = 0.0  # monotonic time of the last flip
    last_error: str = ""
    outstanding: int = 0
    latency_s: float = INITIAL_LATENCY_S
    source_ready: bool = True  # the membership source's word (a pod's Ready condition); probes cannot overrule it
    last_asked: float = 0.0  # monotonic time a read was last sent (or promised) to it

    @property
    def load_score(self) -> float:
        """Lower is better: recent response time, nudged up by the requests in flight."""
        return self.latency_s * (1 + self.outstanding / OUTSTANDING_SCALE)


class PeerHealth:
    def __init__(
        self,
        *,
        on_flip: Callable[[str, bool], None] | None = None,
        rng: random.Random | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._states: dict[str, PeerState] = {}
        self._on_flip = on_flip
        self._rng = rng or random.Random()
        self._monotonic = monotonic

    def _state(self, node_id: str) -> PeerState:
        state = self._states.get(node_id)
        if state is None:
            state = self._states[node_id] = PeerState(since=time.monotonic())
        return state

    def is_up(self, node_id: str) -> bool:
        state = self._states.get(node_id)
        return state is None or (state.up and state.source_ready)

    def set_source_ready(self, node_id: str, ready: bool) -> None:
        """Readiness as the membership source reports it (Kubernetes: the pod's
        Ready condition). Routing avoids a not-ready peer even while it answers
        probes; it still serves range pulls, which do not consult health."""
        state = self._state(node_id)
        was = state.up and state.source_ready
        state.source_ready = ready
        if not ready and state.up:
            state.last_error = "its pod is not ready"
        now = state.up and state.source_ready
        if was != now and self._on_flip:
            self._on_flip(node_id, now)

    def mark_up(self, node_id: str) -> None:
        state = self._state(node_id)
        if not state.up:
            state.up, state.since, state.last_error = True, time.monotonic(), ""
            if self._on_flip:
                self._on_flip(node_id, self.is_up(node_id))

    def mark_down(self, node_id: str, reason: str) -> None:
        state = self._state(node_id)
        state.last_error = reason
        if state.up:
            state.up, state.since = False, time.monotonic()
            if self._on_flip:
                self._on_flip(node_id, self.is_up(node_id))

    def call_failed(self, node_id: str, error: PeerError) -> None:
        """A call to the peer failed: only no answer at all says it is down
        (a refusal or a garbled answer comes from a peer that is up)."""
        if isinstance(error, PeerUnavailableError):
            self.mark_down(node_id, str(error))

    def begin(self, node_id: str) -> float:
        state = self._state(node_id)
        state.outstanding += 1
        state.last_asked = self._monotonic()
        return time.perf_counter()

    def end(self, node_id: str, started: float) -> None:
        state = self._state(node_id)
        state.outstanding -= 1
        state.latency_s += EWMA_WEIGHT * ((time.perf_counter() - started) - state.latency_s)

    def rank(self, node_ids: list[str]) -> list[str]:
        """Order replicas for a read: reachable before unreachable, and among
        reachable ones by repeated power-of-two-choices on the load score (two
        random candidates, the less loaded goes next), which spreads load
        without herding every coordinator onto the single fastest peer. A
        reachable peer not asked for EXPLORE_AFTER_S goes first, once."""
        pool = [n for n in node_ids if self.is_up(n)]
        ordered: list[str] = []
        now = self._monotonic()
        for node_id in pool:
            state = self._state(node_id)
            if now - state.last_asked > EXPLORE_AFTER_S:
                state.last_asked = now  # promised now: concurrent reads do not all explore it
                ordered.append(node_id)
                pool.remove(node_id)
                break
        while len(pool) > 1:
            a, b = self._rng.sample(pool, 2)
            pick = a if self._state(a).load_score <= self._state(b).load_score else b
            ordered.append(pick)
            pool.remove(pick)
        ordered.extend(pool)
        ordered.extend(n for n in node_ids if not self.is_up(n))
        return ordered

    def down_peers(self) -> list[str]:
        return [node_id for node_id, state in self._states.items() if not state.up]

    def snapshot(self, node_id: str) -> PeerState:
        return self._state(node_id)

    def forget(self, node_id: str) -> None:
        self._states.pop(node_id, None)
