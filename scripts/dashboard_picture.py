"""Draws the chart's Grafana dashboard from a real Prometheus into a PNG: each
panel of deploy/helm/kvstore/dashboards/kvstore.json, in its grid position,
with every target queried over the last minutes through Prometheus' HTTP
query_range API. No Grafana needed; what is drawn is what the panels' PromQL
returns. Run by `make dashboard-picture` (tests/integration/test_prometheus.py
with KVSTORE_DASHBOARD_PICTURE set), which gives it a Prometheus scraping a
loaded three-node cluster with one node killed near the end, after installing
matplotlib (needed by nothing else, so it is not among the test extras).

    python scripts/dashboard_picture.py --prometheus URL --job kvstore --out docs/dashboard.png
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt
from PIL import Image  # matplotlib's own dependency

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "kvstore" / "dashboards" / "kvstore.json"
RATE_WINDOW = "10s"  # stands in for Grafana's $__rate_interval at a 1 s scrape interval
STEP_S = 2  # one point every 2 s: smooth enough, small file
GRID_ROW_INCHES = 0.32  # one Grafana grid row (h=1) in the picture
GRID_COL_INCHES = 0.62  # one of Grafana's 24 columns
DPI = 72  # with the palette below, keeps the PNG small enough to live in the repository
PALETTE_COLOURS = 64
UNITS = {"percentunit": "share of limit", "reqps": "req/s", "ops": "ops/s", "s": "seconds", "short": ""}


def query_range(base: str, expr: str, *, start: float, end: float) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": STEP_S})
    with urllib.request.urlopen(f"{base}/api/v1/query_range?{params}", timeout=30) as response:
        body = json.load(response)
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    return list(body["data"]["result"])


def legend(template: str, labels: dict[str, str]) -> str:
    text = template
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def draw(*, base: str, job: str, minutes: float, out: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(24 * GRID_COL_INCHES, rows * GRID_ROW_INCHES), dpi=DPI)
    end = time.time()
    start = end - minutes * 60
    for panel in panels:
        pos = panel["gridPos"]
        ax = fig.add_axes(
            (
                pos["x"] / 24 + 0.03,
                1 - (pos["y"] + pos["h"]) / rows + 0.045,
                pos["w"] / 24 - 0.045,
                pos["h"] / rows - 0.085,
            )
        )
        ax.set_title(panel["title"], fontsize=10, loc="left")
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", RATE_WINDOW).replace("$job", job)
            for series in query_range(base, expr, start=start, end=end):
                points = [(float(t) - end, float(v)) for t, v in series["values"] if not math.isnan(float(v))]
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, linewidth=1.2, label=legend(target["legendFormat"], series["metric"]))
        ax.set_ylabel(UNITS.get(panel["fieldConfig"]["defaults"]["unit"], ""), fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6, loc="upper left", ncol=3, framealpha=0.6)
    fig.text(
        0.005,
        0.998,
        f"{dashboard['title']} (x: seconds before {time.strftime('%H:%M:%S', time.gmtime(end))} UTC)",
        fontsize=11,
        va="top",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    buffer.seek(0)
    # A palette of PALETTE_COLOURS (lines, text, grid) keeps the file a fraction of its RGBA size.
    Image.open(buffer).convert("RGB").quantize(colors=PALETTE_COLOURS).save(out, optimize=True)
    print(f"{out}: {out.stat().st_size} bytes")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", required=True, help="base URL, e.g. http://127.0.0.1:9090")
    parser.add_argument("--job", default="kvstore", help="value for the dashboard's $job variable")
    parser.add_argument("--minutes", type=float, default=2.0, help="how far back to draw")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args()
    draw(base=args.prometheus.rstrip("/"), job=args.job, minutes=args.minutes, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
