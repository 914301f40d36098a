"""A history checker: concurrent clients write, overwrite and delete a bounded
set of keys through random nodes while a test injects faults; afterwards every
key is read through every live node and compared with what was acknowledged.

The rule. Each write (PUT or DELETE) has a send time and, if it was
acknowledged (204), an ack time; a write whose answer never came or was an
error may still have been applied, so it is *unknown* and its ack time is
taken as infinity (only a refused connection proves a write never happened).
Let H be the latest send time of any acknowledged write to a key. Every write
acknowledged before H was superseded by a write the client issued after it, so
it may not be the final state. The final state may be the value of any other
write (acknowledged or unknown) whose ack time is >= H, or absent if that
write was a delete; and absent if the key never had an acknowledged write. A
read that returns anything else lost an acknowledged write (or resurrected a
deleted key, or invented a value).

A put with a TTL leaves its value only until it expires, and absence after:
read at time t, it allows its value while t < ack + ttl + slack and absence
once t >= send + ttl - slack, where the slack covers the clocks that judge
expiry (the coordinator's that stamped it, the reader's that serves it).
Expiry never brings back what the TTL'd write superseded.

Pure verdict (`allowed_states`, `check`) beside the machinery that produces
the inputs (`Load`, `observe`); tests/unit/test_history_checker.py tests the
verdict alone. Imports nothing from app.
"""

from __future__ import annotations

import asyncio
import math
import random
import ssl
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import quote

import httpx

Kind = Literal["put", "delete", "get"]
Outcome = Literal["ok", "unknown", "failed"]  # acknowledged / maybe applied / provably not applied

REQUEST_TIMEOUT_S = 5.0  # a client gives up on one request after this; the write is then unknown
READ_RETRY_S = 10.0  # the final reads retry a non-answer this long before calling the key unreadable
READ_CONCURRENCY = 32
EXAMPLES = 10  # anomalies shown in a summary


# -- the history and its verdict (pure) -----------------------------------------


@dataclass(frozen=True)
class Op:
    """One client request. value: the bytes a put wrote (unique per put), or a
    get read (None: 404, or no answer); None for a delete."""

    client: int
    kind: Kind
    key: str
    value: bytes | None
    sent: float  # time.monotonic() just before the request left
    acked: float | None  # time.monotonic() just after the acknowledgement arrived; None unless outcome "ok"
    outcome: Outcome
    error: str = ""
    finished: float | None = None  # when the client stopped waiting, whatever the outcome
    ttl_s: float | None = None  # a put whose value expires this long after it was applied
    node: str = ""  # the URL that answered (or was last tried)

    @property
    def is_write(self) -> bool:
        return self.kind != "get"

    def states_at(self, at: float, *, expiry_slack_s: float) -> set[bytes | None]:
        """What this write may leave its key as, read at time `at`."""
        if self.kind == "delete":
            return {None}
        if self.ttl_s is None:
            return {self.value}
        acked = self.acked if self.acked is not None else math.inf
        states: set[bytes | None] = set()
        if at < acked + self.ttl_s + expiry_slack_s:
            states.add(self.value)
        if at >= self.sent + self.ttl_s - expiry_slack_s:
            states.add(None)
        return states

    def during(self, since: float, until: float) -> bool:
        """Whether the request was in flight at some moment of [since, until]."""
        end = self.finished if self.finished is not None else self.acked if self.acked is not None else self.sent
        return self.sent <= until and end >= since


@dataclass(frozen=True)
class Observation:
    """A key read through one node after the fact: value None means 404."""

    node: str
    key: str
    value: bytes | None
    error: str = ""  # set when the node never gave a 200 or 404
    at: float = math.inf  # time.monotonic() of the answer (inf: long after every write)


@dataclass(frozen=True)
class Anomaly:
    key: str
    node: str
    reason: str
    observed: bytes | None
    expected: bytes | None  # the latest acknowledged state (None: absent)

    def __str__(self) -> str:
        return (
            f"{self.key!r} via {self.node}: {self.reason}: read {self.observed!r}, last acknowledged {self.expected!r}"
        )


