"""The Kubernetes membership source: ring members are the StatefulSet's pods
<sts>-0 .. <sts>-(replicas-1), each at its stable DNS name through the headless
Service; pod readiness feeds routing (DiscoverySink.set_peer_ready), never
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

RBAC: get/list/watch on statefulsets and pods in the namespace, which is
all the chart's Role grants.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
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
from app.membership.base import DiscoverySink, MembershipSource

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
DEFAULT_REPLICAS = 1  # what Kubernetes assumes when spec.replicas is absent
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"  # where the kubelet mounts the token and ca.crt

STATEFULSETS = "statefulsets"
PODS = "pods"


def member_urls(
    *, statefulset: str, replicas: int, service: str, namespace: str, domain: str, port: int, scheme: str = "http"
) -> dict[str, str]:
    """{pod name: base URL} of the ring for `replicas` pods (their stable DNS names;
    https when the nodes serve TLS, whose certificates name these hosts)."""
    return {
        f"{statefulset}-{i}": f"{scheme}://{statefulset}-{i}.{service}.{namespace}.svc.{domain}:{port}"
        for i in range(replicas)
    }


def statefulset_replicas(obj: dict[str, Any]) -> int:
    replicas = (obj.get("spec") or {}).get("replicas")
    return DEFAULT_REPLICAS if replicas is None else int(replicas)


def statefulset_selector(obj: dict[str, Any]) -> dict[str, str]:
    return dict(((obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {})


def pod_is_ready(obj: dict[str, Any]) -> bool:
    """The pod's Ready condition; a terminating pod is never ready."""
    if (obj.get("metadata") or {}).get("deletionTimestamp"):
        return False
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def pod_matches(obj: dict[str, Any], *, statefulset: str, selector: dict[str, str]) -> bool:
    """One of the StatefulSet's pods: its selector's labels and an ordinal name.
    (Filtered here as well as server-side: a selector is only a hint to a server.)"""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    name = meta.get("name") or ""
    return (
        bool(selector)
        and all(labels.get(k) == v for k, v in selector.items())
        and re.fullmatch(rf"{re.escape(statefulset)}-\d+", name) is not None
    )


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


# -- events from the watch threads to the event loop --------------------------


@dataclass(frozen=True)
class _Snapshot:
    resource: str
    items: list[dict[str, Any]]
    resource_version: str | None


@dataclass(frozen=True)
class _Change:
    resource: str
    type: str  # ADDED, MODIFIED, DELETED
    obj: dict[str, Any]
    resource_version: str | None


@dataclass(frozen=True)
class _Connected:
    resource: str
    connected: bool


@dataclass(frozen=True)
class _Failure:
    resource: str
    reason: str


@dataclass(frozen=True)
class _Expired:
    resource: str


_Event = _Snapshot | _Change | _Connected | _Failure | _Expired


class _GoneError(Exception):
    """The watched resourceVersion is too old (410): list again."""


class _StreamError(Exception):
    """An ERROR event other than 410 in a watch stream."""


