"""Ring membership from the Kubernetes API (app.membership.kubernetes) with real
`kvstore node` processes, the real `kubernetes` client, and kmock's stateful
Kubernetes API emulator as the API server (tests/k8s/kube_api.py).

Each "pod" is a node process on its own loopback address (kvstore-0 on
127.0.0.2, kvstore-1 on 127.0.0.3, ...), all on the same port, and the pods'
cluster DNS names are mapped to those addresses with --resolve. The test plays
the StatefulSet controller and the kubelet: it creates the StatefulSet and the
pod objects through HTTP, starts the node process of each pod, and patches the
pod's Ready condition once the node answers /ready.

What kmock cannot emulate, so these tests do not cover it:
- label and field selectors are ignored: the source sends them (a real server
  filters) but also filters in code; only the code path is tested;
- resourceVersion has no meaning (every list says "...", objects carry none,
  and every watch replays all objects as ADDED): "resume from the last
  resourceVersion" is tested as "a closed watch is followed by a watch, not a
  list", never as "no event is missed or replayed between two windows";
- no bookmarks, and timeoutSeconds is ignored (watches end only by the client's
  read timeout or by the scripted ends below), so the server-side end of a
  watch window is emulated, not real;
- 410 Gone is never produced by kmock: it is scripted (an ERROR event with
  code 410 injected into the open watch streams); an HTTP 410 answer to the
  watch request itself is handled by the same code but not exercised;
- no authentication or RBAC: the Role's least privilege is checked on the
  chart (test_chart.py), not enforced here; in-cluster config
  (load_incluster_config) cannot target kmock directly, so only the kubeconfig path
  runs here (test_image.py runs the in-cluster path, through a TLS front);
- no controllers: nothing creates, deletes or readies pods; the test does,
  so the ordering of a real rollout (pods created before or after the
  replicas change, termination grace) is only as realistic as the test's;
- EndpointSlices are served but the source does not use them.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness.processes import NodeProcess
from tests.integration.probes import (
    admin_get,
    membership_disagreement,
    read_replicas,
    rebalancing_left,
    wait_for,
)
from tests.k8s.kube_api import KubeAPI

NAMESPACE = "ns"
STATEFULSET = "kvstore"
SERVICE = "kvstore-headless"
DOMAIN = "cluster.local"
LABELS = {"app.kubernetes.io/name": "kvstore", "app.kubernetes.io/instance": "kv"}
MAX_PODS = 4  # ordinals 0..3 get an address and a --resolve entry up front
REPLICATION_FACTOR = 3
CHANGE_TIMEOUT_S = 20.0  # a replicas change reaches every node well within this (a watch window is ~7 s at worst)
SETTLE_TIMEOUT_S = 40.0  # rebalancing after a join or leave
EXIT_TIMEOUT_S = 40.0  # a leaving node's drain: hand-off of its records before exiting
KEYS = 60


def pod_name(ordinal: int) -> str:
    return f"{STATEFULSET}-{ordinal}"


def pod_host(ordinal: int) -> str:
    return f"127.0.0.{ordinal + 2}"


def pod_dns(ordinal: int) -> str:
    return f"{pod_name(ordinal)}.{SERVICE}.{NAMESPACE}.svc.{DOMAIN}"


def free_port_on(hosts: list[str]) -> int:
    """A port free on every one of the hosts right now."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = probe.getsockname()[1]
        try:
            with contextlib.ExitStack() as stack:
                for host in hosts[1:]:
                    stack.enter_context(socket.socket()).bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on every pod address")


