"""A StatefulSet's ring, worked out from what the Kubernetes API reports:
the members its spec.replicas implies (the pods' stable DNS names), which
pods are its own, and when each is ready; pure, so it is tested event by
event without an API server or threads.

app.membership.kubernetes (the only importer of the `kubernetes` client)
lists and watches, and feeds each report (Snapshot, Change, Connected,
Failure, Expired) to a StatefulSetTracker, which tells its MembershipSink
about new members and readiness changes, and keeps the counts /ring shows.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.membership.base import MembershipSink

log = logging.getLogger(__name__)

DEFAULT_REPLICAS = 1  # what Kubernetes assumes when spec.replicas is absent
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


# -- what the watches report (app.membership.kubernetes emits these) ------------


@dataclass(frozen=True)
class Snapshot:
    resource: str
    items: list[dict[str, Any]]
    resource_version: str | None


@dataclass(frozen=True)
class Change:
    resource: str
    type: str  # ADDED, MODIFIED, DELETED
    obj: dict[str, Any]
    resource_version: str | None


@dataclass(frozen=True)
class Connected:
    resource: str
    connected: bool


@dataclass(frozen=True)
class Failure:
    resource: str
    reason: str


@dataclass(frozen=True)
class Expired:
    resource: str


Event = Snapshot | Change | Connected | Failure | Expired


class StatefulSetTracker:
    """The ring of one StatefulSet as its watches report it. Members follow
    spec.replicas; readiness follows its pods (and never changes membership)."""

    def __init__(
        self,
        *,
        namespace: str,
        statefulset: str,
        headless_service: str,
        cluster_domain: str,
        port: int,
        scheme: str = "http",
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.namespace = namespace
        self.statefulset = statefulset
        self.headless_service = headless_service
        self.cluster_domain = cluster_domain
        self.port = port
        self.scheme = scheme
        self._monotonic = monotonic
        self.replicas: int | None = None
        self.resource_version: str | None = None
        self.errors = 0
        self.relists = 0
        self.last_error: str | None = None
        self.selector: dict[str, str] = {}  # the StatefulSet's pod labels, once known (the pod watch needs them)
        self._members: dict[str, str] = {}
        self._pods: dict[str, bool] = {}  # pod name -> ready, for the StatefulSet's pods
        self._pods_listed = False
        self._reported: dict[str, bool] = {}  # readiness last told to the sink, per member
        self._connected: dict[str, bool] = {}
        self._created = monotonic()
        self._last_ok: float | None = None

    def status(self) -> dict[str, object]:
        return {
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
        now = self._monotonic()
        if self.connected:
            self._last_ok = now
        return now - (self._last_ok if self._last_ok is not None else self._created)

    @property
    def connected(self) -> bool:
        return bool(self._connected) and all(self._connected.values()) and STATEFULSETS in self._connected

    def disconnected(self) -> None:
        """Every watch stopped (the source's run ended)."""
        self._connected.clear()

    async def apply(self, event: Event, sink: MembershipSink) -> None:
        """Fold one watch report into the view; tell the sink what changed."""
        if isinstance(event, Failure):
            self.failed(sink, f"{event.resource}: {event.reason}")
        elif isinstance(event, Expired):
            self.relists += 1
        elif isinstance(event, Connected):
            self._connected[event.resource] = event.connected
            if event.connected:
                self.confirmed()
        elif isinstance(event, Snapshot):
            self.confirmed()
            if event.resource == STATEFULSETS:
                self.resource_version = event.resource_version
                mine = [obj for obj in event.items if (obj.get("metadata") or {}).get("name") == self.statefulset]
                if not mine:
                    self.failed(
                        sink, f"statefulset {self.namespace}/{self.statefulset} not found; keeping the last known ring"
                    )
                    return
                await self.apply_statefulset(mine[0], sink)
            else:
                self._pods = {
                    obj["metadata"]["name"]: pod_is_ready(obj)
                    for obj in event.items
                    if pod_matches(obj, statefulset=self.statefulset, selector=self.selector)
                }
                self._pods_listed = True
                self._sync_readiness(sink)
        elif isinstance(event, Change):
            self.confirmed()
            name = str((event.obj.get("metadata") or {}).get("name") or "")
            if event.resource == STATEFULSETS:
                if name != self.statefulset:
                    return
                self.resource_version = event.resource_version
                if event.type == "DELETED":
                    self.failed(
                        sink,
                        f"statefulset {self.namespace}/{self.statefulset} was deleted; keeping the last known ring",
                    )
                else:
                    await self.apply_statefulset(event.obj, sink)
            elif pod_matches(event.obj, statefulset=self.statefulset, selector=self.selector):
                if event.type == "DELETED":
                    self._pods.pop(name, None)
                else:
                    self._pods[name] = pod_is_ready(event.obj)
                self._sync_readiness(sink)

    async def apply_statefulset(self, obj: dict[str, Any], sink: MembershipSink) -> None:
        self.selector = statefulset_selector(obj) or self.selector
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

    def _sync_readiness(self, sink: MembershipSink) -> None:
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

    def confirmed(self) -> None:
        self._last_ok = self._monotonic()

    def failed(self, sink: MembershipSink, reason: str) -> None:
        self.errors += 1
        self.last_error = reason
        sink.record_source_error(reason)
