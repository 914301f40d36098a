"""Probes that look inside a running cluster, for the fault tests: each node's
own replica records (/internal/v1/kv), whether replicas agree, rebalancing
progress, reachability, membership changes, and `wait_for` to poll any of
them against a deadline. The processes themselves come from tests/harness."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import httpx

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


def _headers(token: str | None, bearer: str | None = None) -> dict[str, str]:
    """The cluster token (internal routes; admin routes without access control)
    and a user's bearer token (every client route under --auth-file)."""
    headers = {"x-kvstore-token": token} if token else {}
    if bearer:
        headers["authorization"] = f"Bearer {bearer}"
    return headers


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


def read_replicas(
    urls: dict[str, str], keys: Iterable[str], *, token: str | None = None, verify: ssl.SSLContext | bool = True
) -> dict[tuple[str, str], ReplicaRecord]:
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
        async with httpx.AsyncClient(timeout=INSPECT_TIMEOUT_S, headers=_headers(token), verify=verify) as client:
            records = await asyncio.gather(*(one(client, gate, urls[node_id], key) for node_id, key in pairs))
        return dict(zip(pairs, records, strict=True))

    return asyncio.run(run())


def divergent_keys(
    urls: dict[str, str],
    keys: Iterable[str],
    *,
    owners: Callable[[str], Iterable[str]],
    token: str | None = None,
    verify: ssl.SSLContext | bool = True,
) -> dict[str, dict[str, ReplicaRecord]]:
    """Keys whose replicas (owners(key), each read from its own store) do not all hold the same record."""
    keys = list(keys)
    records = read_replicas(urls, keys, token=token, verify=verify)
    divergent = {}
    for key in keys:
        replicas = {node_id: records[node_id, key] for node_id in owners(key)}
        first = next(iter(replicas.values()))
        if not all(first.same_as(other) for other in replicas.values()):
            divergent[key] = replicas
    return divergent


def wait_converged(
    urls: dict[str, str],
    keys: Iterable[str],
    *,
    owners: Callable[[str], Iterable[str]],
    timeout: float,
    token: str | None = None,
    verify: ssl.SSLContext | bool = True,
) -> float:
    """Wait until every key's replicas hold identical records; returns the seconds it took.

    Re-reads only the keys still divergent, then confirms with one full pass.
    """
    pending = list(keys)
    started = time.monotonic()

    def check() -> str | None:
        nonlocal pending
        divergent = divergent_keys(urls, pending, owners=owners, token=token, verify=verify)
        pending = list(divergent)
        if not divergent:
            return None
        key, replicas = next(iter(divergent.items()))
        shown = ", ".join(f"{node_id}: {record}" for node_id, record in replicas.items())
        return f"{len(divergent)} keys still differ between replicas, e.g. {key!r}: {shown}"

    wait_for(check, timeout=timeout, what="replicas converge", interval=0.2)
    full = divergent_keys(urls, keys, owners=owners, token=token, verify=verify)
    assert not full, f"replicas diverged again after converging: {sorted(full)[:5]}"
    return time.monotonic() - started


def admin_get(
    url: str, path: str, *, token: str | None = None, bearer: str | None = None, verify: ssl.SSLContext | bool = True
) -> Any:
    resp = httpx.get(url + path, headers=_headers(token, bearer), timeout=INSPECT_TIMEOUT_S, verify=verify)
    resp.raise_for_status()
    return resp.json()


def change_membership(
    url: str, peers: dict[str, str], *, token: str | None = None, bearer: str | None = None
) -> dict[str, Any]:
    """POST /admin/membership to one member; it applies the change everywhere."""
    resp = httpx.post(url + "/admin/membership", json={"peers": peers}, headers=_headers(token, bearer), timeout=30.0)
    assert resp.status_code == 200, f"membership change refused: {resp.status_code} {resp.text}"
    return resp.json()


def rebalancing_left(urls: dict[str, str], *, token: str | None = None, bearer: str | None = None) -> str | None:
    """None when every node reports syncing false and foreign_keys 0, else what is left."""
    left = []
    for node_id, url in urls.items():
        try:
            status = admin_get(url, "/admin/rebalance", token=token, bearer=bearer)
        except httpx.HTTPError as exc:
            left.append(f"{node_id}: {type(exc).__name__}: {exc}")
            continue
        if status.get("syncing") is not False or status.get("foreign_keys") != 0:
            left.append(f"{node_id}: {status}")
    return "; ".join(left) or None


def reachability(
    url: str, *, token: str | None = None, bearer: str | None = None, verify: ssl.SSLContext | bool = True
) -> dict[str, bool]:
    """{member id: reachable} as one node sees it (GET /ring)."""
    members = admin_get(url, "/ring", token=token, bearer=bearer, verify=verify)["members"]
    return {m["node_id"]: bool(m.get("reachable")) for m in members}


def unreachable_peers(
    urls: dict[str, str],
    *,
    expect: Iterable[str],
    token: str | None = None,
    bearer: str | None = None,
    verify: ssl.SSLContext | bool = True,
) -> str | None:
    """None when every node in urls sees every id in `expect` as reachable in /ring."""
    expect = set(expect)
    problems = []
    for node_id, url in urls.items():
        try:
            view = reachability(url, token=token, bearer=bearer, verify=verify)
        except httpx.HTTPError as exc:
            problems.append(f"{node_id}: {type(exc).__name__}")
            continue
        down = sorted(peer for peer in expect if not view.get(peer, False))
        if down:
            problems.append(f"{node_id} sees {down} unreachable")
    return "; ".join(problems) or None


def membership_disagreement(
    urls: dict[str, str], *, members: Iterable[str], token: str | None = None, bearer: str | None = None
) -> str | None:
    """None when every node in urls has exactly `members` in its ring."""
    members = set(members)
    problems = []
    for node_id, url in urls.items():
        try:
            seen = {m["node_id"] for m in admin_get(url, "/ring", token=token, bearer=bearer)["members"]}
        except httpx.HTTPError as exc:
            problems.append(f"{node_id}: {type(exc).__name__}")
            continue
        if seen != members:
            problems.append(f"{node_id} has {sorted(seen)}")
    return "; ".join(problems) or None