class KubeCluster:
    """The StatefulSet `kvstore` in kmock and one node process per pod."""

    def __init__(self, *, api: KubeAPI, log_dir: Path) -> None:
        self.api = api
        self.log_dir = log_dir
        self.port = free_port_on([pod_host(i) for i in range(MAX_PODS)])
        self.kubeconfig = api.write_kubeconfig(log_dir / "kubeconfig", namespace=NAMESPACE)
        self.nodes: dict[str, NodeProcess] = {}

    def node_args(self) -> list[str]:
        args = [
            "--membership",
            "kubernetes",
            "--namespace",
            NAMESPACE,
            "--statefulset",
            STATEFULSET,
            "--headless-service",
            SERVICE,
            "--cluster-domain",
            DOMAIN,
            "--kubeconfig",
            str(self.kubeconfig),
            "--anti-entropy-interval",
            "0.5",
            "--peer-timeout",
            "0.5",
            "--replication-factor",
            str(REPLICATION_FACTOR),
            "--sync-deadline",
            "15",
        ]
        for ordinal in range(MAX_PODS):
            args += ["--resolve", f"{pod_dns(ordinal)}={pod_host(ordinal)}"]
        return args

    def create_statefulset(self, replicas: int) -> None:
        self.api.create_statefulset(
            namespace=NAMESPACE, name=STATEFULSET, replicas=replicas, service=SERVICE, labels=LABELS
        )

    def scale(self, replicas: int) -> None:
        self.api.scale_statefulset(namespace=NAMESPACE, name=STATEFULSET, replicas=replicas)

    def start_pod(self, ordinal: int) -> NodeProcess:
        """The controller creates the pod (not ready), the kubelet starts its container."""
        name = pod_name(ordinal)
        self.api.create_pod(namespace=NAMESPACE, name=name, labels=LABELS, ready=False)
        node = NodeProcess(
            node_id=name, host=pod_host(ordinal), port=self.port, peers={}, log_dir=self.log_dir, args=self.node_args()
        )
        self.nodes[name] = node
        return node.start()

    def mark_ready(self, ordinal: int) -> None:
        """The kubelet's readiness probe: /ready answers 200, so the pod turns Ready."""
        self.nodes[pod_name(ordinal)].wait_ready(timeout=SETTLE_TIMEOUT_S)
        self.api.set_pod_ready(namespace=NAMESPACE, name=pod_name(ordinal), ready=True)

    def urls(self) -> dict[str, str]:
        """{pod name: its node's own URL} of the running nodes."""
        return {name: node.url for name, node in self.nodes.items() if node.running}

    def stop(self) -> None:
        for node in self.nodes.values():
            node.signal(signal.SIGTERM)
        for node in self.nodes.values():
            node.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{node.log_tail(15)}" for name, node in self.nodes.items())


@pytest.fixture
def kube_api() -> Iterator[KubeAPI]:
    api = KubeAPI()
    try:
        yield api.start()
    finally:
        api.close()


@pytest.fixture
def three_pods(kube_api: KubeAPI, tmp_path: Path) -> Iterator[KubeCluster]:
    """The StatefulSet with 3 replicas, its 3 pods started in parallel and Ready."""
    cluster = KubeCluster(api=kube_api, log_dir=tmp_path)
    try:
        cluster.create_statefulset(3)
        for ordinal in range(3):
            cluster.start_pod(ordinal)
        for ordinal in range(3):
            cluster.mark_ready(ordinal)
        wait_members(cluster, 3)
        yield cluster
    finally:
        cluster.stop()


# -- probes ---------------------------------------------------------------------


def ring(url: str) -> dict:
    return admin_get(url, "/ring")


def wait_members(cluster: KubeCluster, count: int, *, timeout: float = CHANGE_TIMEOUT_S) -> None:
    """Every running node's /ring has exactly pods 0..count-1."""
    members = {pod_name(i) for i in range(count)}
    wait_for(
        lambda: membership_disagreement(cluster.urls(), members=members),
        timeout=timeout,
        what=f"every node's ring has the {count} pods",
    )


def source_status(url: str) -> dict:
    return ring(url)["membership_source"]


def source_errors_metric(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5.0).text
    match = re.search(r"^kvstore_membership_source_errors_total(?:\{[^}]*\})? (\S+)$", text, re.MULTILINE)
    assert match, "kvstore_membership_source_errors_total is not exported"
    return float(match.group(1))


def write_keys(urls: dict[str, str], keys: list[str], *, tag: str) -> None:
    targets = list(urls.values())
    with httpx.Client(timeout=5.0) as client:
        for i, key in enumerate(keys):
            resp = client.put(f"{targets[i % len(targets)]}/kv/{key}", content=f"{tag}-{key}".encode())
            assert resp.status_code == 204, f"PUT {key}: {resp.status_code} {resp.text}"


def unreadable(urls: dict[str, str], expected: dict[str, str]) -> str | None:
    """None when every key reads back its value through every node."""
    problems = []
    with httpx.Client(timeout=5.0) as client:
        for name, url in urls.items():
            for key, value in expected.items():
                try:
                    resp = client.get(f"{url}/kv/{key}")
                except httpx.HTTPError as exc:
                    problems.append(f"{name} {key}: {type(exc).__name__}")
                    continue
                if resp.status_code != 200 or resp.content != value.encode():
                    problems.append(f"{name} {key}: {resp.status_code} {resp.content[:40]!r}")
    return f"{len(problems)} bad reads, e.g. {problems[:3]}" if problems else None


