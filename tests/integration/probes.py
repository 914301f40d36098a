"""Real kvstore node processes for integration tests: start on free loopback
ports, wait until ready, kill with real signals, always reap; optionally with
a skewed wall clock (libfaketime). Also the probes the fault tests use to look
inside a cluster: each node's own replica records (/internal/v1/kv),
rebalancing progress, reachability, membership changes."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import httpx

READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
FAKETIME_LIBRARY = "/usr/lib/*/faketime/libfaketime.so.1"  # Debian's faketime package (scripts/install_tools.py)


def skewed_clock(seconds: float) -> dict[str, str]:
    """Environment that runs a process with its wall clock moved by `seconds`.
    The monotonic clock is left alone: asyncio's timers run on it. Fails (not
    skips) when libfaketime is missing: `make tools` installs it."""
    found = sorted(glob.glob(FAKETIME_LIBRARY))
    assert found, f"libfaketime not found at {FAKETIME_LIBRARY}: run `make tools` (apt-get install faketime)"
    return {"LD_PRELOAD": found[0], "FAKETIME": f"{seconds:+g}s", "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "FAKETIME_NO_CACHE": "1"}


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

    def __init__(
        self, *, node_id: str, host: str, port: int, peers: dict[str, str], log_dir: Path,
        args: list[str] | None = None, env: dict[str, str] | None = None,
    ) -> None:
        self.node_id = node_id
        self.host = host
        self.port = port
        self.peers = peers
        self.args = list(args or [])
        self.env = dict(env or {})  # added to the test's environment at every start (say, a skewed clock)
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
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, **self.env})
        finally:
            log.close()
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = READY_TIMEOUT_S, *, path: str = "/ready") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.node_id} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + path, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.node_id} not answering {path} after {timeout}s:\n{self.log_tail()}")

    def wait_serving(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Up and answering /health, not necessarily ready (a joining node
        may count itself unready until the membership change admits it)."""
        self.wait_ready(timeout, path="/health")

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signum)

    def pause(self) -> None:
        """SIGSTOP: the process hangs with its sockets open (a stalled node)."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, nothing flushed."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal(signal.SIGCONT)
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
    """A set of node processes on 127.0.0.1.

    Every node gets the same peer list unless `peers_for(node_id, direct)` is
    given: it returns the peer list of one node from the direct {id: url} map
    (a ProxyMesh's `route`, so nodes reach each other through proxies).
    `env_for` adds environment variables to some nodes (a skewed clock).
    """

    def __init__(
        self,
        *,
        size: int,
        log_dir: Path,
        args: list[str] | None = None,
        data_root: Path | None = None,
        peers_for: Callable[[str, dict[str, str]], dict[str, str]] | None = None,
        env_for: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.host = "127.0.0.1"
        self.log_dir = log_dir
        self.args = list(args or [])
        self.data_root = data_root
        self.peers_for = peers_for
        self.env_for = dict(env_for or {})
        ports = [free_port(self.host) for _ in range(size)]
        ids = [f"node{i + 1}" for i in range(size)]
        direct = {node_id: f"http://{self.host}:{port}" for node_id, port in zip(ids, ports)}
        self.nodes: list[NodeProcess] = []
        for node_id, port in zip(ids, ports):
            self.nodes.append(self._node(node_id=node_id, port=port, direct=direct))

    def _node(self, *, node_id: str, port: int, direct: dict[str, str]) -> NodeProcess:
        node_args = list(self.args)
        if self.data_root is not None:
            node_args += ["--data-dir", str(self.data_root / node_id)]
        peers = self.peers_for(node_id, dict(direct)) if self.peers_for is not None else dict(direct)
        return NodeProcess(node_id=node_id, host=self.host, port=port, peers=peers, log_dir=self.log_dir, args=node_args,
                           env=self.env_for.get(node_id))

    @property
    def direct_peers(self) -> dict[str, str]:
        """Every node's own URL, by id (what a client or the admin API uses)."""
        return {node.node_id: node.url for node in self.nodes}

    def node(self, node_id: str) -> NodeProcess:
        return next(node for node in self.nodes if node.node_id == node_id)

    def add_node(self, *, node_id: str | None = None) -> NodeProcess:
        """A new node (not started) whose peer list is every node so far plus itself.

        Started before the membership change that admits it, per the
        membership contract; existing nodes keep their --peers until told.
        """
        node_id = node_id or f"node{len(self.nodes) + 1}"
        port = free_port(self.host)
        direct = {**self.direct_peers, node_id: f"http://{self.host}:{port}"}
        node = self._node(node_id=node_id, port=port, direct=direct)
        self.nodes.append(node)
        return node

    def start(self, *, unready: Iterable[str] = ()) -> Cluster:
        """Start every node and wait until it is ready; the `unready` ones
        (expected to stay unready) only until they serve."""
        unready = set(unready)
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.wait_serving() if node.node_id in unready else node.wait_ready()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.signal(signal.SIGTERM)
        for node in self.nodes:
            node.stop()

    def __getitem__(self, index: int) -> NodeProcess:
        return self.nodes[index]

    @property
    def token(self) -> str | None:
        """The --cluster-token the nodes were started with, if any."""
        args = self.args
        return next((args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "--cluster-token"), None)

    def running_urls(self, among: Iterable[str] | None = None) -> dict[str, str]:
        """{id: url} of the nodes whose process is alive (optionally only `among` ids)."""
        wanted = set(among) if among is not None else None
        return {n.node_id: n.url for n in self.nodes if n.running and (wanted is None or n.node_id in wanted)}


# -- inspecting a cluster: replica records, rebalancing, reachability -----------

INSPECT_CONCURRENCY = 32  # parallel inspection requests; enough to be quick, few enough to stay gentle
INSPECT_TIMEOUT_S = 5.0


def wait_for(check: Callable[[], str | None], *, timeout: float, what: str, interval: float = 0.25) -> float:
    """Poll check() until it returns None (done), else fail with its last
    complaint after `timeout` seconds. Returns the seconds it took."""
    started = time.monotonic()
    deadline = started + timeout
    while True:
        problem = check()
        if problem is None:
            return time.monotonic() - started
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s: {problem}")
        time.sleep(interval)


def _headers(token: str | None) -> dict[str, str]:
    return {"x-kvstore-token": token} if token else {}


@dataclass(frozen=True)
class ReplicaRecord:
    """What one node's own store holds for a key (GET /internal/v1/kv/{key})."""

    state: Literal["live", "expired", "tombstone", "absent", "error"]
    version: str | None = None
    value: bytes | None = None
    detail: str = ""

    @property
    def live(self) -> bool:
        return self.state == "live"

    def same_as(self, other: ReplicaRecord) -> bool:
        """Identical live records (version and value), or both holding no live
        value (a tombstone or an expired record, whatever its version, or
        nothing at all)."""
        if "error" in (self.state, other.state):
            return False
        if not self.live and not other.live:
            return True
        return (self.state, self.version, self.value) == (other.state, other.version, other.value)

    def __str__(self) -> str:
        if self.live:
            return f"live {self.value!r} @{self.version}"
        return f"{self.state}{' @' + self.version if self.version else ''}{' ' + self.detail if self.detail else ''}"


def read_replicas(urls: dict[str, str], keys: Iterable[str], *, token: str | None = None) -> dict[tuple[str, str], ReplicaRecord]:
    """{(node_id, key): record} from every node's own store, read concurrently."""
    keys = list(keys)

    async def one(client: httpx.AsyncClient, gate: asyncio.Semaphore, url: str, key: str) -> ReplicaRecord:
        async with gate:
            try:
                resp = await client.get(f"{url}/internal/v1/kv/{quote(key, safe='')}")
            except httpx.HTTPError as exc:
                return ReplicaRecord("error", detail=f"{type(exc).__name__}: {exc}")
        version = resp.headers.get("x-kvstore-version")
        if resp.status_code == 404:
            return ReplicaRecord("absent")
        if resp.status_code != 200:
            return ReplicaRecord("error", detail=f"HTTP {resp.status_code}: {resp.text[:200]}")
        if resp.headers.get("x-kvstore-tombstone") == "1":
            return ReplicaRecord("tombstone", version=version)
        expires = int(resp.headers.get("x-kvstore-expires") or 0)
        if 0 < expires <= time.time() * 1000:  # a dead record at its version, like a tombstone
            return ReplicaRecord("expired", version=version, value=resp.content)
        return ReplicaRecord("live", version=version, value=resp.content)

    async def run() -> dict[tuple[str, str], ReplicaRecord]:
        gate = asyncio.Semaphore(INSPECT_CONCURRENCY)
        pairs = [(node_id, key) for node_id in urls for key in keys]
        async with httpx.AsyncClient(timeout=INSPECT_TIMEOUT_S, headers=_headers(token)) as client:
            records = await asyncio.gather(*(one(client, gate, urls[node_id], key) for node_id, key in pairs))
        return dict(zip(pairs, records))

    return asyncio.run(run())


def divergent_keys(urls: dict[str, str], keys: Iterable[str], *, owners: Callable[[str], Iterable[str]], token: str | None = None) -> dict[str, dict[str, ReplicaRecord]]:
    """Keys whose replicas (owners(key), each read from its own store) do not all hold the same record."""
    keys = list(keys)
    records = read_replicas(urls, keys, token=token)
    divergent = {}
    for key in keys:
        replicas = {node_id: records[node_id, key] for node_id in owners(key)}
        first = next(iter(replicas.values()))
        if not all(first.same_as(other) for other in replicas.values()):
            divergent[key] = replicas
    return divergent


def wait_converged(urls: dict[str, str], keys: Iterable[str], *, owners: Callable[[str], Iterable[str]], timeout: float, token: str | None = None) -> float:
    """Wait until every key's replicas hold identical records; returns the seconds it took.

    Re-reads only the keys still divergent, then confirms with one full pass.
    """
    pending = list(keys)
    started = time.monotonic()

    def check() -> str | None:
        nonlocal pending
        divergent = divergent_keys(urls, pending, owners=owners, token=token)
        pending = list(divergent)
        if not divergent:
            return None
        key, replicas = next(iter(divergent.items()))
        shown = ", ".join(f"{node_id}: {record}" for node_id, record in replicas.items())
        return f"{len(divergent)} keys still differ between replicas, e.g. {key!r}: {shown}"

    wait_for(check, timeout=timeout, what="replicas converge", interval=0.2)
    full = divergent_keys(urls, keys, owners=owners, token=token)
    assert not full, f"replicas diverged again after converging: {sorted(full)[:5]}"
    return time.monotonic() - started


def admin_get(url: str, path: str, *, token: str | None = None) -> Any:
    resp = httpx.get(url + path, headers=_headers(token), timeout=INSPECT_TIMEOUT_S)
    resp.raise_for_status()
    return resp.json()


def change_membership(url: str, peers: dict[str, str], *, token: str | None = None) -> dict[str, Any]:
    """POST /admin/membership to one member; it applies the change everywhere."""
    resp = httpx.post(url + "/admin/membership", json={"peers": peers}, headers=_headers(token), timeout=30.0)
    assert resp.status_code == 200, f"membership change refused: {resp.status_code} {resp.text}"
    return resp.json()


def rebalancing_left(urls: dict[str, str], *, token: str | None = None) -> str | None:
    """None when every node reports syncing false and foreign_keys 0, else what is left."""
    left = []
    for node_id, url in urls.items():
        try:
            status = admin_get(url, "/admin/rebalance", token=token)
        except httpx.HTTPError as exc:
            left.append(f"{node_id}: {type(exc).__name__}: {exc}")
            continue
        if status.get("syncing") is not False or status.get("foreign_keys") != 0:
            left.append(f"{node_id}: {status}")
    return "; ".join(left) or None


def reachability(url: str, *, token: str | None = None) -> dict[str, bool]:
    """{member id: reachable} as one node sees it (GET /ring)."""
    return {m["node_id"]: bool(m.get("reachable")) for m in admin_get(url, "/ring", token=token)["members"]}


def unreachable_peers(urls: dict[str, str], *, expect: Iterable[str], token: str | None = None) -> str | None:
    """None when every node in urls sees every id in `expect` as reachable in /ring."""
    expect = set(expect)
    problems = []
    for node_id, url in urls.items():
        try:
            view = reachability(url, token=token)
        except httpx.HTTPError as exc:
            problems.append(f"{node_id}: {type(exc).__name__}")
            continue
        down = sorted(peer for peer in expect if not view.get(peer, False))
        if down:
            problems.append(f"{node_id} sees {down} unreachable")
    return "; ".join(problems) or None


def membership_disagreement(urls: dict[str, str], *, members: Iterable[str], token: str | None = None) -> str | None:
    """None when every node in urls has exactly `members` in its ring."""
    members = set(members)
    problems = []
    for node_id, url in urls.items():
        try:
            seen = {m["node_id"] for m in admin_get(url, "/ring", token=token)["members"]}
        except httpx.HTTPError as exc:
            problems.append(f"{node_id}: {type(exc).__name__}")
            continue
        if seen != members:
            problems.append(f"{node_id} has {sorted(seen)}")
    return "; ".join(problems) or None
