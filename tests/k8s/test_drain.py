"""A pod's stop fits the kubelet's clock: a node that has left the ring hands
its records off for at most --drain-deadline (KVSTORE_DRAIN_DEADLINE, which the
chart derives from terminationGracePeriodSeconds; test_chart.py checks that
arithmetic), then exits and logs what it did not hand off.

A real `kvstore node` process (tests/harness/processes.py) with durable storage
is told that the ring is now one other member, whose address accepts
connections but never answers (a listening socket nobody accepts on), with a
peer timeout far longer than the drain deadline: only the drain's own bound
can make it exit in time.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.transport.base import MEMBERSHIP_PATH
from tests.harness.processes import NodeProcess, free_port

DRAIN_DEADLINE_S = 2.0
PEER_TIMEOUT_S = 60.0  # a push to the silent owner would wait this long: longer than any pod's grace
EXIT_SLACK_S = 4.0  # uvicorn's graceful close (3 s at most, nothing open here) plus closing the store
KEYS = 40
NODE_HOST = "127.0.0.2"
SILENT_HOST = "127.0.0.3"


@pytest.fixture
def silent_owner() -> Iterator[str]:
    """A peer URL whose TCP connects succeed (the kernel's backlog) and whose requests never get an answer."""
    sock = socket.socket()
    sock.bind((SILENT_HOST, 0))
    sock.listen(64)
    try:
        yield f"http://{SILENT_HOST}:{sock.getsockname()[1]}"
    finally:
        sock.close()


def test_a_leaving_node_stops_within_its_drain_deadline_and_logs_what_it_kept(
    tmp_path: Path, silent_owner: str
) -> None:
    port = free_port(NODE_HOST)
    node = NodeProcess(
        node_id="leaving",
        host=NODE_HOST,
        port=port,
        peers={},
        log_dir=tmp_path,
        args=[
            "--data-dir",
            str(tmp_path / "data"),
            "--replication-factor",
            "1",
            "--peer-timeout",
            str(PEER_TIMEOUT_S),
            "--drain-deadline",
            str(DRAIN_DEADLINE_S),
            "--anti-entropy-interval",
            "3600",
            "--log-level",
            "info",
        ],
    )
    node.start()
    try:
        node.wait_ready()
        with httpx.Client(timeout=5.0) as client:
            for i in range(KEYS):
                assert client.put(f"{node.url}/kv/drain-{i}", content=b"v").status_code == 204
            # The ring is now only `owner`: every record here is foreign and must go to it.
            resp = client.post(node.url + MEMBERSHIP_PATH, json={"peers": {"owner": silent_owner}})
            assert resp.status_code == 200, resp.text

        started = time.monotonic()
        node.signal(signal.SIGTERM)  # the kubelet, after the preStop sleep
        assert node.proc is not None
        try:
            node.proc.wait(timeout=DRAIN_DEADLINE_S + EXIT_SLACK_S)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"the node was still draining {DRAIN_DEADLINE_S + EXIT_SLACK_S:.0f} s after SIGTERM "
                f"(--drain-deadline {DRAIN_DEADLINE_S}):\n{node.log_tail()}"
            )
        took = time.monotonic() - started
        log = node.log_path.read_text(errors="replace")
        assert "left the ring" in log, log
        assert f"drain: {KEYS} records not handed off within --drain-deadline {DRAIN_DEADLINE_S:.1f} s" in log, log
        assert took >= DRAIN_DEADLINE_S * 0.9, f"exited after {took:.1f} s: it did not try to hand off"
        assert "Traceback" not in log, log
    finally:
        node.kill()
