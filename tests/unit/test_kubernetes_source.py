"""Kubernetes membership without an API server: the member list a
StatefulSet implies, which pods count and when they are ready, how the
tracker (app.membership.statefulset) folds list/watch reports into what its
sink hears, through its public API only (no sockets, no threads), and the
source's client login and settings (app.membership.kubernetes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.config import NodeConfig
from app.errors import ConfigError
from app.membership.kubernetes import KubernetesMembership, api_client_from
from app.membership.statefulset import (
    PODS,
    STATEFULSETS,
    Change,
    Connected,
    Expired,
    Failure,
    Snapshot,
    StatefulSetTracker,
    member_urls,
    pod_is_ready,
    pod_matches,
)

LABELS = {"app": "kv"}


class Sink:
    def __init__(self) -> None:
        self.members: list[dict[str, str]] = []
        self.ready: list[tuple[str, bool]] = []
        self.errors: list[str] = []

    async def set_members(self, members: dict[str, str]) -> None:
        self.members.append(dict(members))

    def set_peer_ready(self, node_id: str, ready: bool) -> None:
        self.ready.append((node_id, ready))

    def record_source_error(self, reason: str) -> None:
        self.errors.append(reason)


def sts(replicas: int | None, name: str = "kv") -> dict[str, Any]:
    spec: dict[str, Any] = {"selector": {"matchLabels": LABELS}}
    if replicas is not None:
        spec["replicas"] = replicas
    return {"metadata": {"name": name, "resourceVersion": "7"}, "spec": spec}


def pod(name: str, *, ready: bool, labels: dict[str, str] = LABELS, terminating: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": dict(labels)}
    if terminating:
        meta["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tracker(clock: Clock) -> StatefulSetTracker:
    return StatefulSetTracker(
        namespace="ns",
        statefulset="kv",
        headless_service="kv-h",
        cluster_domain="cluster.local",
        port=8080,
        monotonic=clock,
    )


def test_members_are_the_ordinals_at_their_stable_dns_names() -> None:
    assert member_urls(statefulset="kv", replicas=2, service="kv-h", namespace="ns", domain="example.org", port=9) == {
        "kv-0": "http://kv-0.kv-h.ns.svc.example.org:9",
        "kv-1": "http://kv-1.kv-h.ns.svc.example.org:9",
    }


def test_pods_count_by_selector_and_ordinal_name_and_ready_condition() -> None:
    assert pod_matches(pod("kv-3", ready=True), statefulset="kv", selector=LABELS)
    assert not pod_matches(pod("kv-3", ready=True, labels={"app": "other"}), statefulset="kv", selector=LABELS)
    assert not pod_matches(pod("kv-web-0", ready=True), statefulset="kv", selector=LABELS)
    assert not pod_matches(pod("kv-0", ready=True), statefulset="kv", selector={})
    assert pod_is_ready(pod("kv-0", ready=True))
    assert not pod_is_ready(pod("kv-0", ready=False))
    assert not pod_is_ready(pod("kv-0", ready=True, terminating=True))
    assert not pod_is_ready({"metadata": {"name": "kv-0"}})


async def test_members_follow_replicas_and_only_changes_are_pushed(tracker: StatefulSetTracker) -> None:
    sink = Sink()
    await tracker.apply(Snapshot(STATEFULSETS, [sts(5, name="other"), sts(3)], "1"), sink)
    assert [sorted(m) for m in sink.members] == [["kv-0", "kv-1", "kv-2"]]
    await tracker.apply(Change(STATEFULSETS, "MODIFIED", sts(3), "2"), sink)  # a relist or replay: nothing new
    await tracker.apply(Change(STATEFULSETS, "MODIFIED", sts(9, name="other"), "3"), sink)
    assert len(sink.members) == 1
    await tracker.apply(Change(STATEFULSETS, "MODIFIED", sts(4), "4"), sink)
    assert sorted(sink.members[-1]) == ["kv-0", "kv-1", "kv-2", "kv-3"]
    assert tracker.status()["replicas"] == 4 and tracker.status()["resource_version"] == "4"


async def test_missing_deleted_or_zero_statefulset_keeps_the_last_ring(tracker: StatefulSetTracker) -> None:
    sink = Sink()
    await tracker.apply(Snapshot(STATEFULSETS, [], "1"), sink)
    assert sink.members == [] and len(sink.errors) == 1
    await tracker.apply(Snapshot(STATEFULSETS, [sts(None)], "2"), sink)  # absent replicas means 1
    assert sorted(sink.members[-1]) == ["kv-0"]
    await tracker.apply(Change(STATEFULSETS, "DELETED", sts(1), "3"), sink)
    await tracker.apply(Change(STATEFULSETS, "MODIFIED", sts(0), "4"), sink)
    assert len(sink.members) == 1 and len(sink.errors) == 2
    assert tracker.status()["errors"] == 2


async def test_readiness_goes_to_the_sink_for_members_on_change_only(tracker: StatefulSetTracker) -> None:
    sink = Sink()
    await tracker.apply(Snapshot(STATEFULSETS, [sts(2)], "1"), sink)
    assert sink.ready == []  # pods not listed yet: nothing is known
    await tracker.apply(
        Snapshot(PODS, [pod("kv-0", ready=True), pod("kv-5", ready=True), pod("x-1", ready=True)], "1"), sink
    )
    assert sorted(sink.ready) == [("kv-0", True), ("kv-1", False)]  # kv-1 has no pod yet
    await tracker.apply(Change(PODS, "MODIFIED", pod("kv-0", ready=True), "2"), sink)
    assert len(sink.ready) == 2
    await tracker.apply(Change(PODS, "ADDED", pod("kv-1", ready=True), "3"), sink)
    await tracker.apply(Change(PODS, "DELETED", pod("kv-0", ready=True), "4"), sink)
    assert sink.ready[2:] == [("kv-1", True), ("kv-0", False)]
    await tracker.apply(Change(STATEFULSETS, "MODIFIED", sts(3), "5"), sink)
    assert sink.ready[-1] == ("kv-2", False)  # a new member without a pod


async def test_failures_count_and_staleness_grows_until_reconnected(tracker: StatefulSetTracker, clock: Clock) -> None:
    sink = Sink()
    await tracker.apply(Connected(STATEFULSETS, True), sink)
    await tracker.apply(Connected(PODS, True), sink)
    clock.now += 30
    assert tracker.staleness_s() == 0.0 and tracker.status()["connected"] is True
    await tracker.apply(Connected(PODS, False), sink)
    await tracker.apply(Failure(PODS, "API unreachable"), sink)
    clock.now += 12
    assert tracker.staleness_s() == pytest.approx(12.0)
    assert tracker.status()["connected"] is False and sink.errors == ["pods: API unreachable"]
    await tracker.apply(Expired(STATEFULSETS), sink)
    assert tracker.status()["relists"] == 1 and tracker.status()["errors"] == 1  # 410 is a relist, not a failure
    await tracker.apply(Connected(PODS, True), sink)
    assert tracker.staleness_s() == 0.0


def test_credentials_that_cannot_load_are_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "kubeconfig"
    bad.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\ncurrent-context: nowhere\n")
    with pytest.raises(ConfigError, match="kubeconfig"):
        api_client_from(str(bad))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="in-cluster"):
        api_client_from(None)


def test_from_config_reads_the_kubernetes_settings(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:1\n"
        "users:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\n"
        "current-context: x\n"
    )
    config = NodeConfig.from_options(
        {
            "node_id": "kv-0",
            "listen": "127.0.0.2:7000",
            "membership": "kubernetes",
            "namespace": "ns",
            "statefulset": "kv",
            "headless_service": "kv-h",
            "cluster_domain": "example.org",
            "kubeconfig": str(kubeconfig),
        }
    )
    source = KubernetesMembership.from_config(config)
    assert (source.namespace, source.statefulset, source.headless_service, source.cluster_domain, source.port) == (
        "ns",
        "kv",
        "kv-h",
        "example.org",
        7000,
    )
    assert source.api_client.configuration.host == "http://127.0.0.1:1"
