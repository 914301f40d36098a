"""The Kubernetes membership source: ring members are the StatefulSet's pods
<sts>-0 .. <sts>-(replicas-1), each at its stable DNS name through the headless
Service; pod readiness feeds routing (MembershipSink.set_peer_ready), never
membership. Built by app.web.app (membership_source) for `--membership
kubernetes`; it is the only module importing the `kubernetes` client.

How it watches (the kopf way): list, remember the resourceVersion, watch from
it; a watch window that ends resumes from the last resourceVersion; `410 Gone`
(an HTTP 410 or an ERROR event in the stream) goes back to listing; any other
failure is counted (sink.record_source_error), retried with capped exponential
backoff, and the last known members stay in use. The sync client runs in one
daemon thread per watch (StatefulSet, pods), which pushes plain events into
the event loop; every client error is translated into a reason string at
that boundary, so nothing from the client escapes this module.

What the reports mean (members, readiness, counts) is worked out by the
pure app.membership.statefulset.StatefulSetTracker; this module holds the
watch threads, the client login and the translation of client errors.

RBAC: get/list/watch on statefulsets and pods in the namespace, which is
all the chart's Role grants.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import kubernetes.client
import kubernetes.config
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from kubernetes.watch.watch import iter_resp_lines

from app.config import NodeConfig
from app.errors import ConfigError
from app.membership.base import MembershipSink, MembershipSource
from app.membership.statefulset import (
    PODS,
    STATEFULSETS,
    Change,
    Connected,
    Event,
    Expired,
    Failure,
    Snapshot,
    StatefulSetTracker,
)

log = logging.getLogger(__name__)

WATCH_WINDOW_S = 5  # timeoutSeconds: the API server ends each watch after this and we resume; short so a stop is quick
WATCH_READ_TIMEOUT_S = (
    WATCH_WINDOW_S + 2.0
)  # client side: a server ignoring timeoutSeconds (or a dead link) holds a thread no longer
CONNECT_TIMEOUT_S = 2.0  # an API server that does not accept within this counts as down
LIST_TIMEOUT_S = 5.0  # one list or get: a few pods and one StatefulSet answer in milliseconds
REFRESH_TIMEOUT_S = 3.0  # the re-read before exit (Node.drain): an API outage must not hold the pod's shutdown
HTTP_RETRIES = 0  # urllib3 retries per request: none, our loop retries with backoff (and logs once per failure)
BACKOFF_INITIAL_S = 0.5  # first retry after a failure
BACKOFF_MAX_S = 30.0  # capped: a long API outage is retried twice a minute per watch
STOP_JOIN_S = 1.0  # how long run() waits for its threads on cancellation (they are daemons; sockets are shut)
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"  # where the kubelet mounts the token and ca.crt

# What to fix, appended to the reason a connection to the API server failed (the node stays unready meanwhile).
UNTRUSTED_HINT = (
    f"the server's certificate is not signed by the CA the node trusts: {SERVICE_ACCOUNT_DIR}/ca.crt "
    "in a pod (the service-account token mount), else the kubeconfig's certificate-authority"
)
UNREACHABLE_HINT = (
    "check KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT in a pod (set by the kubelet), "
    "else the kubeconfig's server, and any NetworkPolicy egress to the API server"
)
NO_CREDENTIALS_HINT = (
    "mount the service-account token (automountServiceAccountToken: true; chart: "
    "serviceAccount.automountServiceAccountToken) or pass --kubeconfig (KVSTORE_KUBECONFIG)"
)


def describe(exc: BaseException) -> str:
    """A client error as one short line (the translation boundary: nothing else leaves this module).
    A connection that fails says which setting to check."""
    if isinstance(exc, ApiException):
        return f"API error {exc.status}: {exc.reason}"
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        pool = getattr(exc, "pool", None)
        where = f" at {pool.host}:{pool.port}" if pool is not None else ""
        cause = exc.reason
        if isinstance(cause, urllib3.exceptions.SSLError):
            detail = str(cause.args[0] if cause.args else cause).splitlines()[0]
            return f"API server{where} untrusted ({detail}): {UNTRUSTED_HINT}"
        detail = str(cause).rpartition(": ")[2] or type(cause).__name__
        return f"API server{where} unreachable ({type(cause).__name__}: {detail}): {UNREACHABLE_HINT}"
    return f"{type(exc).__name__}: {exc}"


class _GoneError(Exception):
    """The watched resourceVersion is too old (410): list again."""


class _StreamError(Exception):
    """An ERROR event other than 410 in a watch stream."""


@dataclass
class _Watcher:
    """List, then watch from the list's resourceVersion, forever (until stop):
    runs in its own thread with the blocking client, emits Event values."""

    resource: str
    call: Callable[..., Any]  # list_namespaced_*: lists, or watches with watch=True
    namespace: str
    selectors: dict[str, str]  # field_selector / label_selector: server-side hints only
    emit: Callable[[Event], None]
    stop: threading.Event
    _response: Any = field(default=None, init=False)

    def run(self) -> None:
        resource_version: str | None = None
        delay = BACKOFF_INITIAL_S
        while not self.stop.is_set():
            try:
                if resource_version is None:
                    resource_version = self._list()
                resource_version = self._watch(resource_version)
                delay = BACKOFF_INITIAL_S
            except _GoneError:
                log.info("%s: watch expired (410 Gone); listing again", self.resource)
                self.emit(Expired(self.resource))
                if resource_version is None:  # the list itself was refused as expired: back off, never spin
                    self.stop.wait(delay)
                    delay = min(delay * 2, BACKOFF_MAX_S)
                resource_version = None
            except Exception as exc:  # noqa: BLE001 - the boundary: every client failure becomes a reason string
                if self.stop.is_set():
                    break
                self.emit(Connected(self.resource, False))
                self.emit(Failure(self.resource, describe(exc)))
                self.stop.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)

    def interrupt(self) -> None:
        """Unblock a read in progress (called from another thread on stop)."""
        response = self._response
        if response is not None:
            # Already closed, or an older urllib3 without shutdown(): the read timeout bounds it.
            with contextlib.suppress(Exception):
                response.shutdown()

    def _list(self) -> str | None:
        try:
            response = self.call(
                self.namespace,
                **self.selectors,
                _preload_content=False,
                _request_timeout=(CONNECT_TIMEOUT_S, LIST_TIMEOUT_S),
            )
        except ApiException as exc:
            if exc.status == 410:
                raise _GoneError from exc
            raise
        body = json.loads(response.data)
        resource_version = (body.get("metadata") or {}).get("resourceVersion") or None
        self.emit(Snapshot(self.resource, list(body.get("items") or []), resource_version))
        return resource_version

    def _watch(self, resource_version: str | None) -> str | None:
        """One watch window; returns the resourceVersion to resume from."""
        try:
            response = self.call(
                self.namespace,
                **self.selectors,
                watch=True,
                resource_version=resource_version,
                timeout_seconds=WATCH_WINDOW_S,
                allow_watch_bookmarks=True,
                _preload_content=False,
                _request_timeout=(CONNECT_TIMEOUT_S, WATCH_READ_TIMEOUT_S),
            )
        except ApiException as exc:
            if exc.status == 410:
                raise _GoneError from exc
            raise
        self._response = response
        self.emit(Connected(self.resource, True))
        try:
            for line in iter_resp_lines(response):
                if self.stop.is_set():
                    break
                try:
                    event = json.loads(line)
                except ValueError:
                    event = None
                if not isinstance(event, dict):
                    # One garbled line (a proxy's, a truncated chunk) loses no state: the
                    # next event or relist corrects it. Said once per line, at warning.
                    log.warning(
                        "kubernetes: skipped a watch line on %s that is no JSON object: %.200r", self.resource, line
                    )
                    continue
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _GoneError
                    raise _StreamError(f"watch error {obj.get('code')} {obj.get('reason')}: {obj.get('message')}")
                resource_version = (obj.get("metadata") or {}).get("resourceVersion") or resource_version
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self.emit(Change(self.resource, kind, obj, resource_version))
                # BOOKMARK: only its resourceVersion matters, taken above.
        except urllib3.exceptions.ReadTimeoutError:
            pass  # nothing happened within the window (and the server did not end it): resume
        finally:
            self._response = None
            response.release_conn()
        return resource_version


class KubernetesMembership(MembershipSource):
    """Members follow the StatefulSet's spec.replicas; readiness follows its pods."""

    def __init__(
        self,
        *,
        api_client: Any,
        namespace: str,
        statefulset: str,
        headless_service: str,
        cluster_domain: str,
        port: int,
        scheme: str = "http",
    ) -> None:
        self.api_client = api_client
        self.scheme = scheme
        self.namespace = namespace
        self.statefulset = statefulset
        self.headless_service = headless_service
        self.cluster_domain = cluster_domain
        self.port = port
        self._apps = kubernetes.client.AppsV1Api(api_client)
        self._core = kubernetes.client.CoreV1Api(api_client)
        self.tracker = StatefulSetTracker(
            namespace=namespace,
            statefulset=statefulset,
            headless_service=headless_service,
            cluster_domain=cluster_domain,
            port=port,
            scheme=scheme,
        )

    @classmethod
    def from_config(cls, config: NodeConfig) -> KubernetesMembership:
        if not (config.namespace and config.statefulset and config.headless_service):
            raise ConfigError("config: --membership kubernetes needs --namespace, --statefulset and --headless-service")
        return cls(
            api_client=api_client_from(config.kubeconfig),
            namespace=config.namespace,
            statefulset=config.statefulset,
            headless_service=config.headless_service,
            cluster_domain=config.cluster_domain,
            port=config.port,
            scheme=config.scheme,
        )

    # -- MembershipSource ---------------------------------------------------

    async def run(self, sink: MembershipSink) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        stop = threading.Event()

        def emit(event: Event) -> None:
            if stop.is_set():
                return
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the loop is closed: the node is gone
                stop.set()

        watchers: list[_Watcher] = []
        threads: list[threading.Thread] = []

        def start(watcher: _Watcher) -> None:
            thread = threading.Thread(target=watcher.run, name=f"k8s-watch-{watcher.resource}", daemon=True)
            watchers.append(watcher)
            threads.append(thread)
            thread.start()

        start(
            _Watcher(
                resource=STATEFULSETS,
                call=self._apps.list_namespaced_stateful_set,
                namespace=self.namespace,
                selectors={"field_selector": f"metadata.name={self.statefulset}"},
                emit=emit,
                stop=stop,
            )
        )
        try:
            while True:
                event = await queue.get()
                await self.tracker.apply(event, sink)
                if self.tracker.selector and len(watchers) == 1:  # pods are watched once the selector is known
                    start(
                        _Watcher(
                            resource=PODS,
                            call=self._core.list_namespaced_pod,
                            namespace=self.namespace,
                            selectors={
                                "label_selector": ",".join(f"{k}={v}" for k, v in sorted(self.tracker.selector.items()))
                            },
                            emit=emit,
                            stop=stop,
                        )
                    )
        finally:
            stop.set()
            for watcher in watchers:
                watcher.interrupt()
            await asyncio.to_thread(_join, threads, STOP_JOIN_S)
            self.tracker.disconnected()

    async def refresh(self, sink: MembershipSink) -> None:
        """One fresh read of the StatefulSet (a node about to exit checks whether it left)."""
        try:
            obj = await asyncio.wait_for(asyncio.to_thread(self._read_statefulset), REFRESH_TIMEOUT_S + 1.0)
        except Exception as exc:  # noqa: BLE001 - translated here; the last known view stays
            self.tracker.failed(sink, f"re-reading the statefulset: {describe(exc)}")
            return
        self.tracker.confirmed()
        await self.tracker.apply_statefulset(obj, sink)

    def status(self) -> dict[str, object]:
        return {"kind": "kubernetes", **self.tracker.status()}

    def staleness_s(self) -> float:
        return self.tracker.staleness_s()

    def _read_statefulset(self) -> dict[str, Any]:
        response = self._apps.read_namespaced_stateful_set(
            self.statefulset,
            self.namespace,
            _preload_content=False,
            _request_timeout=(min(CONNECT_TIMEOUT_S, REFRESH_TIMEOUT_S), REFRESH_TIMEOUT_S),
        )
        return json.loads(response.data)  # type: ignore[attr-defined]  # _preload_content=False returns the raw response, not the model its annotation names


def api_client_from(kubeconfig: str | None) -> Any:
    """An ApiClient from --kubeconfig, else $KUBECONFIG, else the pod's service
    account (in-cluster). Never writes the kubeconfig back (read-only root FS)."""
    configuration = kubernetes.client.Configuration()
    path = kubeconfig or os.environ.get("KUBECONFIG")
    try:
        if path:
            kubernetes.config.load_kube_config(
                config_file=path, client_configuration=configuration, persist_config=False
            )
        else:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
    except (ConfigException, OSError) as exc:
        if path:
            raise ConfigError(
                f"config: cannot load Kubernetes credentials from kubeconfig {path} (--kubeconfig, KUBECONFIG): {exc}"
            ) from exc
        raise ConfigError(f"config: no in-cluster Kubernetes credentials ({exc}): {NO_CREDENTIALS_HINT}") from exc
    configuration.retries = HTTP_RETRIES
    return kubernetes.client.ApiClient(configuration)


def _join(threads: list[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
