"""`kvstore backup` and `kvstore restore`: the client side of the backup
routes (app.web.routes_backup). app.cli parses the flags and builds the HTTP
client (run_client, so its connection flags apply here too); this module
streams a backup into a file or stdout, verifying each chunk as it passes,
and feeds a backup file's verified chunks to POST /admin/restore, both
through the client library (kvstore_client.Client.stream and .post). Progress
goes to stderr when it is a terminal; a JSON summary ends every run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

import kvstore_client
from app.errors import BackupCommandError, BackupFormatError
from app.storage.backup_format import BackupReader

BACKUP_READ_TIMEOUT_S = 300.0  # between two chunks of a backup stream: a big batch on a loaded cluster
RESTORE_TIMEOUT_S = 120.0  # one chunk's write to W replicas of every key in it
PROGRESS_EVERY_S = 0.5


def run(client: kvstore_client.Client, args: argparse.Namespace) -> int:
    """The client carries the --token (app.cli open_client)."""
    if args.command == "backup":
        return backup(client, args)
    return restore(client, args)


# -- backup -----------------------------------------------------------------------


class _StreamReader:
    """A file-like read(n) over a response's byte iterator."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = bytearray()

    def read(self, size: int, /) -> bytes:
        while len(self._buffer) < size:
            try:
                self._buffer += next(self._chunks)
            except StopIteration:
                break
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data


def backup(client: kvstore_client.Client, args: argparse.Namespace) -> int:
    output = args.output or args.target
    if output is None:
        raise BackupCommandError("backup: say where to write it: -o FILE, or `-` for stdout")
    if args.output and args.target:
        raise BackupCommandError("backup: give either -o FILE or `-`, not both")
    to_stdout = output == "-"
    if to_stdout and sys.stdout.isatty():
        raise BackupCommandError("backup: stdout is a terminal; redirect it, or use -o FILE")
    params: dict[str, str | float] = {"compression": args.compression}
    if args.pace is not None:
        params["pace"] = args.pace
    started = time.monotonic()
    progress = Progress("backup")
    partial = None if to_stdout else output + ".partial"
    try:
        with (
            client.stream("/admin/backup", params=params, read_timeout=BACKUP_READ_TIMEOUT_S) as body,
            _open_output(partial) as out,
        ):
            reader = BackupReader(_StreamReader(body))
            progress.expected = int(reader.header.get("estimated_records") or 0)
            out.write(reader.header_frame)
            for chunk in reader:
                out.write(chunk.frame)
                progress.update(records=reader.records, bytes_=reader.bytes_read)
            assert reader.trailer is not None
            out.write(reader.trailer.frame)
            out.flush()
            if partial is not None:
                os.fsync(out.fileno())
        if partial is not None:
            os.replace(partial, output)
    except kvstore_client.KvstoreError as exc:
        _discard(partial)
        if exc.status is None:
            raise  # could not reach the node: app.cli says so
        raise BackupCommandError(f"backup: {exc.status}: {exc.message}") from exc
    except BaseException:
        _discard(partial)
        raise
    finally:
        progress.done()
    summary = {
        "command": "backup",
        "ok": True,
        "file": output,
        "records": reader.records,
        "chunks": reader.chunks,
        "bytes": reader.bytes_read,
        "compression": reader.compression,
        "seconds": round(time.monotonic() - started, 3),
        "cluster": reader.header.get("cluster"),
    }
    print(json.dumps(summary), file=sys.stderr if to_stdout else sys.stdout, flush=True)
    return 0


def _discard(partial: str | None) -> None:
    if partial is not None:
        with contextlib.suppress(OSError):
            os.unlink(partial)


@contextlib.contextmanager
def _open_output(path: str | None) -> Iterator[IO[bytes]]:
    if path is None:
        yield sys.stdout.buffer
        return
    with open(path, "wb") as out:
        yield out


# -- restore ----------------------------------------------------------------------


def restore(client: kvstore_client.Client, args: argparse.Namespace) -> int:
    started = time.monotonic()
    progress = Progress("restore")
    totals = {"records": 0, "applied": 0, "unchanged": 0, "replica_writes_applied": 0, "chunks": 0}
    error: str | None = None
    at = 0  # the chunk being restored
    with _open_input(args.file) as source:
        if args.file != "-":
            progress.expected_bytes = os.fstat(source.fileno()).st_size
        try:
            reader = BackupReader(source)
            for chunk in reader:
                at = chunk.index
                answer = client.post(
                    "/admin/restore",
                    chunk.frame,
                    params={"compression": chunk.compression},
                    timeout=RESTORE_TIMEOUT_S,
                )
                for name in ("records", "applied", "unchanged", "replica_writes_applied"):
                    totals[name] += int(answer[name])
                totals["chunks"] += 1
                progress.update(records=totals["records"], bytes_=reader.bytes_read)
        except (BackupFormatError, BackupCommandError) as exc:
            error = str(exc)
        except kvstore_client.KvstoreError as exc:
            if exc.status is None:
                error = f"restore: cannot reach {args.url}: {exc.message}"
            else:
                error = f"restore: chunk {at}: {exc.status}: {exc.message}"
        finally:
            progress.done()
    summary: dict[str, Any] = {
        "command": "restore",
        "ok": error is None,
        "file": args.file,
        **totals,
        "seconds": round(time.monotonic() - started, 3),
    }
    if error is not None:
        summary["error"] = error
        print(f"kvstore: {error}", file=sys.stderr)
        print(
            f"kvstore: restore stopped; {totals['chunks']} chunks ({totals['records']} records) were restored "
            "before it (running the restore again is safe: it skips what is already there)",
            file=sys.stderr,
        )
    print(json.dumps(summary), flush=True)
    return 0 if error is None else 1


@contextlib.contextmanager
def _open_input(path: str) -> Iterator[IO[bytes]]:
    if path == "-":
        yield sys.stdin.buffer
        return
    try:
        with open(path, "rb") as source:
            yield source
    except OSError as exc:
        raise BackupCommandError(f"restore: cannot open {path}: {exc.strerror}") from exc


# -- shared -----------------------------------------------------------------------


class Progress:
    """keys, bytes, rate and ETA on one stderr line, only when stderr is a terminal."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.enabled = sys.stderr.isatty()
        self.started = time.monotonic()
        self.expected = 0  # records expected (backup: the server's estimate)
        self.expected_bytes = 0  # bytes expected (restore from a file)
        self._shown = 0.0

    def update(self, *, records: int, bytes_: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._shown < PROGRESS_EVERY_S:
            return
        self._shown = now
        elapsed = max(now - self.started, 1e-6)
        rate = records / elapsed
        if self.expected_bytes:
            done = bytes_ / self.expected_bytes
        elif self.expected:
            done = min(records / self.expected, 0.99)
        else:
            done = 0.0
        eta = f"{elapsed * (1 - done) / done:.0f} s" if done > 0 else "?"
        sys.stderr.write(f"\r{self.what}: {records} keys, {bytes_ / 1e6:.1f} MB, {rate:,.0f} keys/s, ETA {eta}   ")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self._shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
