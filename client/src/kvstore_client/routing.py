"""Where each call goes: the ring view, the load on each node, the refresh
decision and the retry schedule. Pure and shared by the two clients
(kvstore_client.sync, kvstore_client.aio), which do the I/O.

- A key's call goes to one of its replicas first, the least loaded by
  requests this client has outstanding there (as the nodes choose among
  replicas, app/cluster/health.py), ties broken at random; then to every other
  node, then the seeds: any node can coordinate any key, so a stale or
  missing view still reaches the data, one hop longer.
- A node that failed to answer (refused, reset, timed out) is tried last for
  SUSPECT_S, so callers do not each pay its timeout.
- The view is refreshed when an answer carries another epoch than the view's
  (x-kvstore-epoch) or a connection fails, at most once per
  REFRESH_INTERVAL_S and by one caller at a time: a failover seen by a
  thousand requests causes one refresh, not a thousand (a herd is what the
  trackers of redis-py and the Cassandra drivers complain about).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kvstore_client.ring import RingView

REFRESH_INTERVAL_S = 1.0  # at most one ring refresh per second per client (debounce)
SUSPECT_S = 1.0  # a node that failed is tried last this long (the nodes re-probe theirs every second)
BACKOFF_BASE_S = 0.01  # the first retry waits up to this much; each further one doubles it...
BACKOFF_CAP_S = 0.5  # ...up to this (full jitter: a random share of it, so retries do not march in step)
CONNECT_TIMEOUT_S = 1.0  # a loopback or LAN connect takes < 1 ms; longer means the node is gone
MIN_ATTEMPT_S = 0.25  # an attempt is never given less than this, unless less is left of the deadline
EPOCH_HEADER = "x-kvstore-epoch"


@dataclass
class Attempt:
    """One try of a call at one node: the URL, and how long it may take."""

    url: str
    timeout_s: float
    connect_s: float


class Router:
    """The routing state of one client. Safe to share between threads: the
    in-flight counters change under a lock (a lost update would skew the
    balance for good); the rest is replaced whole, or only advisory."""

    def __init__(
        self,
        seeds: Iterable[str],
        *,
        ring_aware: bool = True,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.seeds = [seed.rstrip("/") for seed in seeds]
        if not self.seeds:
            raise ValueError("kvstore_client: give at least one node URL")
        self.ring_aware = ring_aware
        self.clock = clock
        self.rng = rng or random.Random()
        self.view: RingView | None = None
        self.outstanding: dict[str, int] = {}
        self._counting = threading.Lock()
        self.suspect_until: dict[str, float] = {}
        self.refresh_wanted = ring_aware  # the first call fetches the ring
        self.refresh_hint: str | None = None  # a node that answered with another epoch: it knows the new ring
        self.last_refresh = -float("inf")
        self.refreshes = 0  # how many refreshes ran (tests and the bench read it)

    # -- choosing nodes --------------------------------------------------------

    def _rank(self, urls: Iterable[str], now: float) -> list[str]:
        """Healthy before suspect, then least outstanding, ties at random."""
        rand = self.rng.random
        return sorted(
            urls,
            key=lambda url: (self.suspect_until.get(url, 0.0) > now, self.outstanding.get(url, 0), rand()),
        )

    def replica_urls(self, key: bytes) -> list[str]:
        """The key's replicas' URLs (empty without a usable view)."""
        view = self.view
        if view is None:
            return []
        return [view.urls[node_id] for node_id in view.replicas(key)]

    def targets(self, key: bytes | None = None) -> list[str]:
        """Every node to try for a call, best first: the key's replicas, then the
        rest, and last the nodes that failed lately."""
        now = self.clock()
        first = self._rank(self.replica_urls(key), now) if key is not None else []
        rest = [url for url in self._all_urls() if url not in first]
        order = first + self._rank(rest, now)
        if not self.suspect_until:
            return order
        suspect = [url for url in order if self.suspect_until.get(url, 0.0) > now]
        return [url for url in order if url not in suspect] + suspect

    def _all_urls(self) -> list[str]:
        known = list(self.view.urls.values()) if self.view is not None else []
        return known + [seed for seed in self.seeds if seed not in known]

    def group(self, keys: Iterable[bytes]) -> dict[str, list[bytes]]:
        """Keys grouped by the node each should go to in a batch: one of its
        replicas, the least loaded counting the keys already given to it."""
        now = self.clock()
        view = self.view
        if view is None:
            return {self.targets()[0]: list(keys)}
        assigned: dict[str, int] = {}
        groups: dict[str, list[bytes]] = {}
        for key in keys:
            urls = self.replica_urls(key)
            url = min(
                urls,
                key=lambda u: (
                    self.suspect_until.get(u, 0.0) > now,
                    self.outstanding.get(u, 0) + assigned.get(u, 0),
                ),
            )
            assigned[url] = assigned.get(url, 0) + 1
            groups.setdefault(url, []).append(key)
        return groups

    def attempts(self, urls: list[str], deadline: float, *, skip: set[str] | None = None) -> Iterable[Attempt]:
        """Attempts over `urls` in turn (round and round) until the deadline,
        leaving out those the caller adds to `skip` meanwhile (a TLS failure
        will not heal by retrying). Each gets half of what is left (at least
        MIN_ATTEMPT_S), so a node that hangs leaves time for the next one."""
        skip = skip if skip is not None else set()
        index = 0
        while True:
            left = deadline - self.clock()
            candidates = [url for url in urls if url not in skip]
            if left <= 0 or not candidates:
                return
            timeout = min(left, max(left / 2, MIN_ATTEMPT_S))
            yield Attempt(candidates[index % len(candidates)], timeout, min(timeout, CONNECT_TIMEOUT_S))
            index += 1

    def backoff(self, retry: int, deadline: float) -> float:
        """Seconds to wait before retry number `retry` (1, 2, ...): capped, fully jittered,
        never past the deadline."""
        ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * (2 ** (retry - 1)))
        return max(0.0, min(self.rng.uniform(0, ceiling), deadline - self.clock()))

    # -- what answers tell us --------------------------------------------------

    def begin(self, url: str) -> None:
        with self._counting:
            self.outstanding[url] = self.outstanding.get(url, 0) + 1

    def end(self, url: str) -> None:
        with self._counting:
            self.outstanding[url] = self.outstanding.get(url, 1) - 1

    def answered(self, url: str, epoch: str | None) -> None:
        """A node answered (any status): it is up; its epoch may say the ring moved."""
        self.suspect_until.pop(url, None)
        moved = epoch is not None and (self.view is None or epoch != self.view.epoch)
        if self.ring_aware and moved and not self.refresh_wanted:
            self.refresh_wanted = True
            self.refresh_hint = url

    def failed(self, url: str) -> None:
        """A connection to url failed: try it last for a while, and look at the ring again."""
        self.suspect_until[url] = self.clock() + SUSPECT_S
        if self.ring_aware:
            self.refresh_wanted = True

    # -- refreshing the view ---------------------------------------------------

    def refresh_due(self) -> bool:
        return self.refresh_wanted and self.clock() - self.last_refresh >= REFRESH_INTERVAL_S

    def refresh_sources(self) -> list[str]:
        """Where to fetch the ring: the node that announced a new epoch, then any other."""
        self.last_refresh = self.clock()
        urls = self.targets()
        hint = self.refresh_hint
        if hint is not None and hint in urls:
            urls.remove(hint)
            urls.insert(0, hint)
        return urls

    def install(self, view: RingView) -> None:
        self.view = view
        self.refresh_wanted = False
        self.refresh_hint = None
        self.refreshes += 1
        # Nodes no longer in the ring keep no state here (but calls still in flight to one).
        live = set(view.urls.values()) | set(self.seeds)
        for url in [url for url in self.suspect_until if url not in live]:
            self.suspect_until.pop(url, None)
        with self._counting:
            for url in [url for url, count in self.outstanding.items() if url not in live and count <= 0]:
                del self.outstanding[url]

    def refresh_failed(self) -> None:
        """No node gave a usable ring: keep the old view (or none: route through
        any node) and try again after the interval."""
        self.refresh_hint = None
