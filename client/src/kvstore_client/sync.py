"""Client: the blocking client (thread-safe; batches fan out over a small
thread pool). Its asyncio twin is kvstore_client.aio.AsyncClient, with the
same methods; routing, calls and errors are shared (routing, calls, errors).

A connection that failed or timed out is never reused: httpx (httpcore)
closes a connection whose response was not read to the end, on any error or
timeout, instead of returning it to the pool, so a late answer can never be
read as the next caller's (riak-python-client #425); tests/unit/test_client_connections.py
holds it to that with a server that answers late.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import httpx

from kvstore_client import calls
from kvstore_client.calls import Call, Key, Value
from kvstore_client.errors import KvstoreError, Unavailable, from_answer
from kvstore_client.options import DEFAULT_MAX_CONNECTIONS, DEFAULT_TIMEOUT_S, is_tls_failure, options, timeout
from kvstore_client.routing import EPOCH_HEADER, Router

T = TypeVar("T")
BATCH_THREADS = 8  # concurrent batch groups of one get_many/put_many (one per replica, rarely more)


class Client:
    """A kvstore client: give it one or more node URLs; it finds the rest.

        with Client(["http://127.0.0.1:8080"]) as kv:
            kv.put("user/42", b"...")
            kv.get("user/42")

    timeout: seconds one operation may take, retries included.
    ring_aware=False sends everything through the given URLs (in order of
    load), as a plain HTTP client would.
    """

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
        self._http = httpx.Client(verify=opts.verify, headers=opts.headers, limits=opts.limits)
        self._refresh_lock = threading.Lock()
        self._max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._http.close()

    # -- the API -----------------------------------------------------------------

    def get(self, key: Key, *, consistency: str | None = None, timeout: float | None = None) -> bytes | None:
        """The key's value, or None when it is absent."""
        raw = calls.key_bytes(key)
        return self._run(calls.get(raw, consistency), raw, timeout)

    def put(
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
        call = calls.put(raw, calls.value_bytes(value), ttl=ttl, consistency=consistency)
        return self._run(call, raw, timeout)

    def delete(self, key: Key, *, consistency: str | None = None, timeout: float | None = None) -> None:
        """Delete the key (deleting an absent key is no error)."""
        raw = calls.key_bytes(key)
        self._run(calls.delete(raw, consistency), raw, timeout)

    def get_many(
        self, keys: Iterable[Key], *, consistency: str | None = None, timeout: float | None = None
    ) -> dict[Any, bytes]:
        """The values of the keys that exist, by the key as given."""
        named = {calls.key_bytes(key): key for key in keys}
        groups = self._groups(list(named))
        found: dict[Any, bytes] = {}
        for values in self._fan_out([(calls.get_many(g, consistency), url) for url, g in groups], timeout):
            found.update({named[raw]: value for raw, value in values.items()})
        return found

    def put_many(
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
        groups = self._groups(list(named))
        jobs = [(calls.put_many({k: values[k] for k in g}, ttl=ttl, consistency=consistency), url) for url, g in groups]
        versions: dict[Any, str] = {}
        for answer in self._fan_out(jobs, timeout):
            versions.update({named[raw]: version for raw, version in answer.items()})
        return versions

    def ring(self, *, timeout: float | None = None) -> dict[str, Any]:
        """A node's view of the cluster (GET /ring): members, reachability, shares."""
        return self._run(calls.ring(), None, timeout)

    # -- node-level calls (the CLI's backup and restore) --------------------------

    @contextmanager
    def stream(
        self, path: str, *, params: Mapping[str, str | float] | None = None, read_timeout: float
    ) -> Iterator[Iterator[bytes]]:
        """GET a streamed answer from the first node to try (the seeds, without
        ring awareness), yielding its body's chunks; unrouted and not retried:
        a stream cannot resume elsewhere. A non-2xx answer raises its typed
        error, a connection lost before or during the stream Unavailable."""
        url = self.router.targets()[0]
        try:
            with self._http.stream(
                "GET", url + path, params=params, timeout=httpx.Timeout(self.timeout, read=read_timeout)
            ) as resp:
                if resp.status_code >= 300:
                    raise from_answer(resp.status_code, resp.read(), node=url)
                yield resp.iter_bytes()
        except httpx.TransportError as exc:
            raise Unavailable(f"cannot reach: {type(exc).__name__}: {exc}", node=url) from exc

    def post(self, path: str, content: bytes, *, params: Mapping[str, str], timeout: float) -> Any:
        """POST bytes to one node and return its JSON answer (a restore chunk):
        sent once (never retried: the caller knows whether its call may repeat)."""
        call: Call[Any] = Call(
            "POST",
            path,
            lambda _s, _h, body: calls.json_body(body),
            (200,),
            params=dict(params),
            content=content,
            headers={"content-type": "application/octet-stream"},
            idempotent=False,
        )
        return self._send(call, self.router.targets(), time.monotonic() + timeout)

    # -- machinery -----------------------------------------------------------------

    def _groups(self, keys: list[bytes]) -> list[tuple[str, list[bytes]]]:
        self._refresh_if_due()
        size = self.router.view.batch_max_keys if self.router.view is not None else 256
        return [(url, chunk) for url, group in self.router.group(keys).items() for chunk in calls.chunks(group, size)]

    def _fan_out(self, jobs: list[tuple[Call[T], str]], timeout: float | None) -> list[T]:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)

        def one(job: tuple[Call[T], str]) -> T:
            call, url = job
            return self._send(call, [url, *(u for u in self.router.targets() if u != url)], deadline)

        if len(jobs) <= 1:
            return [one(job) for job in jobs]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(BATCH_THREADS, thread_name_prefix="kvstore-client")
        return list(self._pool.map(one, jobs))

    def _run(self, call: Call[T], key: bytes | None, timeout: float | None) -> T:
        self._refresh_if_due()
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        return self._send(call, self.router.targets(key), deadline)

    def _send(self, call: Call[T], urls: list[str], deadline: float, *, max_tries: int | None = None) -> T:
        router = self.router
        last: KvstoreError | None = None
        answered: KvstoreError | None = None  # the last 503 a node answered with
        refused_tls: set[str] = set()
        for tries, attempt in enumerate(router.attempts(urls, deadline, skip=refused_tls)):
            if tries:
                if not call.idempotent or tries == max_tries:
                    break
                time.sleep(router.backoff(tries, deadline))
            url = attempt.url
            # Wait for a connection here, not in httpx's pool (see DEFAULT_MAX_CONNECTIONS).
            if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                last = last or Unavailable(f"all {self._max_connections} connections stayed busy until the deadline")
                break
            router.begin(url)
            try:
                resp = self._http.request(
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

    def _refresh_if_due(self) -> None:
        """Fetch the ring when the router wants it; one caller at a time, the
        others carry on with the view they have."""
        router = self.router
        if not router.refresh_due() or not self._refresh_lock.acquire(blocking=False):
            return
        try:
            if not router.refresh_due():
                return
            sources = router.refresh_sources()
            deadline = time.monotonic() + self.timeout
            for url in sources:
                try:
                    view = self._send(calls.ring_tokens(), [url], min(deadline, time.monotonic() + 1.0), max_tries=1)
                    router.install(view)
                    return
                except KvstoreError:
                    continue
            router.refresh_failed()
        finally:
            self._refresh_lock.release()
