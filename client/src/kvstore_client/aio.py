"""AsyncClient: the asyncio twin of kvstore_client.sync.Client, with the same
methods awaited; routing, calls and errors are shared (routing, calls, errors).

A call cancelled or timed out mid-answer leaves no connection behind for
the next caller: httpcore closes it, shielded from the cancellation, rather
than return it to the pool (see kvstore_client.sync).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import httpx

from kvstore_client import calls
from kvstore_client.calls import Call, Key, Value
from kvstore_client.errors import KvstoreError, Unavailable, from_answer
from kvstore_client.options import DEFAULT_MAX_CONNECTIONS, DEFAULT_TIMEOUT_S, is_tls_failure, options, timeout
from kvstore_client.routing import EPOCH_HEADER, Router

T = TypeVar("T")


class AsyncClient:
    """A kvstore client for asyncio: `async with AsyncClient([url]) as kv: await kv.get(...)`.
    The arguments are Client's."""

    def __init__(
        self,
        urls: str | Iterable[str],
        *,
        token: str | None = None,
        ca: str | ssl.SSLContext | None = None,
        cert: str | None = None,
        key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        ring_aware: bool = True,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        seeds = [urls] if isinstance(urls, str) else list(urls)
        self.router = Router(seeds, ring_aware=ring_aware)
        self.timeout = timeout
        opts = options(token=token, ca=ca, cert=cert, key=key, max_connections=max_connections)
        self._http = httpx.AsyncClient(verify=opts.verify, headers=opts.headers, limits=opts.limits)
        self._refreshing = False
        self._max_connections = max_connections
        self._slots = asyncio.Semaphore(max_connections)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- the API -----------------------------------------------------------------

    async def get(self, key: Key, *, consistency: str | None = None, timeout: float | None = None) -> bytes | None:
        """The key's value, or None when it is absent."""
        raw = calls.key_bytes(key)
        return await self._run(calls.get(raw, consistency), raw, timeout)

    async def put(
        self,
        key: Key,
        value: Value,
        *,
        ttl: float | None = None,
        consistency: str | None = None,
        timeout: float | None = None,
    ) -> str:
        """Store the value (str is UTF-8 encoded); returns the write's version."""
        raw = calls.key_bytes(key)
        return await self._run(calls.put(raw, calls.value_bytes(value), ttl=ttl, consistency=consistency), raw, timeout)

    async def delete(self, key: Key, *, consistency: str | None = None, timeout: float | None = None) -> None:
        """Delete the key (deleting an absent key is no error)."""
        raw = calls.key_bytes(key)
        await self._run(calls.delete(raw, consistency), raw, timeout)

    async def get_many(
        self, keys: Iterable[Key], *, consistency: str | None = None, timeout: float | None = None
    ) -> dict[Any, bytes]:
        """The values of the keys that exist, by the key as given."""
        named = {calls.key_bytes(key): key for key in keys}
        groups = await self._groups(list(named))
        found: dict[Any, bytes] = {}
        for values in await self._fan_out([(calls.get_many(g, consistency), url) for url, g in groups], timeout):
            found.update({named[raw]: value for raw, value in values.items()})
        return found

    async def put_many(
        self,
        items: Mapping[Key, Value],
        *,
        ttl: float | None = None,
        consistency: str | None = None,
        timeout: float | None = None,
    ) -> dict[Any, str]:
        """Store every item; returns each key's version. Not atomic: on an
        error some keys may be stored (calling it again is safe)."""
        named = {calls.key_bytes(key): key for key in items}
        values = {raw: calls.value_bytes(items[key]) for raw, key in named.items()}
        groups = await self._groups(list(named))
        jobs = [(calls.put_many({k: values[k] for k in g}, ttl=ttl, consistency=consistency), url) for url, g in groups]
        versions: dict[Any, str] = {}
        for answer in await self._fan_out(jobs, timeout):
            versions.update({named[raw]: version for raw, version in answer.items()})
        return versions

    async def ring(self, *, timeout: float | None = None) -> dict[str, Any]:
        """A node's view of the cluster (GET /ring): members, reachability, shares."""
        return await self._run(calls.ring(), None, timeout)

    # -- machinery -----------------------------------------------------------------

    async def _groups(self, keys: list[bytes]) -> list[tuple[str, list[bytes]]]:
        await self._refresh_if_due()
        size = self.router.view.batch_max_keys if self.router.view is not None else 256
        return [(url, chunk) for url, group in self.router.group(keys).items() for chunk in calls.chunks(group, size)]

    async def _fan_out(self, jobs: list[tuple[Call[T], str]], timeout: float | None) -> list[T]:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)

        async def one(call: Call[T], url: str) -> T:
            return await self._send(call, [url, *(u for u in self.router.targets() if u != url)], deadline)

        return list(await asyncio.gather(*(one(call, url) for call, url in jobs)))

    async def _run(self, call: Call[T], key: bytes | None, timeout: float | None) -> T:
        await self._refresh_if_due()
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        return await self._send(call, self.router.targets(key), deadline)

    async def _send(self, call: Call[T], urls: list[str], deadline: float, *, max_tries: int | None = None) -> T:
        router = self.router
        last: KvstoreError | None = None
        answered: KvstoreError | None = None  # the last 503 a node answered with
        refused_tls: set[str] = set()
        for tries, attempt in enumerate(router.attempts(urls, deadline, skip=refused_tls)):
            if tries:
                if not call.idempotent or tries == max_tries:
                    break
                await asyncio.sleep(router.backoff(tries, deadline))
            url = attempt.url
            # Wait for a connection here, not in httpx's pool: the wait counts
            # against the caller's deadline, and is no failure of the node.
            try:
                if self._slots.locked():
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):  # no task, unlike wait_for
                        await self._slots.acquire()
                else:
                    await self._slots.acquire()  # free: no timer needed
            except TimeoutError:
                last = last or Unavailable(f"all {self._max_connections} connections stayed busy until the deadline")
                break
            router.begin(url)
            try:
                resp = await self._http.request(
                    call.method,
                    url + call.path,
                    params=call.params,
                    content=call.content,
                    headers=call.headers,
                    timeout=timeout(attempt.timeout_s, attempt.connect_s),
                )
            except httpx.PoolTimeout as exc:  # this client is saturated; the node is not at fault
                last = Unavailable(f"no free connection in time: {exc}", node=url)
                continue
            except httpx.TransportError as exc:
                router.failed(url)
                last = Unavailable(f"cannot reach: {type(exc).__name__}: {exc}", node=url)
                if is_tls_failure(exc):
                    refused_tls.add(url)
                continue
            finally:
                router.end(url)
                self._slots.release()
            router.answered(url, resp.headers.get(EPOCH_HEADER))
            if resp.status_code == 503:
                answered = last = from_answer(503, resp.content, node=url)
                continue
            return call.answer(resp.status_code, resp.headers, resp.content, node=url)
        # A node's own reason (a quorum it could not reach) says more than a connection error.
        raise answered or last or Unavailable("the operation's timeout ran out before any node was asked")

    async def _refresh_if_due(self) -> None:
        """Fetch the ring when the router wants it: one task does, the others
        carry on with the view they have."""
        router = self.router
        if self._refreshing or not router.refresh_due():
            return
        self._refreshing = True
        try:
            deadline = time.monotonic() + self.timeout
            for url in router.refresh_sources():
                try:
                    view = await self._send(
                        calls.ring_tokens(), [url], min(deadline, time.monotonic() + 1.0), max_tries=1
                    )
                except KvstoreError:
                    continue
                router.install(view)
                return
            router.refresh_failed()
        finally:
            self._refreshing = False
