"""The chart's alert rules, as `helm template` renders them, checked by the real
promtool: `promtool check rules` (syntax, PromQL, templates), and `promtool test
rules` with a case for every alert that must fire on a series that should wake
someone and stay quiet on a healthy one. Static annotations (runbooks) are
taken from the rendered rule; every templated one is spelled out here.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s.test_chart import Render
from tests.k8s.test_monitoring import EXPECTED_ALERTS

MONITORING_API = "monitoring.coreos.com/v1"
SELECTOR = 'job="kvstore"'  # what the synthetic series carry; the chart's default selects by namespace
PROMTOOL_TIMEOUT_S = 60
J = {"job": "kvstore"}


@pytest.fixture(scope="session")
def promtool() -> Path:
    """Debian's promtool (package prometheus, installed by `make tools`); missing, the test fails."""
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool is missing: run `make tools` (scripts/ensure_debian_packages.sh prometheus)", pytrace=False
        )
    return Path(found)


def rendered_rules(render: Render) -> list[dict[str, Any]]:
    docs = render(
        set_values=["metrics.prometheusRule.enabled=true", f"metrics.prometheusRule.selector={SELECTOR}"],
        api_versions=[MONITORING_API],
    )
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    return list(rule["spec"]["groups"])


def write_rules(render: Render, path: Path) -> dict[str, dict[str, Any]]:
    groups = rendered_rules(render)
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return {r["alert"]: r for g in groups for r in g["rules"]}


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    matchers = ",".join(f'{k}="{v}"' for k, v in {**J, **labels}.items())
    return {"series": f"{name}{{{matchers}}}", "values": values}


