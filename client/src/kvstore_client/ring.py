"""The client's copy of the cluster's ring, built from a node's GET /ring/tokens.

Pure: no I/O. It places a key exactly as the nodes do (app/ring.py): the
hash the nodes name (only "blake2b-64-be" is known: BLAKE2b, 8-byte digest,
big-endian), the first token >= the hash (wrapping to the first), then the
first `replication_factor` distinct owners walking on. A view of a format or
hash this client does not know is refused (RingFormatError), and the clients
then route through any reachable node, which forwards correctly anyway.
Used by kvstore_client.routing.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_FORMAT = 1
SUPPORTED_HASH = "blake2b-64-be"
MAX_KEY_BYTES = 1024  # the nodes' limit (app/config.py MAX_KEY_BYTES); checked before sending


class RingFormatError(ValueError):
    """A /ring/tokens answer this client cannot use."""


def key_hash(key: bytes) -> int:
    """The nodes' stable_hash (app/ring.py), named "blake2b-64-be" in /ring/tokens."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


@dataclass(frozen=True)
class RingView:
    """One version of the ring: members' URLs, tokens, owners, replication factor."""

    epoch: str
    replication_factor: int
    urls: dict[str, str]  # node id -> URL
    tokens: list[int]
    owners: list[str]  # node id owning tokens[i]
    batch_max_keys: int = 256
    _walks: dict[int, tuple[str, ...]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def parse(cls, doc: Mapping[str, Any]) -> RingView:
        """Build a view from GET /ring/tokens; RingFormatError if it cannot be used."""
        try:
            if doc["format"] != SUPPORTED_FORMAT:
                raise RingFormatError(f"ring format {doc['format']!r}; this client reads {SUPPORTED_FORMAT}")
            if doc["hash"] != SUPPORTED_HASH:
                raise RingFormatError(f"ring hash {doc['hash']!r}; this client knows {SUPPORTED_HASH}")
            ids = [str(member["node_id"]) for member in doc["members"]]
            urls = {str(m["node_id"]): str(m["url"]).rstrip("/") for m in doc["members"]}
            tokens = [int(token) for token in doc["tokens"]]
            owners = [ids[int(index)] for index in doc["owners"]]
            rf = int(doc["replication_factor"])
            epoch = str(doc["epoch"])
            batch = doc.get("batch") or {}
            max_keys = int(batch.get("max_keys", 256))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            if isinstance(exc, RingFormatError):
                raise
            raise RingFormatError(f"malformed ring answer: {exc!r}") from None
        if not tokens or len(tokens) != len(owners) or tokens != sorted(tokens) or rf < 1:
            raise RingFormatError("malformed ring answer: tokens unsorted, empty, or not one owner each")
        return cls(epoch=epoch, replication_factor=rf, urls=urls, tokens=tokens, owners=owners, batch_max_keys=max_keys)

    def replicas(self, key: bytes) -> tuple[str, ...]:
        """The key's replicas (node ids), in ring order: its preference list."""
        index = bisect.bisect_left(self.tokens, key_hash(key))
        if index == len(self.tokens):
            index = 0
        walk = self._walks.get(index)
        if walk is None:
            walk = self._walks[index] = self._walk(index)
        return walk

    def _walk(self, start: int) -> tuple[str, ...]:
        wanted = min(self.replication_factor, len(self.urls))
        seen: dict[str, None] = {}
        count = len(self.owners)
        index = start
        while len(seen) < wanted and index < start + count:
            seen.setdefault(self.owners[index % count])
            index += 1
        return tuple(seen)
