"""The backup file format: a versioned, self-checking stream of records.

Written by the node that serves GET /admin/backup (app.cluster.backup feeds
it records), copied byte for byte into a file by `kvstore backup`, read back
and verified chunk by chunk by `kvstore restore` and POST /admin/restore.
Pure: stdlib and zstandard only; no asyncio, web or network code.

    file    = header frame* trailer
    header  = MAGIC (16 bytes) | u32 length | JSON object (utf-8)
    chunk   = b"C" | u32 payload length | u32 raw length | u32 records | blake2b-128 | payload
    trailer = b"T" | u64 records | u32 chunks | blake2b-128
    error   = b"E" | u32 length | utf-8 message   (only in a server's stream, never in a finished file)

All integers are big-endian. The header's JSON carries "format" (FORMAT_VERSION),
"compression" ("zstd" or "none"), "created_ms", "cluster" and "nodes". A
chunk's checksum is blake2b (16 bytes) over its raw length, record count
and payload; its payload is its records, compressed as the header says; the
raw length is their size uncompressed (decompression is bounded by it). The
trailer's checksum is blake2b over the header's JSON and every chunk's
checksum in order: a chunk dropped, repeated or reordered, or a header
edited, fails it. A record, inside a payload:

    u32 key length | u32 value length (0xFFFFFFFF: a tombstone) | u64 hlc |
    u64 expires_at_ms (0: never) | u8 node length | key | node | value

The version is (hlc, node), as app.clock.Version orders it; expiry is an
absolute wall-clock time, so a restored TTL ends when the original would have.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

import zstandard

from app.clock import Version
from app.errors import BackupFormatError
from app.storage.base import Record

MAGIC = b"KVSTORE-BACKUP\r\n"  # 16 bytes; the CR LF catches a text-mode copy that rewrote line ends
FORMAT_VERSION = 1
COMPRESSIONS = ("zstd", "none")
# Measured (BENCHMARKS.md, "backup and restore"), 1M keys of 100 hex-digit values: 68 MB instead
# of 146 MB, for ~10% more time at full pace and none at the default pace. Backups
# are kept and shipped: the size is worth it.
DEFAULT_COMPRESSION = "zstd"
ZSTD_LEVEL = 3  # zstd's own default level
CHUNK_RAW_BYTES = 1 << 20  # records per chunk, by uncompressed size: a restore request's worth
MAX_HEADER_BYTES = 1 << 20  # a header is a small JSON object: anything bigger is not a backup
MAX_CHUNK_BYTES = 256 << 20  # bound on one chunk's payload and raw size (one record may be big)
CHECKSUM_BYTES = 16

CHUNK, TRAILER, ERROR = b"C", b"T", b"E"
_LEN = struct.Struct(">I")
_CHUNK = struct.Struct(">III")  # payload length, raw length, records
_TRAILER = struct.Struct(">QI")  # records, chunks
_RECORD = struct.Struct(">IIQQB")
_COUNTS = struct.Struct(">II")  # raw length, records: what a chunk's checksum covers besides the payload
TOMBSTONE = 0xFFFFFFFF


def checksum(*parts: bytes) -> bytes:
    digest = hashlib.blake2b(digest_size=CHECKSUM_BYTES)
    for part in parts:
        digest.update(part)
    return digest.digest()


# -- records ---------------------------------------------------------------------


def encode_records(records: Iterable[tuple[bytes, Record]]) -> bytes:
    parts: list[bytes] = []
    pack, append = _RECORD.pack, parts.append
    for key, record in records:
        node = record.version.node.encode()
        value = record.value
        append(
            pack(
                len(key),
                TOMBSTONE if value is None else len(value),
                record.version.hlc,
                record.expires_at_ms,
                len(node),
            )
        )
        append(key)
        append(node)
        if value:
            append(value)
    return b"".join(parts)


def decode_records(data: bytes) -> list[tuple[bytes, Record]]:
    """The records of an (uncompressed) payload; ValueError if it is malformed."""
    records: list[tuple[bytes, Record]] = []
    offset, size, head = 0, len(data), _RECORD.size
    unpack = _RECORD.unpack_from
    while offset < size:
        if offset + head > size:
            raise ValueError("a record's header is cut short")
        key_len, value_len, hlc, expires, node_len = unpack(data, offset)
        offset += head
        key = data[offset : offset + key_len]
        offset += key_len
        node = data[offset : offset + node_len].decode()
        offset += node_len
        value: bytes | None = None
        if value_len != TOMBSTONE:
            value = data[offset : offset + value_len]
            offset += value_len
        if offset > size:
            raise ValueError("a record is cut short")
        records.append((key, Record(Version(hlc, node), value, expires)))
    return records


# -- writing ---------------------------------------------------------------------


class BackupWriter:
    """Produces a backup's frames in order: header(), chunk() for each batch
    of records, trailer(). Keeps the counts and checksums the trailer needs."""

    def __init__(self, *, compression: str = DEFAULT_COMPRESSION) -> None:
        if compression not in COMPRESSIONS:
            raise BackupFormatError(
                f"backup: compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}"
            )
        self.compression = compression
        self._compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL) if compression == "zstd" else None
        self._trail = hashlib.blake2b(digest_size=CHECKSUM_BYTES)
        self.records = 0
        self.chunks = 0

    def header(self, meta: dict[str, Any]) -> bytes:
        body = json.dumps({"format": FORMAT_VERSION, "compression": self.compression, **meta}, sort_keys=True).encode()
        self._trail.update(body)
        return MAGIC + _LEN.pack(len(body)) + body

    def chunks_of(self, records: list[tuple[bytes, Record]]) -> Iterator[bytes]:
        """The records as one or more chunk frames of about CHUNK_RAW_BYTES each."""
        start, size = 0, 0
        for i, (key, record) in enumerate(records):
            size += _RECORD.size + len(key) + len(record.value or b"") + len(record.version.node)
            if size >= CHUNK_RAW_BYTES:
                yield self.chunk(records[start : i + 1])
                start, size = i + 1, 0
        if start < len(records):
            yield self.chunk(records[start:])

    def chunk(self, records: list[tuple[bytes, Record]]) -> bytes:
        raw = encode_records(records)
        payload = self._compressor.compress(raw) if self._compressor is not None else raw
        counts = _COUNTS.pack(len(raw), len(records))
        sum_ = checksum(counts, payload)
        self._trail.update(sum_)
        self.records += len(records)
        self.chunks += 1
        return CHUNK + _LEN.pack(len(payload)) + counts + sum_ + payload

    def trailer(self) -> bytes:
        return TRAILER + _TRAILER.pack(self.records, self.chunks) + self._trail.digest()


def error_frame(message: str) -> bytes:
    """What a server sends instead of the rest of a backup it cannot finish."""
    body = message.encode()
    return ERROR + _LEN.pack(len(body)) + body


# -- reading ---------------------------------------------------------------------


class Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Chunk:
    """One verified chunk: its number (1-based), records, and the frame's bytes."""

    index: int
    records: int
    raw_size: int
    payload: bytes
    frame: bytes
    compression: str

    def decode(self) -> list[tuple[bytes, Record]]:
        return decode_payload(
            self.payload, raw_size=self.raw_size, records=self.records, compression=self.compression, index=self.index
        )


