"""What this build speaks to other nodes, and how it says so: the release, the
node-to-node protocol version, the oldest protocol it still talks to, and the
named capabilities it supports, carried in one header on every internal
request and answer (and on /health's answer, which probes read).

    x-kvstore-protocol: 2; min=1; release=0.2.0; capabilities=a,b

Fields are `;`-separated `name=value` pairs after the version; a field this
build does not know is ignored (a newer release may add some). A node that
sends no such header is release 0.1.0, protocol 1: that release predates the
header and ignores it. Pure: parsing and rendering only; what a node does
with a peer's protocol is app.cluster.capabilities'.
"""

from __future__ import annotations

from dataclasses import dataclass

from app import __version__

PROTOCOL_HEADER = "x-kvstore-protocol"
PROTOCOL = 2  # this build's node-to-node protocol: 0.2.0 added this header and nothing else to the wire
MIN_PEER_PROTOCOL = 1  # the oldest protocol this build still talks to: 0.1.0's (release X-1, see README)
# Named features that change what goes over the wire, used only once every
# member supports them (app.cluster.capabilities). 0.2.0 defines none: it is
# the release that makes them possible; the next wire change (a cheaper
# anti-entropy digest) is the first to add a name here.
CAPABILITIES: frozenset[str] = frozenset()

LEGACY_PROTOCOL = 1  # what a node that sends no header speaks
LEGACY_RELEASE = "0.1.0"  # and what it runs


@dataclass(frozen=True, slots=True)
class PeerProtocol:
    """What one node speaks, as its header says (or the legacy default)."""

    protocol: int
    min_protocol: int
    release: str
    capabilities: frozenset[str] = frozenset()

    def render(self) -> str:
        """The header value."""
        value = f"{self.protocol}; min={self.min_protocol}; release={self.release}"
        if self.capabilities:
            value += "; capabilities=" + ",".join(sorted(self.capabilities))
        return value

    def incompatible_with(self, other: PeerProtocol) -> str | None:
        """Why this node cannot talk to `other` (too old or too new), or None."""
        if other.protocol < self.min_protocol:
            return (
                f"too old: it runs kvstore {other.release} (protocol {other.protocol}); this node runs "
                f"{self.release} and talks to protocol {self.min_protocol} and newer: upgrade it"
            )
        if other.min_protocol > self.protocol:
            return (
                f"too new: it runs kvstore {other.release}, which talks to protocol {other.min_protocol} and newer; "
                f"this node runs {self.release} (protocol {self.protocol}): upgrade this node first, one release "
                "at a time"
            )
        return None


OWN = PeerProtocol(protocol=PROTOCOL, min_protocol=MIN_PEER_PROTOCOL, release=__version__, capabilities=CAPABILITIES)
LEGACY = PeerProtocol(protocol=LEGACY_PROTOCOL, min_protocol=LEGACY_PROTOCOL, release=LEGACY_RELEASE)


def parse(value: str | None) -> PeerProtocol:
    """A peer's protocol from its header value; None (no header) is 0.1.0.
    Raises ValueError on a header that is there but unreadable: such a peer is
    treated as unreachable, never guessed at."""
    if value is None:
        return LEGACY
    head, *fields = value.split(";")
    protocol = int(head.strip())
    options: dict[str, str] = {}
    for field in fields:
        name, sep, setting = field.strip().partition("=")
        if sep:
            options[name.strip()] = setting.strip()
    min_protocol = int(options.get("min", protocol))
    if protocol < 1 or not 1 <= min_protocol <= protocol:
        raise ValueError(f"protocol {protocol}, min {min_protocol}: not a version range")
    capabilities = frozenset(name for name in options.get("capabilities", "").split(",") if name)
    return PeerProtocol(
        protocol=protocol,
        min_protocol=min_protocol,
        release=options.get("release", "unknown"),
        capabilities=capabilities,
    )