# One scenario per case: (alert, input series, eval time, [(labels, templated annotations)]).
# An empty expectation list means the alert must be quiet at that time.
Case = tuple[str, list[dict[str, str]], str, list[tuple[dict[str, str], dict[str, str]]]]
CASES: dict[str, Case] = {
    "node-unreachable-fires": (
        "KvstoreNodeUnreachable",
        [
            series("kvstore_peer_reachable", "1 1 0x10", instance="n1", peer="n3"),
            series("kvstore_peer_reachable", "1 1 0x10", instance="n2", peer="n3"),
            series("kvstore_peer_reachable", "1x12", instance="n1", peer="n2"),
        ],
        "6m",
        [
            (
                {"severity": "warning", "peer": "n3"},
                {
                    "summary": "kvstore node n3 is unreachable from its peers",
                    "description": "100% of the nodes watching n3 cannot reach it. Its writes go to hints; "
                    "one more node down loses quorum for some keys.",
                },
            )
        ],
    ),
    "node-unreachable-one-bad-link-is-quiet": (
        "KvstoreNodeUnreachable",
        [
            series("kvstore_peer_reachable", "1 1 0x10", instance="n1", peer="n3"),
            series("kvstore_peer_reachable", "1x12", instance="n2", peer="n3"),
        ],
        "6m",
        [],
    ),
    "quorum-lost-fires": (
        "KvstoreQuorumLost",
        [series("kvstore_ranges_below_quorum", "0 512x10", instance="n1")],
        "5m",
        [
            (
                {"severity": "critical", "instance": "n1", **J},
                {"summary": "kvstore: 512 ring arcs lack a quorum of reachable replicas, seen from n1"},
            )
        ],
    ),
    "quorum-held-is-quiet": (
        "KvstoreQuorumLost",
        [series("kvstore_ranges_below_quorum", "0x10", instance="n1")],
        "5m",
        [],
    ),
    "errors-fire-on-5xx": (
        "KvstoreErrorsHigh",
        [
            series("kvstore_requests_total", "0+100x20", op="get", status="200", instance="n1"),
            series("kvstore_requests_total", "0+10x20", op="put", status="503", instance="n1"),
            series("kvstore_quorum_failures_total", "0x20", op="write", instance="n1"),
        ],
        "15m",
        [
            (
                {"severity": "critical"},
                {
                    "description": "0.0909 (5xx share of requests, or quorum failures per second) "
                    "over the last 5 minutes."
                },
            )
        ],
    ),
    "errors-fire-on-quorum-failures": (
        "KvstoreErrorsHigh",
        [
            series("kvstore_requests_total", "0+1000x20", op="get", status="200", instance="n1"),
            series("kvstore_quorum_failures_total", "0+60x20", op="read", instance="n1"),
        ],
        "15m",
        [
            (
                {"severity": "critical"},
                {"description": "1 (5xx share of requests, or quorum failures per second) over the last 5 minutes."},
            )
        ],
    ),
    "errors-rare-are-quiet": (
        "KvstoreErrorsHigh",
        [
            series("kvstore_requests_total", "0+100x20", op="get", status="200", instance="n1"),
            series("kvstore_requests_total", "0+1x20", op="put", status="503", instance="n1"),
            series("kvstore_quorum_failures_total", "0+1x20", op="write", instance="n1"),
        ],
        "15m",
        [],
    ),
    "latency-fires": (
        "KvstoreLatencyHigh",
        [
            series("kvstore_request_duration_seconds_bucket", "0+1x30", op="get", le="0.5", instance="n1"),
            series("kvstore_request_duration_seconds_bucket", "0+100x30", op="get", le="1.0", instance="n1"),
            series("kvstore_request_duration_seconds_bucket", "0+100x30", op="get", le="+Inf", instance="n1"),
        ],
        "20m",
        [
            (
                {"severity": "warning", "op": "get"},
                {
                    "summary": "kvstore p99 get latency is 994.9ms",
                    "description": "The 99th percentile of get requests has been above 0.5s for 10 minutes.",
                },
            )
        ],
    ),
    "latency-fast-is-quiet": (
        "KvstoreLatencyHigh",
        [
            series("kvstore_request_duration_seconds_bucket", "0+100x30", op="get", le="0.005", instance="n1"),
            series("kvstore_request_duration_seconds_bucket", "0+100x30", op="get", le="+Inf", instance="n1"),
        ],
        "20m",
        [],
    ),
    "hints-growing-fire": (
        "KvstoreHintsGrowing",
        [series("kvstore_hints_pending", "0+10x60", instance="n1")],
        "50m",
        [
            (
                {"severity": "warning", "instance": "n1", **J},
                {"summary": "kvstore n1 holds 500 undelivered hints, and more each minute"},
            )
        ],
    ),
    "hints-draining-are-quiet": (
        "KvstoreHintsGrowing",
        [series("kvstore_hints_pending", "0+10x20 200-10x20 0x20", instance="n1")],
        "50m",
        [],
    ),
    "anti-entropy-mismatches-round-after-round-fire": (
        "KvstoreAntiEntropyMismatches",
        [series("kvstore_anti_entropy_ranges_mismatched_total", "0+2x60", instance="n1")],
        "45m",
        [
            (
                {"severity": "warning", "instance": "n1", **J},
                {"summary": "kvstore n1: anti-entropy finds mismatched arcs round after round"},
            )
        ],
    ),
    "anti-entropy-one-repair-is-quiet": (
        "KvstoreAntiEntropyMismatches",
        [series("kvstore_anti_entropy_ranges_mismatched_total", "0 3 3x58", instance="n1")],
        "45m",
        [],
    ),
    "membership-errors-fire": (
        "KvstoreMembershipSourceFailing",
        [
            series("kvstore_membership_source_errors_total", "0+1x30", instance="n1"),
            series("kvstore_membership_staleness_seconds", "0x30", instance="n1"),
        ],
        "20m",
        [({"severity": "warning", "instance": "n1", **J}, {"summary": "kvstore n1 cannot read its membership source"})],
    ),
    "membership-stale-fires": (
        "KvstoreMembershipSourceFailing",
        [
            series("kvstore_membership_source_errors_total", "0x30", instance="n1"),
            series("kvstore_membership_staleness_seconds", "0+60x30", instance="n1"),
        ],
        "20m",
        [({"severity": "warning", "instance": "n1", **J}, {"summary": "kvstore n1 cannot read its membership source"})],
    ),
    "membership-fresh-is-quiet": (
        "KvstoreMembershipSourceFailing",
        [
            series("kvstore_membership_source_errors_total", "0x30", instance="n1"),
            series("kvstore_membership_staleness_seconds", "5x30", instance="n1"),
        ],
        "20m",
        [],
    ),
    "syncing-too-long-fires": (
        "KvstoreSyncingTooLong",
        [series("kvstore_syncing_ranges", "12x30", instance="n4")],
        "20m",
        [
            (
                {"severity": "warning", "instance": "n4", **J},
                {"summary": "kvstore n4 has been pulling 12 ranges for 15 minutes"},
            )
        ],
    ),
    "syncing-briefly-is-quiet": (
        "KvstoreSyncingTooLong",
        [series("kvstore_syncing_ranges", "12 12 0x28", instance="n4")],
        "20m",
        [],
    ),
    "storage-filling-fires-at-80-percent": (
        "KvstoreStorageFilling",
        [
            series("kvstore_storage_used_bytes", "800x30", instance="n1"),
            series("kvstore_storage_limit_bytes", "1000x30", instance="n1"),
        ],
        "15m",
        [({"severity": "warning", "instance": "n1", **J}, {"summary": "kvstore n1 storage is 80% full"})],
    ),
    "storage-full-is-quiet-at-80-percent": (
        "KvstoreStorageFull",
        [
            series("kvstore_storage_used_bytes", "800x30", instance="n1"),
            series("kvstore_storage_limit_bytes", "1000x30", instance="n1"),
        ],
        "15m",
        [],
    ),
    "storage-full-fires-at-95-percent": (
        "KvstoreStorageFull",
        [
            series("kvstore_storage_used_bytes", "950x30", instance="n1"),
            series("kvstore_storage_limit_bytes", "1000x30", instance="n1"),
        ],
        "15m",
        [({"severity": "critical", "instance": "n1", **J}, {"summary": "kvstore n1 storage is 95% full"})],
    ),
    "storage-filling-is-quiet-at-10-percent-and-in-memory": (
        "KvstoreStorageFilling",
        [
            series("kvstore_storage_used_bytes", "100x30", instance="n1"),
            series("kvstore_storage_limit_bytes", "1000x30", instance="n1"),
            series("kvstore_storage_used_bytes", "0x30", instance="n2"),
            series("kvstore_storage_limit_bytes", "0x30", instance="n2"),
        ],
        "15m",
        [],
    ),
    "clock-offset-fires-either-way": (
        "KvstoreClockOffsetHigh",
        [
            series("kvstore_clock_offset_seconds", "-0.45x20", instance="n1", peer="n2"),
            series("kvstore_clock_offset_seconds", "0.01x20", instance="n1", peer="n3"),
        ],
        "10m",
        [({"severity": "warning", "instance": "n1"}, {"summary": "kvstore n1 sees a peer clock 450ms away"})],
    ),
    "clock-offset-small-is-quiet": (
        "KvstoreClockOffsetHigh",
        [series("kvstore_clock_offset_seconds", "0.02x20", instance="n1", peer="n2")],
        "10m",
        [],
    ),
}