@dataclass(frozen=True, slots=True)
class Trailer:
    records: int
    chunks: int
    frame: bytes


class BackupReader:
    """Reads and verifies a backup stream: `header` (read on creation), then
    iterate for Chunk objects, each verified before it is returned; the
    iteration ends after the trailer is verified (`trailer`). Every problem
    is a BackupFormatError that names the chunk and what was read before it."""

    def __init__(self, stream: Readable | BinaryIO) -> None:
        self._stream = stream
        self.bytes_read = 0
        self.records = 0
        self.chunks = 0
        magic = self._read(len(MAGIC), "the header")
        if magic != MAGIC:
            raise BackupFormatError("backup: not a kvstore backup (its first bytes are not the backup magic)")
        (length,) = _LEN.unpack(self._read(_LEN.size, "the header"))
        if length > MAX_HEADER_BYTES:
            raise BackupFormatError(f"backup: header of {length} bytes is corrupt (at most {MAX_HEADER_BYTES})")
        body = self._read(length, "the header")
        try:
            header = json.loads(body)
            version = header["format"]
            compression = header["compression"]
        except (ValueError, KeyError, TypeError) as exc:
            raise BackupFormatError(f"backup: the header is corrupt: {exc}") from exc
        if version != FORMAT_VERSION:
            raise BackupFormatError(
                f"backup: format version {version!r} is not supported (this kvstore reads version {FORMAT_VERSION})"
            )
        if compression not in COMPRESSIONS:
            raise BackupFormatError(f"backup: unknown compression {compression!r} in the header")
        self.header: dict[str, Any] = header
        self.header_frame = magic + _LEN.pack(length) + body
        self.compression: str = compression
        self.trailer: Trailer | None = None
        self._trail = hashlib.blake2b(body, digest_size=CHECKSUM_BYTES)

    def _read(self, size: int, what: str) -> bytes:
        parts: list[bytes] = []
        wanted = size
        while wanted:
            part = self._stream.read(wanted)
            if not part:
                break
            parts.append(part)
            wanted -= len(part)
        data = b"".join(parts)
        self.bytes_read += len(data)
        if len(data) < size:
            raise BackupFormatError(
                f"backup: truncated in {what}: {len(data)} of {size} bytes "
                f"(after {self.chunks} verified chunks, {self.records} records)"
            )
        return data

    def __iter__(self) -> Iterator[Chunk]:
        while self.trailer is None:
            index = self.chunks + 1
            kind = self._stream.read(1)
            self.bytes_read += len(kind)
            if not kind:
                raise BackupFormatError(
                    f"backup: truncated before chunk {index}: no trailer "
                    f"(after {self.chunks} verified chunks, {self.records} records)"
                )
            if kind == CHUNK:
                yield self._chunk(index)
            elif kind == TRAILER:
                self._read_trailer()
            elif kind == ERROR:
                (length,) = _LEN.unpack(self._read(_LEN.size, "the server's error"))
                message = self._read(min(length, MAX_HEADER_BYTES), "the server's error").decode("utf-8", "replace")
                raise BackupFormatError(f"backup: the server stopped after {self.chunks} chunks: {message}")
            else:
                raise BackupFormatError(
                    f"backup: chunk {index} is corrupt: unknown frame type {kind!r} "
                    f"(after {self.chunks} verified chunks, {self.records} records)"
                )

    def _chunk(self, index: int) -> Chunk:
        what = f"chunk {index}"
        head = self._read(_LEN.size + _COUNTS.size + CHECKSUM_BYTES, what)
        length, raw_size, records = _CHUNK.unpack_from(head)
        if length > MAX_CHUNK_BYTES or raw_size > MAX_CHUNK_BYTES:
            raise BackupFormatError(f"backup: chunk {index} is corrupt: sizes {length}/{raw_size} are out of bounds")
        payload = self._read(length, what)
        expected = head[_LEN.size + _COUNTS.size :]
        sum_ = checksum(head[_LEN.size : _LEN.size + _COUNTS.size], payload)
        if sum_ != expected:
            raise BackupFormatError(
                f"backup: chunk {index} is corrupt: checksum mismatch "
                f"(after {self.chunks} verified chunks, {self.records} records)"
            )
        self._trail.update(sum_)
        self.chunks += 1
        self.records += records
        return Chunk(index, records, raw_size, payload, CHUNK + head + payload, self.compression)

    def _read_trailer(self) -> None:
        body = self._read(_TRAILER.size + CHECKSUM_BYTES, "the trailer")
        records, chunks = _TRAILER.unpack_from(body)
        if (records, chunks) != (self.records, self.chunks) or body[_TRAILER.size :] != self._trail.digest():
            raise BackupFormatError(
                f"backup: the trailer does not match: it says {chunks} chunks and {records} records, "
                f"the file holds {self.chunks} and {self.records}, or a chunk or the header was altered"
            )
        self.trailer = Trailer(records, chunks, TRAILER + body)