@dataclass
class Verdict:
    requests: int
    succeeded: int
    acknowledged: int  # acknowledged writes (puts and deletes)
    unknown: int  # writes that may or may not have been applied
    keys_checked: int
    anomalies: list[Anomaly] = field(default_factory=list)

    @property
    def lost_keys(self) -> list[str]:
        return sorted({anomaly.key for anomaly in self.anomalies})

    @property
    def lost(self) -> int:
        return len(self.lost_keys)

    @property
    def success_ratio(self) -> float:
        return self.succeeded / self.requests if self.requests else 1.0

    def summary(self) -> str:
        lines = [
            f"history: {self.requests} requests, {self.success_ratio:.2%} succeeded; "
            f"{self.acknowledged} writes acknowledged, {self.unknown} unknown; "
            f"{self.keys_checked} keys checked, {self.lost} lost"
        ]
        lines += [f"  {anomaly}" for anomaly in self.anomalies[:EXAMPLES]]
        if len(self.anomalies) > EXAMPLES:
            lines.append(f"  ... and {len(self.anomalies) - EXAMPLES} more")
        return "\n".join(lines)


def allowed_states(ops: Iterable[Op], *, at: float = math.inf, expiry_slack_s: float = 0.0) -> set[bytes | None]:
    """The states one key may legitimately be in when read at `at`, given its writes (see the module rule)."""
    writes = [op for op in ops if op.is_write and op.outcome != "failed"]
    horizon = max((op.sent for op in writes if op.outcome == "ok"), default=-math.inf)
    allowed: set[bytes | None] = set()
    for op in writes:
        if (op.acked if op.acked is not None else math.inf) >= horizon:
            allowed |= op.states_at(at, expiry_slack_s=expiry_slack_s)
    if horizon == -math.inf:
        allowed.add(None)  # nothing acknowledged: the key may never have been written
    return allowed


def latest_acknowledged(ops: Iterable[Op]) -> bytes | None:
    acked = [op for op in ops if op.is_write and op.outcome == "ok"]
    return max(acked, key=lambda op: op.sent).value if acked else None


def check(ops: Sequence[Op], observations: Iterable[Observation], *, expiry_slack_s: float = 0.0) -> Verdict:
    """Judge the final reads against the history."""
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        by_key[op.key].append(op)
    written = {op.value for op in ops if op.kind == "put" and op.outcome != "failed"}
    writes = [op for op in ops if op.is_write]
    verdict = Verdict(
        requests=len(ops),
        succeeded=sum(op.outcome == "ok" for op in ops),
        acknowledged=sum(op.outcome == "ok" for op in writes),
        unknown=sum(op.outcome == "unknown" for op in writes),
        keys_checked=0,
    )
    keys = set()
    for seen in observations:
        keys.add(seen.key)
        history = by_key.get(seen.key, [])
        expected = latest_acknowledged(history)
        if seen.error:
            verdict.anomalies.append(Anomaly(seen.key, seen.node, f"unreadable ({seen.error})", None, expected))
        elif seen.value not in allowed_states(history, at=seen.at, expiry_slack_s=expiry_slack_s):
            if seen.value is not None and seen.value not in written:
                reason = "a value nobody wrote"
            elif seen.value is None:
                reason = "acknowledged write lost"
            elif expected is None:
                reason = "deleted key resurrected"
            else:
                reason = "acknowledged overwrite lost (stale value)"
            verdict.anomalies.append(Anomaly(seen.key, seen.node, reason, seen.value, expected))
    verdict.keys_checked = len(keys)
    return verdict


def stale_reads(ops: Sequence[Op]) -> list[Op]:
    """Reads that returned a state older than a write acknowledged before the
    read was sent (a regular register's rule): per key, the latest write
    acknowledged before the read began, or any write acknowledged after it
    was sent or not at all, and sent before the read ended, is allowed."""
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        by_key[op.key].append(op)
    stale = []
    for key_ops in by_key.values():
        writes = [op for op in key_ops if op.is_write and op.outcome != "failed"]
        for read in (op for op in key_ops if op.kind == "get" and op.outcome == "ok"):
            assert read.finished is not None
            before = [w for w in writes if w.acked is not None and w.acked < read.sent]
            horizon = max((w.sent for w in before), default=-math.inf)
            allowed = {
                w.value if w.kind == "put" else None
                for w in writes
                if w.sent <= read.finished and (w.acked if w.acked is not None else math.inf) >= horizon
            }
            if not before:
                allowed.add(None)
            if read.value not in allowed:
                stale.append(read)
    return stale


