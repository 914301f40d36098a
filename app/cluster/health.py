"""Reachability: which peers this node currently sees as answering.

Distinct from membership on purpose: a crashed node stays a member and keeps
its ranges; it is only marked down here, and routing reacts. Failed calls mark
a peer down; successful calls and the node's periodic probe mark it up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class PeerState:
    up: bool = True  # optimistic: a peer is reachable until a call says otherwise
    since: float = 0.0  # monotonic time of the last flip
    last_error: str = ""


class PeerHealth:
    def __init__(self, *, on_flip: Callable[[str, bool], None] | None = None) -> None:
        self._states: dict[str, PeerState] = {}
        self._on_flip = on_flip

    def _state(self, node_id: str) -> PeerState:
        state = self._states.get(node_id)
        if state is None:
            state = self._states[node_id] = PeerState(since=time.monotonic())
        return state

    def is_up(self, node_id: str) -> bool:
        state = self._states.get(node_id)
        return state is None or state.up

    def mark_up(self, node_id: str) -> None:
        state = self._state(node_id)
        if not state.up:
            state.up, state.since, state.last_error = True, time.monotonic(), ""
            if self._on_flip:
                self._on_flip(node_id, True)

    def mark_down(self, node_id: str, reason: str) -> None:
        state = self._state(node_id)
        state.last_error = reason
        if state.up:
            state.up, state.since = False, time.monotonic()
            if self._on_flip:
                self._on_flip(node_id, False)

    def down_peers(self) -> list[str]:
        return [node_id for node_id, state in self._states.items() if not state.up]

    def snapshot(self, node_id: str) -> PeerState:
        return self._state(node_id)

    def forget(self, node_id: str) -> None:
        self._states.pop(node_id, None)