def parse_chunk_frame(frame: bytes, *, compression: str) -> list[tuple[bytes, Record]]:
    """The records of one chunk frame as a restore request carries it,
    verified (a BackupFormatError on any mismatch)."""
    if compression not in COMPRESSIONS:
        raise BackupFormatError(f"backup: compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    head = 1 + _LEN.size + _COUNTS.size + CHECKSUM_BYTES
    if len(frame) < head or frame[:1] != CHUNK:
        raise BackupFormatError("backup: the request body is not a backup chunk frame")
    length, raw_size, records = _CHUNK.unpack_from(frame, 1)
    payload = frame[head:]
    if len(payload) != length:
        raise BackupFormatError(f"backup: chunk frame says {length} payload bytes, the body has {len(payload)}")
    if checksum(frame[1 + _LEN.size : 1 + _LEN.size + _COUNTS.size], payload) != frame[head - CHECKSUM_BYTES : head]:
        raise BackupFormatError("backup: chunk is corrupt: checksum mismatch")
    return decode_payload(payload, raw_size=raw_size, records=records, compression=compression, index=0)


def decode_payload(
    payload: bytes, *, raw_size: int, records: int, compression: str, index: int
) -> list[tuple[bytes, Record]]:
    name = f"chunk {index}" if index else "chunk"
    if raw_size > MAX_CHUNK_BYTES:
        raise BackupFormatError(f"backup: {name} is corrupt: raw size {raw_size} is out of bounds")
    try:
        raw = (
            zstandard.ZstdDecompressor().decompress(payload, max_output_size=raw_size)
            if compression == "zstd"
            else payload
        )
        if len(raw) != raw_size:
            raise ValueError(f"{len(raw)} bytes decoded, {raw_size} announced")
        decoded = decode_records(raw)
    except (zstandard.ZstdError, ValueError, UnicodeDecodeError) as exc:
        raise BackupFormatError(f"backup: {name} cannot be decoded: {exc}") from exc
    if len(decoded) != records:
        raise BackupFormatError(f"backup: {name} holds {len(decoded)} records, its frame says {records}")
    return decoded
