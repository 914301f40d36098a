"""Generates the chart's Grafana dashboard, deploy/helm/kvstore/dashboards/kvstore.json.

The JSON is what Grafana loads (the chart ships it in a ConfigMap when
metrics.dashboards.enabled); this file is what a reviewer reads: one PANELS
table of titles, units and PromQL. tests/k8s checks the JSON is this script's
output, and tests/integration runs every expression against a real Prometheus.

    python scripts/dashboard.py          # rewrite the JSON
    python scripts/dashboard.py --check  # exit 1 if the JSON is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "kvstore" / "dashboards" / "kvstore.json"
UID = "kvstore-overview"  # stable, so links and the Grafana sidecar's updates keep pointing at one dashboard
SCHEMA_VERSION = 39  # Grafana 10/11 dashboards; older and newer Grafanas migrate it on load
WIDTH = 24  # Grafana's grid is 24 columns wide
PANEL_HEIGHT = 8
SEL = '{job=~"$job"}'  # every series of the releases picked in the job variable
RATE = "$__rate_interval"  # Grafana's window: at least four scrape intervals


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    targets: tuple[tuple[str, str], ...]  # (PromQL, legend)
    description: str = ""
    width: int = 12


def _quantile(q: float) -> str:
    buckets = f"rate(kvstore_request_duration_seconds_bucket{SEL}[{RATE}])"
    return f"histogram_quantile({q}, sum by (op, le) ({buckets}))"


PANELS: tuple[Panel, ...] = (
    Panel(
        "Requests/s by op and status",
        "reqps",
        ((f"sum by (op, status) (rate(kvstore_requests_total{SEL}[{RATE}]))", "{{op}} {{status}}"),),
        "Client requests answered by every node; 5xx are failures (503: no quorum or clock off, 507: a full store).",
    ),
    Panel(
        "Latency p50 and p99 by op",
        "s",
        (
            (_quantile(0.5), "p50 {{op}}"),
            (_quantile(0.99), "p99 {{op}}"),
        ),
        "Client-facing latency, coordinator included.",
    ),
    Panel(
        "Forwarded requests/s by peer",
        "reqps",
        ((f"sum by (peer, op) (rate(kvstore_forwarded_requests_total{SEL}[{RATE}]))", "to {{peer}} {{op}}"),),
        "Replica calls sent to each peer on clients' behalf.",
    ),
    Panel(
        "Internal requests/s by node",
        "reqps",
        ((f"sum by (instance, op) (rate(kvstore_internal_requests_total{SEL}[{RATE}]))", "{{instance}} {{op}}"),),
        "Replica calls each node received from its peers.",
    ),
    Panel(
        "Ring members and reachable peers",
        "short",
        (
            (f"max(kvstore_ring_members{SEL})", "members"),
            (f"kvstore_peers_reachable{SEL}", "reachable from {{instance}}"),
            (f"kvstore_ranges_below_quorum{SEL}", "arcs below quorum from {{instance}}"),
        ),
        "Arcs below quorum above 0: writes to some keys fail.",
    ),
    Panel(
        "Peer reachability (1 up, 0 down)",
        "short",
        ((f"kvstore_peer_reachable{SEL}", "{{instance}} sees {{peer}}"),),
    ),
    Panel(
        "Live keys per node",
        "short",
        ((f"kvstore_keys{SEL}", "{{instance}}"),),
    ),
    Panel(
        "Storage use per node",
        "percentunit",
        (
            (
                f"kvstore_storage_used_bytes{SEL} / (kvstore_storage_limit_bytes{SEL} > 0)",
                "{{instance}}",
            ),
        ),
        "Share of the limit (smaller of --map-size and the volume's room); at 100% writes get 507.",
    ),
    Panel(
        "Hints pending and delivered",
        "short",
        (
            (f"kvstore_hints_pending{SEL}", "pending on {{instance}}"),
            (f"sum(rate(kvstore_hints_delivered_total{SEL}[{RATE}]))", "delivered/s"),
        ),
        "Writes held for replicas that missed them.",
        width=8,
    ),
    Panel(
        "Read repairs and anti-entropy",
        "ops",
        (
            (f"sum(rate(kvstore_read_repairs_total{SEL}[{RATE}]))", "read repairs/s"),
            (f"sum(rate(kvstore_anti_entropy_ranges_mismatched_total{SEL}[{RATE}]))", "arcs mismatched/s"),
            (f"sum(rate(kvstore_anti_entropy_keys_repaired_total{SEL}[{RATE}]))", "keys repaired/s"),
        ),
        width=8,
    ),
    Panel(
        "Rebalance progress",
        "short",
        (
            (f"kvstore_syncing_ranges{SEL}", "ranges syncing on {{instance}}"),
            (
                f"sum by (direction) (rate(kvstore_rebalance_keys_streamed_total{SEL}[{RATE}]))",
                "keys streamed/s {{direction}}",
            ),
        ),
        width=8,
    ),
    Panel(
        "Clock offset to peers",
        "s",
        ((f"kvstore_clock_offset_seconds{SEL}", "{{instance}} to {{peer}}"),),
        "A node further than --max-clock-offset (0.5 s) from most peers stops coordinating writes.",
        width=24,
    ),
)


def _panel(index: int, panel: Panel, x: int, y: int) -> dict[str, object]:
    return {
        "id": index + 1,
        "type": "timeseries",
        "title": panel.title,
        "description": panel.description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": panel.width, "h": PANEL_HEIGHT},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(panel.targets)
        ],
    }


def dashboard() -> dict[str, object]:
    panels: list[dict[str, object]] = []
    x = y = 0
    for index, panel in enumerate(PANELS):
        if x + panel.width > WIDTH:
            x, y = 0, y + PANEL_HEIGHT
        panels.append(_panel(index, panel, x, y))
        x += panel.width
    return {
        "uid": UID,
        "title": "kvstore",
        "description": "Traffic, latency, ring, storage and repair of kvstore nodes (made by scripts/dashboard.py).",
        "tags": ["kvstore"],
        "schemaVersion": SCHEMA_VERSION,
        "editable": True,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [
                {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus"},
                {
                    "name": "job",
                    "label": "Job",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": {"query": "label_values(kvstore_ring_members, job)", "refId": "job"},
                    "definition": "label_values(kvstore_ring_members, job)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".+",
                    "refresh": 2,
                },
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the JSON differs from this script's output")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python scripts/dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
