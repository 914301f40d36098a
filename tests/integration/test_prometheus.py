"""A real Prometheus scraping three real nodes under a little load: every
PromQL expression of every panel of the chart's dashboard returns data through
Prometheus' HTTP API, every alert rule of the chart evaluates without error,
and killing a node makes KvstoreNodeUnreachable go pending or firing (the
rule file is the chart's, with that alert's `for:` shortened); killing a
second makes KvstoreQuorumLost's series count arcs without a quorum.

With KVSTORE_DASHBOARD_PICTURE=PATH (make dashboard-picture) the run lasts
longer and ends by drawing the dashboard's panels from that Prometheus into
PATH with scripts/dashboard_picture.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import yaml

from tests.integration.probes import wait_for
from tests.integration.prometheus import PrometheusServer

if TYPE_CHECKING:  # only annotates make_cluster (the harness fixture)
    from tests.harness.processes import Cluster

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "kvstore"
HELM = REPO / ".tools" / "bin" / "helm"
JOB = "kvstore"
RATE_WINDOW = "10s"  # stands in for Grafana's $__rate_interval: ten 1 s scrapes
LOAD_KEYS = 200
LOAD_PAUSE_S = 0.01  # ~100 requests/s at most: "a little load", gentle on two shared cores
LOAD_SECONDS = 12.0  # enough for 10 s rate windows to fill with samples
PICTURE_LOAD_SECONDS = 60.0  # the picture shows a minute of traffic before the kill
ALERT_TIMEOUT_S = 30.0
MAP_SIZE = "16Mi"  # small enough that the storage panel shows a share above zero
SHORT_FOR = "2s"
PICTURE = os.environ.get("KVSTORE_DASHBOARD_PICTURE", "")


def chart_rules(path: Path) -> list[dict[str, Any]]:
    """The chart's PrometheusRule groups, selecting this test's job, with
    KvstoreNodeUnreachable's `for:` cut to seconds; written to `path`."""
    if not HELM.is_file():
        pytest.fail(f"{HELM} is missing: run `make tools`", pytrace=False)
    proc = subprocess.run(
        [
            str(HELM),
            "template",
            "kv",
            str(CHART),
            "--api-versions",
            "monitoring.coreos.com/v1",
            "--set",
            "metrics.prometheusRule.enabled=true",
            "--set",
            f'metrics.prometheusRule.selector=job="{JOB}"',
            "--show-only",
            "templates/prometheusrule.yaml",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    groups = yaml.safe_load(proc.stdout)["spec"]["groups"]
    for group in groups:
        for rule in group["rules"]:
            if rule.get("alert") == "KvstoreNodeUnreachable":
                rule["for"] = SHORT_FOR
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return list(groups)


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every dashboard in the chart,
    with the dashboard's variables bound as Grafana would bind them here."""
    queries = []
    for path in sorted((CHART / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$__rate_interval", RATE_WINDOW).replace("$job", JOB)
                queries.append((f"{path.name}: {panel['title']}", expr))
    return queries


class Traffic:
    """Puts, gets and deletes spread over the nodes from one thread, until stopped."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.stop_event = threading.Event()
        self.counts: dict[int, int] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=3.0) as client:
            i = 0
            while not self.stop_event.is_set():
                url = self.urls[i % len(self.urls)]
                key = f"load-{(i // 2) % LOAD_KEYS}"  # a get follows the put of the same key
                try:
                    if i % 7 == 6:
                        status = client.delete(f"{url}/kv/{key}").status_code
                    elif i % 2:
                        status = client.get(f"{url}/kv/{key}").status_code
                    else:
                        status = client.put(f"{url}/kv/{key}", content=f"value-{i}".encode()).status_code
                except httpx.HTTPError:
                    status = 0
                self.counts[status] = self.counts.get(status, 0) + 1
                i += 1
                self.stop_event.wait(LOAD_PAUSE_S)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(timeout=10)


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[..., PrometheusServer]]:
    servers: list[PrometheusServer] = []

    def start(**kwargs: Any) -> PrometheusServer:
        server = PrometheusServer(workdir=tmp_path / "prometheus", **kwargs)
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


def _alert_state(server: PrometheusServer, name: str, **labels: str) -> str | None:
    for alert in server.api("alerts")["alerts"]:
        if alert["labels"].get("alertname") == name and labels.items() <= alert["labels"].items():
            return str(alert["state"])
    return None


@pytest.mark.slow
def test_prometheus_scrapes_the_dashboard_queries_and_the_unreachable_alert(
    make_cluster: Callable[..., Cluster], prometheus: Callable[..., PrometheusServer], tmp_path: Path
) -> None:
    cluster = make_cluster(durable=True, args=["--map-size", MAP_SIZE])
    rules_path = tmp_path / "rules.yaml"
    groups = chart_rules(rules_path)
    server = prometheus(targets=[f"{n.host}:{n.port}" for n in cluster.nodes], job=JOB, rule_files=[rules_path])

    with Traffic([n.url for n in cluster.nodes]) as traffic:
        time.sleep(PICTURE_LOAD_SECONDS if PICTURE else LOAD_SECONDS)
        up = server.query(f'up{{job="{JOB}"}} == 1')
        assert len(up) == 3, up

        empty = [(title, expr) for title, expr in panel_queries() if not server.query(expr)]
        assert not empty, "dashboard expressions without data:\n" + "\n".join(f"{t}: {e}" for t, e in empty)
        latency = server.query(
            f"histogram_quantile(0.99, sum by (op, le) "
            f'(rate(kvstore_request_duration_seconds_bucket{{job="{JOB}"}}[{RATE_WINDOW}])))'
        )
        assert {r["metric"]["op"] for r in latency if r["value"][1] != "NaN"} == {"get", "put", "delete"}, latency
        storage = server.query(f'kvstore_storage_used_bytes{{job="{JOB}"}} / kvstore_storage_limit_bytes > 0')
        assert len(storage) == 3 and all(0 < float(r["value"][1]) < 1 for r in storage), storage

        rules = [r for g in server.api("rules")["groups"] for r in g["rules"]]
        assert len(rules) == sum(len(g["rules"]) for g in groups)
        unhealthy = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        assert not unhealthy, unhealthy
        assert {r["name"] for r in rules if r["state"] != "inactive"} == set(), "a healthy cluster wakes nobody"

        victim = cluster.nodes[2]
        killed_at = time.monotonic()
        victim.kill()
        took = wait_for(
            lambda: (
                None
                if _alert_state(server, "KvstoreNodeUnreachable", peer=victim.node_id) in ("pending", "firing")
                else f"KvstoreNodeUnreachable for {victim.node_id} is {_alert_state(server, 'KvstoreNodeUnreachable')}"
            ),
            timeout=ALERT_TIMEOUT_S,
            what="the node-unreachable alert",
        )
        print(f"KvstoreNodeUnreachable pending/firing {took:.1f}s after the kill")  # measured; pytest -s shows it
        wait_for(
            lambda: (
                None if _alert_state(server, "KvstoreNodeUnreachable", peer=victim.node_id) == "firing" else "pending"
            ),
            timeout=ALERT_TIMEOUT_S,
            what="the alert to fire",
        )
        print(f"firing {time.monotonic() - killed_at:.1f}s after the kill")
        # One node of three down: every arc still has a write quorum (2 of 3), as both survivors report.
        below_quorum = server.query(f'kvstore_ranges_below_quorum{{job="{JOB}"}}')
        assert len(below_quorum) >= 2, below_quorum
        assert all(float(r["value"][1]) == 0 for r in below_quorum), below_quorum
        if PICTURE:
            time.sleep(20)  # the picture shows the cluster after the kill too

    answered = sum(count for status, count in traffic.counts.items() if 200 <= status < 500)
    assert answered > sum(traffic.counts.values()) * 0.9, traffic.counts  # the load was served, not refused

    if PICTURE:
        subprocess.run(
            [
                sys.executable,
                str(REPO / "scripts" / "dashboard_picture.py"),
                "--prometheus",
                server.url,
                "--job",
                JOB,
                "--minutes",
                "2",
                "--out",
                PICTURE,
            ],
            check=True,
            timeout=120,
        )

    cluster.nodes[1].kill()  # now two of three replicas of every key are down
    wait_for(
        lambda: (
            None
            if any(float(r["value"][1]) > 0 for r in server.query(f'kvstore_ranges_below_quorum{{job="{JOB}"}}'))
            else "no arc below quorum yet"
        ),
        timeout=ALERT_TIMEOUT_S,
        what="arcs below quorum seen by Prometheus",
    )
