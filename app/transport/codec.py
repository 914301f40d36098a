"""Binary framing for bulk replica traffic (anti-entropy, rebalancing, hint
delivery): lists of arcs, digests and records. Pure: struct and bytes only.

A record frame: >H key length, >I value length (NO_VALUE for a tombstone),
>Q hlc, >Q expiry ms, >B node-id length, then key, node id, value.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from app.clock import Version
from app.storage.base import DIGEST_BYTES, Record

_ARC = struct.Struct(">QQ")
_HEAD = struct.Struct(">HIQQB")
NO_VALUE = 0xFFFFFFFF


def encode_arcs(arcs: Iterable[tuple[int, int]]) -> bytes:
    return b"".join(_ARC.pack(start, end) for start, end in arcs)


def decode_arcs(data: bytes) -> list[tuple[int, int]]:
    if len(data) % _ARC.size:
        raise ValueError("arc list is not a whole number of (start, end) pairs")
    return [_ARC.unpack_from(data, offset) for offset in range(0, len(data), _ARC.size)]


def encode_digests(digests: Iterable[bytes]) -> bytes:
    return b"".join(digests)


def decode_digests(data: bytes) -> list[bytes]:
    if len(data) % DIGEST_BYTES:
        raise ValueError("digest list is not a whole number of digests")
    return [data[offset:offset + DIGEST_BYTES] for offset in range(0, len(data), DIGEST_BYTES)]


def encode_records(records: Iterable[tuple[bytes, Record]]) -> bytes:
    parts: list[bytes] = []
    for key, record in records:
        node = record.version.node.encode()
        value = record.value
        parts.append(_HEAD.pack(len(key), NO_VALUE if value is None else len(value),
                                record.version.hlc, record.expires_at_ms, len(node)))
        parts.append(key)
        parts.append(node)
        if value:
            parts.append(value)
    return b"".join(parts)


def decode_records(data: bytes) -> list[tuple[bytes, Record]]:
    records = []
    offset, size = 0, len(data)
    while offset < size:
        if offset + _HEAD.size > size:
            raise ValueError("truncated record frame")
        key_len, value_len, hlc, expires, node_len = _HEAD.unpack_from(data, offset)
        offset += _HEAD.size
        key = data[offset:offset + key_len]
        offset += key_len
        node = data[offset:offset + node_len].decode()
        offset += node_len
        if value_len == NO_VALUE:
            value = None
        else:
            value = data[offset:offset + value_len]
            offset += value_len
            if len(value) != value_len:
                raise ValueError("truncated record value")
        if len(key) != key_len or offset > size:
            raise ValueError("truncated record frame")
        records.append((key, Record(Version(hlc, node), value, expires)))
    return records