@dataclass
class _Watcher:
    """List, then watch from the list's resourceVersion, forever (until stop):
    runs in its own thread with the blocking client, emits _Event values."""

    resource: str
    call: Callable[..., Any]  # list_namespaced_*: lists, or watches with watch=True
    namespace: str
    selectors: dict[str, str]  # field_selector / label_selector: server-side hints only
    emit: Callable[[_Event], None]
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
                self.emit(_Expired(self.resource))
                if resource_version is None:  # the list itself was refused as expired: back off, never spin
                    self.stop.wait(delay)
                    delay = min(delay * 2, BACKOFF_MAX_S)
                resource_version = None
            except Exception as exc:  # noqa: BLE001 - the boundary: every client failure becomes a reason string
                if self.stop.is_set():
                    break
                self.emit(_Connected(self.resource, False))
                self.emit(_Failure(self.resource, describe(exc)))
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
        self.emit(_Snapshot(self.resource, list(body.get("items") or []), resource_version))
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
        self.emit(_Connected(self.resource, True))
        try:
            for line in iter_resp_lines(response):
                if self.stop.is_set():
                    break
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(event, dict):
                    continue
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _GoneError
                    raise _StreamError(f"watch error {obj.get('code')} {obj.get('reason')}: {obj.get('message')}")
                resource_version = (obj.get("metadata") or {}).get("resourceVersion") or resource_version
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self.emit(_Change(self.resource, kind, obj, resource_version))
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
        self.replicas: int | None = None
        self.resource_version: str | None = None
        self.errors = 0
        self.relists = 0
        self.last_error: str | None = None
        self._members: dict[str, str] = {}
        self._selector: dict[str, str] = {}
        self._pods: dict[str, bool] = {}  # pod name -> ready, for the StatefulSet's pods
        self._pods_listed = False
        self._reported: dict[str, bool] = {}  # readiness last told to the sink, per member
        self._connected: dict[str, bool] = {}
        self._created = time.monotonic()
        self._last_ok: float | None = None

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

    async def run(self, sink: DiscoverySink) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[_Event] = asyncio.Queue()
        stop = threading.Event()

        def emit(event: _Event) -> None:
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
                await self._apply(event, sink)
                if self._selector and len(watchers) == 1:  # pods are watched once the selector is known
                    start(
                        _Watcher(
                            resource=PODS,
                            call=self._core.list_namespaced_pod,
                            namespace=self.namespace,
                            selectors={
                                "label_selector": ",".join(f"{k}={v}" for k, v in sorted(self._selector.items()))
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
            self._connected.clear()

    async def refresh(self, sink: DiscoverySink) -> None:
        """One fresh read of the StatefulSet (a node about to exit checks whether it left)."""
        try:
            obj = await asyncio.wait_for(asyncio.to_thread(self._read_statefulset), REFRESH_TIMEOUT_S + 1.0)
        except Exception as exc:  # noqa: BLE001 - translated here; the last known view stays
            self._failed(sink, f"re-reading the statefulset: {describe(exc)}")
            return
        self._confirmed()
        await self._apply_statefulset(obj, sink)

    def status(self) -> dict[str, object]:
        return {
            "kind": "kubernetes",
            "statefulset": self.statefulset,
            "namespace": self.namespace,
            "replicas": self.replicas,
            "resource_version": self.resource_version,
            "errors": self.errors,
            "relists": self.relists,
            "last_error": self.last_error,
            "connected": self.connected,
        }

    def staleness_s(self) -> float:
        """0 while every watch is open (the server pushes any change); else the
        seconds since the last list, event or confirmed (re)connection."""
        now = time.monotonic()
        if self.connected:
            self._last_ok = now
        return now - (self._last_ok if self._last_ok is not None else self._created)

    @property
    def connected(self) -> bool:
        return bool(self._connected) and all(self._connected.values()) and STATEFULSETS in self._connected

    # -- applying events (on the event loop) --------------------------------

    async def _apply(self, event: _Event, sink: DiscoverySink) -> None:
        if isinstance(event, _Failure):
            self._failed(sink, f"{event.resource}: {event.reason}")
        elif isinstance(event, _Expired):
            self.relists += 1
        elif isinstance(event, _Connected):
            self._connected[event.resource] = event.connected
            if event.connected:
                self._confirmed()
        elif isinstance(event, _Snapshot):
            self._confirmed()
            if event.resource == STATEFULSETS:
                self.resource_version = event.resource_version
                mine = [obj for obj in event.items if (obj.get("metadata") or {}).get("name") == self.statefulset]
                if not mine:
                    self._failed(
                        sink, f"statefulset {self.namespace}/{self.statefulset} not found; keeping the last known ring"
                    )
                    return
                await self._apply_statefulset(mine[0], sink)
            else:
                self._pods = {
                    obj["metadata"]["name"]: pod_is_ready(obj)
                    for obj in event.items
                    if pod_matches(obj, statefulset=self.statefulset, selector=self._selector)
                }
                self._pods_listed = True
                self._sync_readiness(sink)
        elif isinstance(event, _Change):
            self._confirmed()
            name = str((event.obj.get("metadata") or {}).get("name") or "")
            if event.resource == STATEFULSETS:
                if name != self.statefulset:
                    return
                self.resource_version = event.resource_version
                if event.type == "DELETED":
                    self._failed(
                        sink,
                        f"statefulset {self.namespace}/{self.statefulset} was deleted; keeping the last known ring",
                    )
                else:
                    await self._apply_statefulset(event.obj, sink)
            elif pod_matches(event.obj, statefulset=self.statefulset, selector=self._selector):
                if event.type == "DELETED":
                    self._pods.pop(name, None)
                else:
                    self._pods[name] = pod_is_ready(event.obj)
                self._sync_readiness(sink)

    async def _apply_statefulset(self, obj: dict[str, Any], sink: DiscoverySink) -> None:
        self._selector = statefulset_selector(obj) or self._selector
        replicas = statefulset_replicas(obj)
        if replicas < 1:
            log.warning("statefulset %s scaled to %d: keeping the last known ring", self.statefulset, replicas)
            return
        if replicas == self.replicas:
            return
        members = member_urls(
            statefulset=self.statefulset,
            replicas=replicas,
            service=self.headless_service,
            namespace=self.namespace,
            domain=self.cluster_domain,
            port=self.port,
            scheme=self.scheme,
        )
        log.warning("statefulset %s has %d replicas: ring members %s", self.statefulset, replicas, sorted(members))
        await sink.set_members(members)
        self.replicas, self._members = replicas, members
        self._sync_readiness(sink)

    def _sync_readiness(self, sink: DiscoverySink) -> None:
        """Tell the sink each member's readiness when it changes; a member with
        no pod (not created yet, or deleted) is not ready."""
        if not self._pods_listed:
            return
        for name in self._members:
            ready = self._pods.get(name, False)
            if self._reported.get(name) != ready:
                self._reported[name] = ready
                sink.set_peer_ready(name, ready)
        for name in set(self._reported) - set(self._members):
            del self._reported[name]

    def _confirmed(self) -> None:
        self._last_ok = time.monotonic()

    def _failed(self, sink: DiscoverySink, reason: str) -> None:
        self.errors += 1
        self.last_error = reason
        sink.record_source_error(reason)

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
