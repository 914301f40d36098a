"""A member list sent in a request body ({node id: base URL}), validated by
the same rules as --peers. Used by the peer route that takes a propagated
list and the admin route that starts a change."""

from __future__ import annotations

from app.config import parse_peers
from app.errors import ConfigError, InvalidRequestError


def requested_members(peers: object) -> dict[str, str]:
    if not isinstance(peers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in peers.items()):
        raise InvalidRequestError('peers must be an object of node id -> base URL: {"peers": {"node1": "http://..."}}')
    try:
        members = parse_peers(",".join(f"{node_id}={url}" for node_id, url in peers.items()))
    except ConfigError as exc:
        raise InvalidRequestError(str(exc).removeprefix("config: ")) from None
    if not members:
        raise InvalidRequestError("peers must name at least one member")
    return members