def _promtool(promtool: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(promtool), *args], capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT_S, check=False, cwd=cwd
    )


def test_promtool_checks_the_rendered_rules(render: Render, promtool: Path, tmp_path: Path) -> None:
    alerts = write_rules(render, tmp_path / "rules.yaml")
    proc = _promtool(promtool, "check", "rules", "rules.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alerts)} rules found" in proc.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    firing = {alert for alert, _, _, expected in CASES.values() if expected}
    quiet = {alert for alert, _, _, expected in CASES.values() if not expected}
    assert firing == EXPECTED_ALERTS, EXPECTED_ALERTS - firing
    assert quiet == EXPECTED_ALERTS, EXPECTED_ALERTS - quiet


@pytest.mark.parametrize("case", CASES)
def test_promtool_unit_test(render: Render, promtool: Path, tmp_path: Path, case: str) -> None:
    alerts = write_rules(render, tmp_path / "rules.yaml")
    alert, input_series, eval_time, expected = CASES[case]
    static = {k: v for k, v in alerts[alert]["annotations"].items() if "{{" not in v}
    exp_alerts = [{"exp_labels": labels, "exp_annotations": {**static, **templated}} for labels, templated in expected]
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "name": case,
                "interval": "1m",
                "input_series": input_series,
                "alert_rule_test": [{"eval_time": eval_time, "alertname": alert, "exp_alerts": exp_alerts}],
            }
        ],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    proc = _promtool(promtool, "test", "rules", "test.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