def success_ratio(ops: Iterable[Op], *, since: float = -math.inf, until: float = math.inf) -> tuple[float, int]:
    """(share of requests that succeeded, how many requests) among those in
    flight at some moment of [since, until] (so those a crash cut short count)."""
    window = [op for op in ops if op.during(since, until)]
    if not window:
        return 1.0, 0
    return sum(op.outcome == "ok" for op in window) / len(window), len(window)


# -- producing a history: clients in a background thread ------------------------


class Load:
    """`clients` async clients, each its own httpx.AsyncClient, in a background
    thread: each picks a random key and a random node from `urls` per request,
    and puts (value f"{name}/{client}:{seq}"), deletes, or reads it.

    A request whose connection is refused provably never happened, so the
    client tries another node (as a client with several endpoints does); any
    other failure is final for that request. Reassign `urls` to steer the
    clients (e.g. to the majority side of a partition).
    """

    def __init__(
        self,
        *,
        urls: Sequence[str],
        keys: Sequence[str],
        clients: int = 6,
        name: str = "w",
        delete_ratio: float = 0.05,
        read_ratio: float = 0.2,
        seed: int = 0,
        timeout: float = REQUEST_TIMEOUT_S,
        verify: ssl.SSLContext | bool = True,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.urls = list(urls)
        self.headers = dict(headers or {})  # a user's `authorization` under --auth-file
        self.verify = verify  # https nodes: the context that verifies them (and presents a client certificate)
        self.keys = list(keys)
        self.clients = clients
        self.name = name
        self.delete_ratio = delete_ratio
        self.read_ratio = read_ratio
        self.seed = seed
        self.timeout = timeout
        self.ops: list[Op] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> Load:
        self._thread = threading.Thread(target=self._run, name=f"load-{self.name}", daemon=True)
        self._thread.start()
        return self

    def halt(self) -> None:
        """Stop the clients; each finishes its current request."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout * 2 + 10)

    def stop(self) -> list[Op]:
        """Stop the clients and return the history."""
        self.halt()
        assert self._thread is None or not self._thread.is_alive(), "load clients did not stop"
        if self._error is not None:
            raise RuntimeError(f"load {self.name} crashed") from self._error
        return self.ops

    def run_for(self, seconds: float, *, min_ops: int = 0, max_wait: float = 60.0) -> None:
        """Let the load run at least `seconds` and until `min_ops` more requests completed."""
        started, target = time.monotonic(), len(self.ops) + min_ops
        while time.monotonic() - started < seconds or len(self.ops) < target:
            assert self._thread is not None and self._thread.is_alive(), (
                f"load {self.name} is not running: {self._error!r}"
            )
            assert time.monotonic() - started < max_wait, (
                f"load {self.name}: only {len(self.ops) - target + min_ops} of {min_ops} requests in {max_wait}s"
            )
            time.sleep(0.05)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - surfaced by stop()
            self._error = exc

    async def _main(self) -> None:
        await asyncio.gather(*(self._client(index) for index in range(self.clients)))

    async def _client(self, index: int) -> None:
        rng = random.Random(f"{self.seed}/{self.name}/{index}")
        async with httpx.AsyncClient(timeout=self.timeout, verify=self.verify, headers=self.headers) as client:
            seq = 0
            while not self._stop.is_set():
                seq += 1
                key = rng.choice(self.keys)
                draw = rng.random()
                kind: Kind = (
                    "get"
                    if draw < self.read_ratio
                    else "delete"
                    if draw < self.read_ratio + self.delete_ratio
                    else "put"
                )
                value = f"{self.name}/{index}:{seq}".encode() if kind == "put" else None
                sent = time.monotonic()
                outcome, error, node, read = await self._send(client, rng, kind=kind, key=key, value=value)
                finished = time.monotonic()
                if kind == "get":
                    value = read
                acked = finished if outcome == "ok" else None
                self.ops.append(Op(index, kind, key, value, sent, acked, outcome, error, finished, node=node))

    async def _send(
        self, client: httpx.AsyncClient, rng: random.Random, *, kind: Kind, key: str, value: bytes | None
    ) -> tuple[Outcome, str, str, bytes | None]:
        """(outcome, error, the URL that answered or was last tried, what a get read)."""
        urls = list(self.urls)
        rng.shuffle(urls)
        path = "/kv/" + quote(key, safe="")
        for url in urls:
            try:
                if kind == "put":
                    resp = await client.put(url + path, content=value)
                elif kind == "delete":
                    resp = await client.delete(url + path)
                else:
                    resp = await client.get(url + path)
            except httpx.ConnectError:
                continue  # refused: never sent, try the next node
            except httpx.HTTPError as exc:
                return "unknown", f"{url}: {type(exc).__name__}: {exc}", url, None
            if resp.status_code == (204 if kind != "get" else 200) or (kind == "get" and resp.status_code == 404):
                return "ok", "", url, resp.content if resp.status_code == 200 else None
            # 4xx: refused before anything was applied; 5xx: maybe partly applied.
            outcome: Outcome = "failed" if resp.status_code < 500 else "unknown"
            return outcome, f"{url}: HTTP {resp.status_code} {resp.text[:200]}", url, None
        return "failed", "no node accepted the connection", urls[-1] if urls else "", None


def observe(
    urls: dict[str, str],
    keys: Iterable[str],
    *,
    consistency: str = "quorum",
    retry_for: float = READ_RETRY_S,
    verify: ssl.SSLContext | bool = True,
    headers: dict[str, str] | None = None,
) -> list[Observation]:
    """Read every key through every node in urls ({node_id: url}) with a normal client GET."""
    keys = list(keys)

    async def one(client: httpx.AsyncClient, gate: asyncio.Semaphore, node: str, key: str) -> Observation:
        deadline = time.monotonic() + retry_for
        while True:
            async with gate:
                try:
                    resp = await client.get(
                        f"{urls[node]}/kv/{quote(key, safe='')}", params={"consistency": consistency}
                    )
                    if resp.status_code in (200, 404):
                        value = resp.content if resp.status_code == 200 else None
                        return Observation(node, key, value, at=time.monotonic())
                    error = f"HTTP {resp.status_code} {resp.text[:200]}"
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                return Observation(node, key, None, error=error)
            await asyncio.sleep(0.2)

    async def run() -> list[Observation]:
        gate = asyncio.Semaphore(READ_CONCURRENCY)
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, verify=verify, headers=headers) as client:
            return list(await asyncio.gather(*(one(client, gate, node, key) for node in urls for key in keys)))

    return asyncio.run(run())


def record_writes(
    url: str,
    writes: Iterable[tuple[str, bytes | None]],
    *,
    client: int = -1,
    consistency: str = "quorum",
    ttl_s: float | None = None,
) -> list[Op]:
    """Write one key after another through one node, each once its previous
    answer came: (key, value) puts, (key, None) deletes. Their history."""
    ops = []
    params: dict[str, str] = {"consistency": consistency}
    if ttl_s is not None:
        params["ttl"] = f"{ttl_s:g}"
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as http:
        for key, value in writes:
            path = f"{url}/kv/{quote(key, safe='')}"
            sent = time.monotonic()
            try:
                resp = (
                    http.delete(path, params=params) if value is None else http.put(path, content=value, params=params)
                )
                outcome: Outcome = (
                    "ok" if resp.status_code == 204 else "failed" if resp.status_code < 500 else "unknown"
                )
                error = "" if outcome == "ok" else f"HTTP {resp.status_code} {resp.text[:200]}"
            except httpx.HTTPError as exc:
                outcome, error = "unknown", f"{type(exc).__name__}: {exc}"
            finished = time.monotonic()
            kind: Kind = "delete" if value is None else "put"
            ops.append(
                Op(
                    client,
                    kind,
                    key,
                    value,
                    sent,
                    finished if outcome == "ok" else None,
                    outcome,
                    error,
                    finished,
                    ttl_s if kind == "put" else None,
                )
            )
    return ops


def record_deletes(url: str, keys: Iterable[str], *, client: int = -1) -> list[Op]:
    """Delete keys one by one through one node, synchronously; their history."""
    return record_writes(url, ((key, None) for key in keys), client=client)
