"""A Kubernetes API test double for the discovery tests: kmock's stateful
emulator served from a background thread (its own event loop), written to
through plain HTTP like a controller would, with a few scripted faults kmock
cannot produce by itself (a watch the server ends, 410 Gone mid-stream, the
API server going away and coming back on the same port).

Used by tests/k8s/test_discovery.py, test_image.py and, as the cluster `helm`
looks Secrets up in (declare_kinds: the discovery helm maps kinds through),
test_chart_auth.py; nothing in app/ imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import aiohttp.test_utils
import attrs
import httpx
import kmock

T = TypeVar("T")

START_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = 5.0
CONTROL = "x-kvstore-test-control"  # event type of the in-band sentinels below: never reaches a client

SHUTDOWN_TIMEOUT_S = 0.5  # how long a stopping server waits for open requests (watches never finish by themselves)

STATEFULSETS = "/apis/apps/v1/namespaces/{ns}/statefulsets"
PODS = "/api/v1/namespaces/{ns}/pods"


@attrs.define(kw_only=True)
class ScriptedKubernetes(kmock.KubernetesEmulator):
    """kmock's emulator whose open watch streams the test can end (cleanly, as
    a server ending a watch window does) or break with an ERROR 410 event (as a
    server does when the watched resourceVersion is too old).

    The control event goes through kmock's own event bus, so it reaches exactly
    the streams open at that moment; the wrapper below turns it into the end of
    the stream or the ERROR event and is never seen by a client as such."""

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:
        async for event in super()._serve_watch(request):
            if isinstance(event, dict) and event.get("type") == CONTROL:
                if event["action"] == "gone":
                    yield {
                        "type": "ERROR",
                        "object": {
                            "apiVersion": "v1",
                            "kind": "Status",
                            "metadata": {},
                            "status": "Failure",
                            "reason": "Expired",
                            "code": 410,
                            "message": "too old resource version: 1 (2)",
                        },
                    }
                return  # the server ends the stream
            yield event

    async def _serve_version(self, request: Any) -> Any:
        """kmock names the core group's version "/v1" in its APIResourceList; a real API server
        says "v1", and client-go's discovery (helm's) finds no core kind otherwise."""
        payload = await super()._serve_version(request)
        if isinstance(payload, dict) and payload.get("groupVersion") == "/v1":
            payload["groupVersion"] = "v1"
        return payload

    async def control_watches(self, *, plural: str, namespace: str, action: str) -> int:
        """Send a control sentinel to every open watch of `plural`; returns how many buses got it."""
        sent = 0
        for resource, bus in list(self._buses.items()):
            if resource.plural == plural:
                await bus.put({"type": CONTROL, "action": action, "object": {"metadata": {"namespace": namespace}}})
                sent += 1
        return sent


class _QuickStopServer(aiohttp.test_utils.RawTestServer):
    """aiohttp's test server, but stopping it drops open watches at once
    (aiohttp would wait up to 60 s for them to finish)."""

    async def _make_runner(self, debug: bool = True, **kwargs: Any) -> Any:
        runner = await super()._make_runner(debug=debug, **kwargs)
        runner._shutdown_timeout = SHUTDOWN_TIMEOUT_S
        return runner


class KubeAPI:
    """kmock on 127.0.0.1:<port> in a thread. The emulator (its objects) lives
    as long as this object; the HTTP server on top can be stopped and started
    again on the same port (an API server restart or outage)."""

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port
        self.handler: ScriptedKubernetes | None = None
        self._server: kmock.Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kmock", daemon=True)
        self._http = httpx.Client(
            timeout=HTTP_TIMEOUT_S, limits=httpx.Limits(max_keepalive_connections=0)
        )  # survives server restarts

    # -- lifecycle ---------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = START_TIMEOUT_S) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> KubeAPI:
        self._thread.start()

        async def enter() -> None:
            handler = ScriptedKubernetes()
            await handler.__aenter__()
            # Declared resources list as empty (not 404) before their first object exists.
            for resource in ("apps/v1/statefulsets", "v1/pods", "discovery.k8s.io/v1/endpointslices"):
                handler.resources[resource] = kmock.ResourceInfo(namespaced=True, verbs={"get", "list", "watch"})
            self.handler = handler

        self._call(enter())
        self.start_server()
        return self

    def start_server(self) -> None:
        """Serve the emulator over HTTP (again, on the same port if it ran before)."""
        handler = self.handler
        assert handler is not None and self._server is None

        async def serve() -> kmock.Server:
            server = kmock.Server(handler, host=self.host, port=self.port, server_cls=_QuickStopServer)
            await server.__aenter__()
            return server

        self._server = self._call(serve())
        self.port = self._server.port

    def stop_server(self) -> None:
        """The API server goes away: its port refuses connections, open watches break."""
        if self._server is None:
            return
        server, self._server = self._server, None
        self._call(server.__aexit__(None, None, None))

    def close(self) -> None:
        try:
            self.stop_server()
            if self.handler is not None:
                self._call(self.handler.__aexit__(None, None, None))
        finally:
            self._http.close()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(START_TIMEOUT_S)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> KubeAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def write_kubeconfig(self, path: Path, *, namespace: str) -> Path:
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: kmock\n  cluster:\n    server: {self.url}\n"
            "users:\n- name: test\n  user:\n    token: test-token\n"
            f"contexts:\n- name: kmock\n  context:\n    cluster: kmock\n    user: test\n    namespace: {namespace}\n"
            "current-context: kmock\n"
        )
        return path

    def declare_kinds(self, kinds: dict[str, str]) -> None:
        """Serve discovery for these namespaced resources ("v1/secrets", "apps/v1/statefulsets" ->
        their Kind), so that a client mapping kinds through discovery (helm) finds them all."""
        assert self.handler is not None
        for resource, kind in kinds.items():
            self.handler.resources[resource] = kmock.ResourceInfo(
                namespaced=True, kind=kind, singular=kind.lower(), verbs={"get", "list", "create", "patch", "delete"}
            )

    # -- scripted faults ---------------------------------------------------

    def end_watches(self, *, plural: str, namespace: str) -> int:
        """The server ends every open watch of `plural` (a clean end of stream)."""
        assert self.handler is not None
        return self._call(self.handler.control_watches(plural=plural, namespace=namespace, action="close"))

    def expire_watches(self, *, plural: str, namespace: str) -> int:
        """Every open watch of `plural` gets an ERROR event with code 410 (Gone), then ends."""
        assert self.handler is not None
        return self._call(self.handler.control_watches(plural=plural, namespace=namespace, action="gone"))

    def requests(self, *, plural: str) -> list[tuple[str, dict[str, str]]]:
        """(action, query params) of every request for `plural` so far, oldest first."""
        assert self.handler is not None
        return [
            (str(getattr(req.action, "value", req.action)), dict(req.params))
            for req in list(self.handler._requests)
            if req.resource is not None and req.resource.plural == plural
        ]

    # -- writes through HTTP (objects put in the store directly emit no watch events) --

    def _request(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"content-type": "application/merge-patch+json"} if method == "PATCH" else {}
        resp = self._http.request(method, self.url + path, json=body, headers=headers)
        assert 200 <= resp.status_code < 300, f"{method} {path}: {resp.status_code} {resp.text[:500]}"
        return resp.json()

    def create_statefulset(
        self, *, namespace: str, name: str, replicas: int, service: str, labels: dict[str, str]
    ) -> None:
        self._request(
            "POST",
            STATEFULSETS.format(ns=namespace),
            {
                "apiVersion": "apps/v1",
                "kind": "StatefulSet",
                "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
                "spec": {
                    "replicas": replicas,
                    "serviceName": service,
                    "podManagementPolicy": "Parallel",
                    "selector": {"matchLabels": dict(labels)},
                    "template": {
                        "metadata": {"labels": dict(labels)},
                        "spec": {"containers": [{"name": "kvstore", "image": "kvstore"}]},
                    },
                },
            },
        )

    def create_secret(self, doc: dict[str, Any]) -> None:
        namespace = doc["metadata"]["namespace"]
        self._request("POST", f"/api/v1/namespaces/{namespace}/secrets", doc)

    def scale_statefulset(self, *, namespace: str, name: str, replicas: int) -> None:
        self._request("PATCH", f"{STATEFULSETS.format(ns=namespace)}/{name}", {"spec": {"replicas": replicas}})

    def create_pod(self, *, namespace: str, name: str, labels: dict[str, str], ready: bool = False) -> None:
        self._request(
            "POST",
            PODS.format(ns=namespace),
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
                "spec": {"containers": [{"name": "kvstore", "image": "kvstore"}]},
                "status": _pod_status(ready),
            },
        )

    def set_pod_ready(self, *, namespace: str, name: str, ready: bool) -> None:
        self._request("PATCH", f"{PODS.format(ns=namespace)}/{name}/status", {"status": _pod_status(ready)})

    def delete_pod(self, *, namespace: str, name: str) -> None:
        resp = self._http.delete(f"{self.url}{PODS.format(ns=namespace)}/{name}")
        assert resp.status_code in (200, 202), f"DELETE pod {name}: {resp.status_code} {resp.text[:500]}"


def _pod_status(ready: bool) -> dict[str, Any]:
    flag = "True" if ready else "False"
    return {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": flag}, {"type": "ContainersReady", "status": flag}],
    }


@contextlib.contextmanager
def kube_api(**kwargs: Any) -> Any:
    api = KubeAPI(**kwargs)
    try:
        yield api.start()
    finally:
        api.close()
