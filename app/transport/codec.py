"""Binary framing for bulk replica traffic (anti-entropy, rebalancing, hint
delivery, coalesced single-key calls): lists of arcs, digests, records, keys
and per-call answers. Pure: struct and bytes only.

A record frame: >H key length, >I value length (NO_VALUE for a tombstone),
>Q hlc, >Q expiry ms, >B node-id length, then key, node id, value.
A coalesced write: >B hint length (0: a plain write), the hint's node id,
then a record frame; its answer is one byte of ACK_* flags, and with
ACK_NEWER the version the replica kept instead: >Q hlc, >B node-id length,
node id.
A coalesced read: >H key length, then key; its answer is one byte of READ_*
flags, then a record frame when READ_FOUND is set.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from app.clock import Version
from app.storage.base import DIGEST_BYTES, Record

_ARC = struct.Struct(">QQ")
_HEAD = struct.Struct(">HIQQB")
_KEY = struct.Struct(">H")
_HINT = struct.Struct(">B")
NO_VALUE = 0xFFFFFFFF
_VERSION = struct.Struct(">QB")
ACK_APPLIED, ACK_EXISTED, ACK_NEWER = 1, 2, 4
READ_FOUND, READ_SYNCING = 1, 2


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
    return [data[offset : offset + DIGEST_BYTES] for offset in range(0, len(data), DIGEST_BYTES)]


def _append_record(parts: list[bytes], key: bytes, record: Record) -> None:
    node = record.version.node.encode()
    value = record.value
    parts.append(
        _HEAD.pack(
            len(key), NO_VALUE if value is None else len(value), record.version.hlc, record.expires_at_ms, len(node)
        )
    )
    parts.append(key)
    parts.append(node)
    if value:
        parts.append(value)


def _decode_record(data: bytes, offset: int) -> tuple[bytes, Record, int]:
    """The record frame at offset, and the offset after it."""
    size = len(data)
    if offset + _HEAD.size > size:
        raise ValueError("truncated record frame")
    key_len, value_len, hlc, expires, node_len = _HEAD.unpack_from(data, offset)
    offset += _HEAD.size
    key = data[offset : offset + key_len]
    offset += key_len
    node = data[offset : offset + node_len].decode()
    offset += node_len
    if value_len == NO_VALUE:
        value = None
    else:
        value = data[offset : offset + value_len]
        offset += value_len
        if len(value) != value_len:
            raise ValueError("truncated record value")
    if len(key) != key_len or offset > size:
        raise ValueError("truncated record frame")
    return key, Record(Version(hlc, node), value, expires), offset


def encode_records(records: Iterable[tuple[bytes, Record]]) -> bytes:
    parts: list[bytes] = []
    for key, record in records:
        _append_record(parts, key, record)
    return b"".join(parts)


def decode_records(data: bytes) -> list[tuple[bytes, Record]]:
    records = []
    offset, size = 0, len(data)
    while offset < size:
        key, record, offset = _decode_record(data, offset)
        records.append((key, record))
    return records


def encode_writes(writes: Iterable[tuple[bytes, Record, str | None]]) -> bytes:
    """(key, record, hint_for) triples: hint_for names the node a held write is for."""
    parts: list[bytes] = []
    for key, record, hint_for in writes:
        hint = hint_for.encode() if hint_for else b""
        parts.append(_HINT.pack(len(hint)))
        parts.append(hint)
        _append_record(parts, key, record)
    return b"".join(parts)


def decode_writes(data: bytes) -> list[tuple[bytes, Record, str | None]]:
    writes = []
    offset, size = 0, len(data)
    while offset < size:
        (hint_len,) = _HINT.unpack_from(data, offset)
        offset += _HINT.size
        hint = data[offset : offset + hint_len].decode() if hint_len else None
        offset += hint_len
        key, record, offset = _decode_record(data, offset)
        writes.append((key, record, hint))
    return writes


def encode_acks(acks: Iterable[tuple[bool, bool, Version | None]]) -> bytes:
    """(applied, existed, newer version or None) per coalesced write."""
    parts: list[bytes] = []
    for applied, existed, newer in acks:
        flags = (ACK_APPLIED if applied else 0) | (ACK_EXISTED if existed else 0) | (ACK_NEWER if newer else 0)
        parts.append(bytes((flags,)))
        if newer is not None:
            node = newer.node.encode()
            parts.append(_VERSION.pack(newer.hlc, len(node)))
            parts.append(node)
    return b"".join(parts)


def decode_acks(data: bytes) -> list[tuple[bool, bool, Version | None]]:
    acks: list[tuple[bool, bool, Version | None]] = []
    offset, size = 0, len(data)
    while offset < size:
        flags = data[offset]
        offset += 1
        newer = None
        if flags & ACK_NEWER:
            if offset + _VERSION.size > size:
                raise ValueError("truncated write answer")
            hlc, node_len = _VERSION.unpack_from(data, offset)
            offset += _VERSION.size
            node = data[offset : offset + node_len]
            if len(node) != node_len:
                raise ValueError("truncated write answer")
            offset += node_len
            newer = Version(hlc, node.decode())
        acks.append((bool(flags & ACK_APPLIED), bool(flags & ACK_EXISTED), newer))
    return acks


def encode_keys(keys: Iterable[bytes]) -> bytes:
    return b"".join(_KEY.pack(len(key)) + key for key in keys)


def decode_keys(data: bytes) -> list[bytes]:
    keys = []
    offset, size = 0, len(data)
    while offset < size:
        if offset + _KEY.size > size:
            raise ValueError("truncated key frame")
        (key_len,) = _KEY.unpack_from(data, offset)
        offset += _KEY.size
        key = data[offset : offset + key_len]
        if len(key) != key_len:
            raise ValueError("truncated key")
        offset += key_len
        keys.append(key)
    return keys


def encode_read_answers(answers: Iterable[tuple[bytes, Record | None, bool]]) -> bytes:
    """(key, record or None, syncing) per key read."""
    parts: list[bytes] = []
    for key, record, syncing in answers:
        flags = (READ_FOUND if record is not None else 0) | (READ_SYNCING if syncing else 0)
        parts.append(bytes((flags,)))
        if record is not None:
            _append_record(parts, key, record)
    return b"".join(parts)


def decode_read_answers(data: bytes) -> list[tuple[Record | None, bool]]:
    """(record or None, syncing) in request order."""
    answers: list[tuple[Record | None, bool]] = []
    offset, size = 0, len(data)
    while offset < size:
        flags = data[offset]
        offset += 1
        record = None
        if flags & READ_FOUND:
            _, record, offset = _decode_record(data, offset)
        answers.append((record, bool(flags & READ_SYNCING)))
    return answers
