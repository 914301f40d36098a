"""The backup format (app.storage.backup_format): records round-trip with their
versions, tombstones and expiries; every corruption is caught and named."""

from __future__ import annotations

import io
import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.clock import Version
from app.errors import BackupFormatError
from app.storage.backup_format import (
    CHUNK_RAW_BYTES,
    MAGIC,
    BackupReader,
    BackupWriter,
    decode_records,
    encode_records,
    parse_chunk_frame,
)
from app.storage.base import Record

records_strategy = st.lists(
    st.tuples(
        st.binary(min_size=1, max_size=40),
        st.builds(
            Record,
            version=st.builds(Version, st.integers(0, 2**63 - 1), st.text(min_size=1, max_size=12)),
            value=st.none() | st.binary(max_size=200),
            expires_at_ms=st.integers(0, 2**63 - 1),
        ),
    ),
    max_size=30,
)


def sample(n: int, *, offset: int = 0) -> list[tuple[bytes, Record]]:
    return [
        (
            f"key-{i}".encode(),
            Record(
                Version(1_000_000 + i, "node1"),
                None if i % 7 == 0 else f"value-{i}".encode() * 3,
                expires_at_ms=0 if i % 5 else 1_700_000_000_000 + i,
            ),
        )
        for i in range(offset, offset + n)
    ]


def make_backup(batches: list[list[tuple[bytes, Record]]], *, compression: str = "zstd") -> bytes:
    writer = BackupWriter(compression=compression)
    parts = [writer.header({"created_ms": 1, "cluster": {"members": ["a"]}, "nodes": 1})]
    for batch in batches:
        parts.extend(writer.chunks_of(batch))
    parts.append(writer.trailer())
    return b"".join(parts)


def read_all(data: bytes) -> tuple[BackupReader, list[tuple[bytes, Record]]]:
    reader = BackupReader(io.BytesIO(data))
    out: list[tuple[bytes, Record]] = []
    for chunk in reader:
        out.extend(chunk.decode())
    return reader, out


@given(records_strategy)
def test_records_round_trip(records: list[tuple[bytes, Record]]) -> None:
    assert decode_records(encode_records(records)) == records


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_a_backup_reads_back_whole(compression: str) -> None:
    batches = [sample(100), sample(0), sample(250, offset=100)]
    reader, records = read_all(make_backup(batches, compression=compression))
    assert records == sample(350)
    assert reader.trailer is not None and reader.trailer.records == 350
    assert reader.header["format"] == 1 and reader.header["compression"] == compression


def test_big_batches_split_into_bounded_chunks() -> None:
    big = [(f"k{i}".encode(), Record(Version(i + 1, "n"), b"x" * 1000)) for i in range(3000)]
    reader, records = read_all(make_backup([big]))
    assert records == big
    assert reader.chunks >= 3000 * 1000 // CHUNK_RAW_BYTES


def test_a_flipped_byte_names_its_chunk() -> None:
    data = bytearray(make_backup([sample(100), sample(100, offset=100)]))
    data[-40] ^= 0x01  # inside the last chunk's payload
    reader = BackupReader(io.BytesIO(bytes(data)))
    chunks = iter(reader)
    next(chunks)
    with pytest.raises(BackupFormatError, match=r"chunk 2 is corrupt: checksum mismatch \(after 1 verified chunks"):
        next(chunks)


def test_every_single_flipped_byte_is_caught() -> None:
    data = make_backup([sample(20), sample(20, offset=20)])
    for position in range(len(data)):
        corrupt = bytearray(data)
        corrupt[position] ^= 0x40
        with pytest.raises(BackupFormatError):
            read_all(bytes(corrupt))


def test_truncation_is_caught_at_every_length() -> None:
    data = make_backup([sample(30), sample(30, offset=30)])
    for length in range(len(data)):
        with pytest.raises(BackupFormatError, match=r"truncated|corrupt"):
            read_all(data[:length])


def test_a_truncated_chunk_is_named() -> None:
    data = make_backup([sample(30), sample(30, offset=30)])
    with pytest.raises(BackupFormatError, match=r"truncated in chunk 2"):
        read_all(data[:-60])


def test_a_wrong_format_version_is_refused() -> None:
    data = make_backup([sample(5)])
    (length,) = struct.unpack(">I", data[len(MAGIC) : len(MAGIC) + 4])
    header = json.loads(data[len(MAGIC) + 4 : len(MAGIC) + 4 + length])
    header["format"] = 99
    body = json.dumps(header).encode()
    edited = MAGIC + struct.pack(">I", len(body)) + body + data[len(MAGIC) + 4 + length :]
    with pytest.raises(BackupFormatError, match="format version 99 is not supported"):
        read_all(edited)


def test_not_a_backup() -> None:
    with pytest.raises(BackupFormatError, match="not a kvstore backup"):
        read_all(b"hello world, this is not a backup at all")


def test_dropped_or_reordered_chunks_fail_the_trailer() -> None:
    writer = BackupWriter()
    header = writer.header({})
    first, second = writer.chunk(sample(5)), writer.chunk(sample(5, offset=5))
    trailer = writer.trailer()
    with pytest.raises(BackupFormatError, match="trailer does not match"):
        read_all(header + second + first + trailer)
    with pytest.raises(BackupFormatError, match="trailer does not match"):
        read_all(header + first + first + trailer)


def test_a_chunk_frame_verifies_alone() -> None:
    writer = BackupWriter()
    writer.header({})
    frame = writer.chunk(sample(40))
    assert parse_chunk_frame(frame, compression="zstd") == sample(40)
    corrupt = bytearray(frame)
    corrupt[-1] ^= 0xFF
    with pytest.raises(BackupFormatError, match="checksum mismatch"):
        parse_chunk_frame(bytes(corrupt), compression="zstd")
    with pytest.raises(BackupFormatError, match="not a backup chunk frame"):
        parse_chunk_frame(b"garbage", compression="zstd")
