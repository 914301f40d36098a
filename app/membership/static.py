"""The static membership source: the --peers list, given once at start.
Later changes arrive through POST /admin/membership (app.web.routes_admin)."""

from __future__ import annotations

from app.membership.base import MembershipSink, MembershipSource


class StaticMembership(MembershipSource):
    def __init__(self, peers: dict[str, str]) -> None:
        self.peers = dict(peers)

    async def run(self, sink: MembershipSink) -> None:
        await sink.set_members(self.peers)

    def status(self) -> dict[str, object]:
        return {"kind": "static"}
