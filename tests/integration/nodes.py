"""Real kvstore node processes for integration tests: start on free loopback
ports, wait until ready, kill with real signals, always reap."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def free_port_run(count: int, host: str = "127.0.0.1") -> int:
    """A base port such that base .. base+count-1 are all free right now."""
    for _ in range(200):
        base = free_port(host)
        if base + count >= 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for offset in range(count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind((host, base + offset))
            return base
        except OSError:
            continue
    raise RuntimeError("no run of free ports found")


class NodeProcess:
    """One `kvstore node` in its own process group, logging to a file."""

    def __init__(self, *, node_id: str, host: str, port: int, peers: dict[str, str], log_dir: Path, args: list[str] | None = None) -> None:
        self.node_id = node_id
        self.host = host
        self.port = port
        self.peers = peers
        self.args = list(args or [])
        self.log_path = log_dir / f"{node_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        peers = ",".join(f"{node_id}={url}" for node_id, url in self.peers.items())
        return [sys.executable, "-m", "app", "node", "--node-id", self.node_id,
                "--listen", f"{self.host}:{self.port}", "--peers", peers, *self.args]

    def start(self) -> NodeProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        try:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.node_id} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/ready", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.node_id} not ready after {timeout}s:\n{self.log_tail()}")

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signum)

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, nothing flushed."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


class Cluster:
    """A set of node processes on 127.0.0.1 with one shared peer list."""

    def __init__(self, *, size: int, log_dir: Path, args: list[str] | None = None, data_root: Path | None = None) -> None:
        host = "127.0.0.1"
        ports = [free_port(host) for _ in range(size)]
        ids = [f"node{i + 1}" for i in range(size)]
        peers = {node_id: f"http://{host}:{port}" for node_id, port in zip(ids, ports)}
        self.nodes = []
        for node_id, port in zip(ids, ports):
            node_args = list(args or [])
            if data_root is not None:
                node_args += ["--data-dir", str(data_root / node_id)]
            self.nodes.append(NodeProcess(node_id=node_id, host=host, port=port, peers=peers, log_dir=log_dir, args=node_args))

    def start(self) -> Cluster:
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.wait_ready()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.signal(signal.SIGTERM)
        for node in self.nodes:
            node.stop()

    def __getitem__(self, index: int) -> NodeProcess:
        return self.nodes[index]