def replica_counts(urls: dict[str, str], keys: list[str]) -> dict[str, int]:
    """{key: how many of the nodes hold a live record for it} (each node's own store)."""
    records = read_replicas(urls, keys)
    return {key: sum(records[name, key].live for name in urls) for key in keys}


def count_requests(api: KubeAPI, *, plural: str, action: str) -> int:
    return sum(1 for act, _ in api.requests(plural=plural) if act.upper() == action)


def scale_up_to_four(cluster: KubeCluster) -> None:
    cluster.scale(4)
    cluster.start_pod(3)
    cluster.mark_ready(3)
    wait_members(cluster, 4)
    wait_for(lambda: rebalancing_left(cluster.urls()), timeout=SETTLE_TIMEOUT_S, what="rebalancing after the join")


def scale_replicas_and_back(cluster: KubeCluster) -> None:
    """A replicas change every node must see (no process started for the 4th
    member: the point is that the change arrives), then back to 3."""
    cluster.scale(4)
    wait_members(cluster, 4)
    cluster.scale(3)
    wait_members(cluster, 3)


# -- scenarios ---------------------------------------------------------------------


def test_three_pods_form_one_ring_of_dns_names(three_pods: KubeCluster) -> None:
    cluster = three_pods
    urls = cluster.urls()
    for name, url in urls.items():
        view = ring(url)
        assert {m["node_id"]: m["url"] for m in view["members"]} == {
            pod_name(i): f"http://{pod_dns(i)}:{cluster.port}" for i in range(3)
        }, name
        source = view["membership_source"]
        assert (
            source["kind"] == "kubernetes" and source["statefulset"] == STATEFULSET and source["namespace"] == NAMESPACE
        )
        assert source["replicas"] == 3
    wait_for(
        lambda: None if all(source_status(u)["connected"] for u in urls.values()) else "a source is not connected",
        timeout=CHANGE_TIMEOUT_S,
        what="every source watching",
    )

    keys = [f"k-{i}" for i in range(KEYS)]
    write_keys({"kvstore-0": urls["kvstore-0"]}, keys, tag="one")
    assert unreadable(urls, {k: f"one-{k}" for k in keys}) is None


def test_scale_up_the_new_pod_joins_and_receives_its_ranges(three_pods: KubeCluster) -> None:
    cluster = three_pods
    keys = [f"up-{i}" for i in range(KEYS)]
    write_keys(cluster.urls(), keys, tag="up")

    scale_up_to_four(cluster)

    urls = cluster.urls()
    assert len(urls) == 4
    for name, url in urls.items():
        status = admin_get(url, "/admin/rebalance")
        assert status["syncing"] is False and status["foreign_keys"] == 0, (name, status)
    assert unreadable(urls, {k: f"up-{k}" for k in keys}) is None
    held = replica_counts({"kvstore-3": urls["kvstore-3"]}, keys)
    assert sum(held.values()) > KEYS // 2, f"the new pod holds only {sum(held.values())} of {KEYS} keys"
    short = {k: n for k, n in replica_counts(urls, keys).items() if n < REPLICATION_FACTOR}
    assert not short, f"keys below {REPLICATION_FACTOR} replicas: {short}"


def test_scale_down_the_leaving_pod_hands_off_and_nothing_is_lost(three_pods: KubeCluster) -> None:
    cluster = three_pods
    before = [f"early-{i}" for i in range(KEYS)]
    write_keys(cluster.urls(), before, tag="v")
    scale_up_to_four(cluster)
    during = [f"late-{i}" for i in range(KEYS)]
    write_keys(cluster.urls(), during, tag="v")  # some owned by kvstore-3, written through it too

    cluster.scale(3)
    leaving = cluster.nodes[pod_name(3)]
    assert leaving.proc is not None
    leaving.signal(signal.SIGTERM)  # the kubelet stops the pod: its drain hands its records over first
    try:
        leaving.proc.wait(timeout=EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"kvstore-3 did not exit within {EXIT_TIMEOUT_S}s:\n{leaving.log_tail()}")
    cluster.api.delete_pod(namespace=NAMESPACE, name=pod_name(3))
    assert "left the ring" in leaving.log_path.read_text(errors="replace"), leaving.log_tail()

    wait_members(cluster, 3)
    urls = cluster.urls()
    keys = before + during
    assert unreadable(urls, {k: f"v-{k}" for k in keys}) is None

    def copies() -> str | None:
        wrong = {k: n for k, n in replica_counts(urls, keys).items() if n != REPLICATION_FACTOR}
        return (
            f"{len(wrong)} keys without exactly 3 live replicas, e.g. {dict(list(wrong.items())[:5])}"
            if wrong
            else None
        )

    wait_for(copies, timeout=SETTLE_TIMEOUT_S, what="every key on all 3 remaining pods")


