"""Reachability and load of each peer, as this node sees them.

Distinct from membership on purpose: a crashed node stays a member and keeps
its ranges; it is only marked down here, and routing reacts. Calls that get
no answer mark a peer down; any answer, a request from the peer, and the
node's periodic probe mark it up again at once (the speed of evidence).
Outstanding requests and a latency EWMA per peer drive replica choice for
reads (power of two choices), so a slow node sheds read load. A recent-latency
window gives each peer a p95: a read not answered by then is hedged to
another replica (Cassandra's speculative retry, "The Tail at Scale"'s hedged
requests), and a peer that owes answers and has given none for longer than
its suspect delay is marked down by trip_silent(), without waiting for each
call's timeout (a circuit breaker; the node runs it four times a second, so
no call pays for a timer of its own).
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

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
# Hedging: a read is sent to the next replica once its replica has taken
# longer than its own recent p95. Never sooner than the floor: answers under
# load take a few ms on loopback, and each hedge is one more read.
HEDGE_FLOOR_S = 0.010
LATENCY_WINDOW = 64  # answered calls kept per peer for its p95
P95_EVERY = 16  # recompute the p95 every this many samples: a sort of 64 floats, not one per call
# A peer with calls pending that has answered none of them for this long is
# marked down: a hung peer (accepting, never answering) is noticed in a
# fraction of a second, not after a peer timeout per call. The delay is
# generous (a GC pause or a burst on a healthy peer must not trip it), and any
# answer or request from the peer brings it back at once.
SUSPECT_FLOOR_S = 0.2
SUSPECT_FACTOR = 4  # x the peer's p95


@dataclass
class PeerState:
    up: bool = True  # optimistic: a peer is reachable until a call says otherwise
    since: float = 0.0  # monotonic time of the last flip
    last_error: str = ""
    outstanding: int = 0
    latency_s: float = INITIAL_LATENCY_S
    source_ready: bool = True  # the membership source's word (a pod's Ready condition); probes cannot overrule it
    incompatible: str | None = None  # why its protocol cannot be spoken (app.cluster.capabilities); keeps it down
    last_asked: float = 0.0  # monotonic time a read was last sent (or promised) to it
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))  # answered calls' latencies
    p95_s: float = HEDGE_FLOOR_S
    unsorted: int = 0  # samples since the p95 was computed
    waiting_since: float = (
        0.0  # monotonic: since when it has owed an answer and given none (meaningful while outstanding)
    )

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

    def set_incompatible(self, node_id: str, reason: str | None) -> None:
        """A peer too old or too new to talk to (reason), or no longer (None).
        It is down while incompatible, whatever probes and requests say; once
        compatible again the next probe or request brings it back."""
        state = self._state(node_id)
        state.incompatible = reason
        if reason is not None:
            self.mark_down(node_id, f"incompatible: {reason}")

    def mark_up(self, node_id: str) -> None:
        state = self._state(node_id)
        if not state.up and state.incompatible is None:
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
        now = self._monotonic()
        if state.outstanding == 0:
            state.waiting_since = now
        state.outstanding += 1
        state.last_asked = now
        return time.perf_counter()

    def end(self, node_id: str, started: float, *, answered: bool = True) -> None:
        """A call begun at `started` is over; only answered ones shape the p95."""
        state = self._state(node_id)
        state.outstanding -= 1
        elapsed = time.perf_counter() - started
        state.latency_s += EWMA_WEIGHT * (elapsed - state.latency_s)
        if answered:
            state.waiting_since = self._monotonic()  # it answers: any silence starts over
            state.recent.append(elapsed)
            state.unsorted += 1
            if state.unsorted >= P95_EVERY:
                ranked = sorted(state.recent)
                state.p95_s = max(HEDGE_FLOOR_S, ranked[int(0.95 * (len(ranked) - 1))])
                state.unsorted = 0

    def hedge_delay(self, node_id: str) -> float:
        """How long a read waits for this peer before asking another replica."""
        state = self._states.get(node_id)
        return HEDGE_FLOOR_S if state is None else state.p95_s

    def suspect_after(self, node_id: str) -> float:
        """How long a call may go unanswered before it counts against the peer."""
        return max(SUSPECT_FLOOR_S, SUSPECT_FACTOR * self.hedge_delay(node_id))

    def trip_silent(self) -> list[str]:
        """Mark down every peer that owes answers and has given none for
        longer than its suspect delay; returns their ids."""
        now = self._monotonic()
        tripped = []
        for node_id, state in list(self._states.items()):
            silent = now - state.waiting_since
            if state.up and state.outstanding > 0 and silent > self.suspect_after(node_id):
                self.mark_down(node_id, f"no answer for {silent * 1000:.0f} ms with {state.outstanding} calls pending")
                tripped.append(node_id)
        return tripped

    def heard_from(self, node_id: str) -> None:
        """The peer sent us a request: it is up, whatever we last concluded."""
        if node_id in self._states:
            self.mark_up(node_id)

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

    def state(self, node_id: str) -> PeerState:
        return self._state(node_id)

    def forget(self, node_id: str) -> None:
        self._states.pop(node_id, None)
