"""The chart's monitoring and storage-limit parts, rendered by the real helm:
the PrometheusRule (flag and API gating, additionalLabels, the selector,
runbooks, Helm-escaped Prometheus templates), the Grafana dashboard ConfigMaps
(sidecar label, folder annotation, the JSON being scripts/dashboard.py's
output), and KVSTORE_MAP_SIZE following the volume. promtool's checks of the
rules are in test_alerts.py; the structure check of a PrometheusRule is
validate_prometheus_rule in test_chart.py, run on every scenario.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from app.config import parse_size
from tests.k8s.test_chart import (
    CHART,
    FULL,
    MONITORING_API,
    NAMESPACE,
    Render,
    by_kind,
    env_of,
    node_container,
    one,
)

REPO = CHART.parents[2]


@pytest.mark.parametrize(("enabled", "api", "expected"), [(False, True, 0), (True, False, 0), (True, True, 1)])
def test_prometheus_rule_needs_the_flag_and_the_api(render: Render, enabled: bool, api: bool, expected: int) -> None:
    docs = render(
        set_values=[f"metrics.prometheusRule.enabled={str(enabled).lower()}"],
        api_versions=[MONITORING_API] if api else [],
    )
    assert len(by_kind(docs, "PrometheusRule")) == expected


def test_prometheus_rule_alerts_have_runbooks_labels_and_escaped_templates(render: Render) -> None:
    rule = one(render(values_files=[FULL], api_versions=[MONITORING_API]), "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prometheus", "additionalLabels reach the rule selector"
    assert rule["metadata"]["namespace"] == "monitoring"
    alerts = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    assert {a["alert"] for a in alerts} == EXPECTED_ALERTS
    for alert in alerts:
        assert alert["labels"]["severity"] in ("warning", "critical"), alert["alert"]
        assert alert["annotations"]["runbook"].strip(), f"{alert['alert']} has no runbook line"
        assert alert["annotations"]["summary"].strip()
        assert 'job="store-headless"' in alert["expr"], "the selector value scopes every expression"
    summaries = {a["alert"]: a["annotations"]["summary"] for a in alerts}
    assert "{{ $labels.peer }}" in summaries["KvstoreNodeUnreachable"], "Prometheus templates survive Helm"
    exprs = {a["alert"]: a["expr"] for a in alerts}
    assert "> 0.85" in exprs["KvstoreStorageFull"] and "> 0.7" in exprs["KvstoreStorageFilling"]
    default = one(
        render(set_values=["metrics.prometheusRule.enabled=true"], api_versions=[MONITORING_API]), "PrometheusRule"
    )
    assert f'namespace="{NAMESPACE}"' in default["spec"]["groups"][0]["rules"][0]["expr"], (
        "default selector: the release namespace"
    )


EXPECTED_ALERTS = {
    "KvstoreNodeUnreachable",
    "KvstoreQuorumLost",
    "KvstoreErrorsHigh",
    "KvstoreLatencyHigh",
    "KvstoreHintsGrowing",
    "KvstoreAntiEntropyMismatches",
    "KvstoreMembershipSourceFailing",
    "KvstoreSyncingTooLong",
    "KvstoreStorageFilling",
    "KvstoreStorageFull",
    "KvstoreClockOffsetHigh",
}


def test_dashboards_are_config_maps_with_the_sidecar_label_and_folder(render: Render) -> None:
    assert not by_kind(render(), "ConfigMap"), "off by default"
    docs = render(set_values=["metrics.dashboards.enabled=true"])
    maps = by_kind(docs, "ConfigMap")
    dashboards = sorted((CHART / "dashboards").glob("*.json"))
    assert len(maps) == len(dashboards) >= 1
    cm = maps[0]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert "annotations" not in cm["metadata"], "no folder annotation unless a folder is set"
    assert json.loads(cm["data"]["kvstore.json"]) == json.loads((CHART / "dashboards" / "kvstore.json").read_text())
    full = one(render(values_files=[FULL]), "ConfigMap")
    assert full["metadata"]["labels"]["team"] == "storage"
    assert full["metadata"]["annotations"] == {"k8s-sidecar-target-directory": "Storage"}
    custom = one(render(set_values=["metrics.dashboards.enabled=true", "metrics.dashboards.folder=KV"]), "ConfigMap")
    assert custom["metadata"]["annotations"] == {"grafana_folder": "KV"}


def test_dashboard_json_is_the_generators_output() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "dashboard.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    ("set_values", "expected"),
    [
        ([], "1Gi"),
        (["persistence.size=50Gi"], "50Gi"),
        (["persistence.size=50Gi", "mapSize=20Gi"], "20Gi"),
        (["persistence.enabled=false"], None),
        (["persistence.enabled=false", "mapSize=512Mi"], "512Mi"),
    ],
)
def test_map_size_follows_the_volume_unless_set(render: Render, set_values: list[str], expected: str | None) -> None:
    env = env_of(node_container(render(set_values=set_values)))
    assert env.get("KVSTORE_MAP_SIZE", {}).get("value") == expected
    if expected is not None:
        assert parse_size(expected) > 0, "the app must accept what the chart passes"