def test_a_watch_ended_by_the_server_resumes(three_pods: KubeCluster) -> None:
    cluster, api = three_pods, three_pods.api
    lists_before = count_requests(api, plural="statefulsets", action="LIST")
    watches_before = count_requests(api, plural="statefulsets", action="WATCH")

    assert api.end_watches(plural="statefulsets", namespace=NAMESPACE) >= 1
    wait_for(
        lambda: (
            None
            if count_requests(api, plural="statefulsets", action="WATCH") >= watches_before + 3
            else "the nodes have not watched again"
        ),
        timeout=CHANGE_TIMEOUT_S,
        what="every node re-watching",
    )
    assert count_requests(api, plural="statefulsets", action="LIST") == lists_before, (
        "a clean end of a watch must resume, not relist"
    )
    scale_replicas_and_back(cluster)

    # The API server restarts on the same port: every connection drops at once.
    api.stop_server()
    api.start_server()
    scale_replicas_and_back(cluster)
    for url in cluster.urls().values():
        assert source_status(url)["replicas"] == 3


def test_410_gone_relists_and_changes_are_still_seen(three_pods: KubeCluster) -> None:
    cluster, api = three_pods, three_pods.api
    lists_before = count_requests(api, plural="statefulsets", action="LIST")

    assert api.expire_watches(plural="statefulsets", namespace=NAMESPACE) >= 1
    urls = cluster.urls()
    wait_for(
        lambda: None if all(source_status(u)["relists"] >= 1 for u in urls.values()) else "not every node relisted",
        timeout=CHANGE_TIMEOUT_S,
        what="every node relisting after 410",
    )
    assert count_requests(api, plural="statefulsets", action="LIST") >= lists_before + 3
    assert not any("410" in str(source_status(u)["last_error"]) for u in urls.values()), (
        "410 Gone is a relist, not a failure"
    )
    scale_replicas_and_back(cluster)


def test_api_server_outage_keeps_the_ring_serving_and_shows_staleness(three_pods: KubeCluster) -> None:
    cluster, api = three_pods, three_pods.api
    urls = cluster.urls()
    wait_for(
        lambda: None if all(source_status(u)["connected"] for u in urls.values()) else "a source is not connected",
        timeout=CHANGE_TIMEOUT_S,
        what="every source watching",
    )
    errors_before = {name: source_errors_metric(url) for name, url in urls.items()}

    api.stop_server()
    try:
        wait_for(
            lambda: (
                None
                if all(source_errors_metric(u) > errors_before[n] for n, u in urls.items())
                else "not every node has counted a source error"
            ),
            timeout=CHANGE_TIMEOUT_S,
            what="errors counted",
        )
        first = {name: source_status(url) for name, url in urls.items()}
        assert not any(status["connected"] for status in first.values()), first

        keys = [f"outage-{i}" for i in range(KEYS)]
        write_keys(urls, keys, tag="o")
        assert unreadable(urls, {k: f"o-{k}" for k in keys}) is None
        for url in urls.values():  # readiness stays up: an API outage hits every pod at once
            assert httpx.get(url + "/ready", timeout=5.0).status_code == 200
        time.sleep(2.0)

        for name, url in urls.items():
            later = ring(url)
            assert len(later["members"]) == 3, (name, later["members"])
            assert later["membership_source"]["staleness_s"] >= first[name]["staleness_s"] + 1.5, (
                name,
                first[name],
                later,
            )
            assert source_errors_metric(url) > errors_before[name]
    finally:
        api.start_server()

    wait_for(
        lambda: None if all(source_status(u)["connected"] for u in urls.values()) else "a source is not back",
        timeout=CHANGE_TIMEOUT_S,
        what="every source watching again",
    )
    assert all(source_status(u)["staleness_s"] < 1.0 for u in urls.values())
    scale_replicas_and_back(cluster)
