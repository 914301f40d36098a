"""The durable engines (LMDB, RocksDB) under SIGKILL, with real processes and no HTTP.

A child process (its own process group) writes from several threads and
prints each key only once the write is acknowledged as its --fsync policy
defines it: `always` after wait_durable()'s group commit, `batch`/`never`
right after apply(). The parent reads acknowledgements, kills the child with
SIGKILL mid-stream, reopens the data directory and checks every acknowledged
write. A process crash leaves the page cache intact (LMDB's pages, RocksDB's
write-ahead log), so no policy may lose anything here; only a power loss can
lose the batch window (not tested).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from app.storage import LmdbStore, RocksDbStore

ENGINES = {"lmdb": LmdbStore, "rocksdb": RocksDbStore}
REPO = Path(__file__).resolve().parents[2]
ACKS_BEFORE_KILL = 300  # enough to span many group commits, quick even on a slow disk
WRITER_THREADS = 4
CHILD_TIMEOUT_S = 60.0

CHILD = textwrap.dedent(
    """
    import sys, threading
    from app.clock import HybridClock
    from app.storage import LmdbStore, Record, RocksDbStore

    path, fsync, engine = sys.argv[1], sys.argv[2], sys.argv[4]
    kind = {"lmdb": LmdbStore, "rocksdb": RocksDbStore}[engine]
    store = kind(path=path, node_id="crash-node", fsync=fsync, fsync_window_ms=10, tombstone_grace_s=3600)
    clock = HybridClock("crash-node")
    out = threading.Lock()

    def writer(t):
        i = 0
        while True:
            key = f"t{t}-{i}".encode()
            store.apply(key, Record(version=clock.now(), value=b"value-" + key))
            waiter = store.wait_durable()
            if waiter is not None:
                waiter.result()
            with out:
                sys.stdout.write(key.decode() + "\\n")
                sys.stdout.flush()
            i += 1

    threads = [threading.Thread(target=writer, args=(t,), daemon=True) for t in range(int(sys.argv[3]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    """
)


def _kill_group(child: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    child.wait(timeout=10)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fsync", ["always", "batch", "never"])
def test_sigkill_loses_no_acknowledged_write(tmp_path: Path, fsync: str, engine: str) -> None:
    data = tmp_path / "data"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data), fsync, str(WRITER_THREADS), engine],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: killed as one, never by name
    )
    acknowledged: list[str] = []
    try:
        assert child.stdout is not None
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        while len(acknowledged) < ACKS_BEFORE_KILL:
            line = child.stdout.readline()
            if not line:
                _kill_group(child)
                pytest.fail(f"writer exited early: {child.stderr.read() if child.stderr else ''}")
            acknowledged.append(line.strip())
            assert time.monotonic() < deadline, "writer too slow"
        _kill_group(child)  # mid-stream: writes are in flight
        assert child.returncode == -signal.SIGKILL
        # Whatever the child wrote after our last read was acknowledged too.
        acknowledged += [line.strip() for line in child.stdout.read().splitlines() if line.strip()]
    finally:
        if child.poll() is None:
            _kill_group(child)
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()

    store = ENGINES[engine](
        path=str(data), node_id="crash-node", fsync=fsync, fsync_window_ms=10, tombstone_grace_s=3600
    )
    try:
        lost = []
        for key in acknowledged:
            record = store.get(key.encode())
            if record is None or record.value != b"value-" + key.encode():
                lost.append(key)
        print(f"{engine}, fsync={fsync}: {len(acknowledged)} acknowledged, {len(lost)} lost after SIGKILL")
        assert lost == []
        assert store.live_count() >= len(acknowledged)
    finally:
        store.close()
