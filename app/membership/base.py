"""The membership-source interface and the sink a node offers it.

A source pushes complete member lists (node id -> base URL) and, if it knows,
each peer's readiness. Members drive the ring (and rebalancing); readiness
only drives routing (reachability), never membership.
"""

from __future__ import annotations

import abc
from typing import Protocol


class MembershipSink(Protocol):
    async def set_members(self, members: dict[str, str]) -> None:
        """Adopt a complete new member list."""

    def set_peer_ready(self, node_id: str, ready: bool) -> None:
        """A peer's readiness as the source sees it (routing only)."""

    def record_source_error(self, reason: str) -> None:
        """The source failed to read or watch; it keeps the last known view."""


class MembershipSource(abc.ABC):
    @abc.abstractmethod
    async def run(self, sink: MembershipSink) -> None:
        """Feed the sink until cancelled. Must not raise on transient errors:
        keep the last known members and retry with backoff."""

    async def refresh(self, sink: MembershipSink) -> None:  # noqa: B027 - static sources have nothing to re-read
        """Re-read the source now (a node about to exit checks whether it left)."""

    def status(self) -> dict[str, object]:
        """What /ring shows about the source (kind, staleness, errors)."""
        return {}

    def staleness_s(self) -> float:
        """Seconds since the source last confirmed its view (0: always fresh)."""
        return 0.0
