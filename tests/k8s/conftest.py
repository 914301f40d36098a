"""Fixtures for the Kubernetes-side tests: the real `helm` and `hadolint` binaries
that scripts/install_tools.py puts in .tools/bin, and a renderer for the chart
(helpers in chart.py). A missing tool fails the test (never skips): CI must run
every chart test.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s.chart import TOOLS_BIN, Render, run_helm, template_args


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """No test under tests/k8s may skip (a missing tool or package would hide a whole
    area from CI): a skip is reported as a failure with its reason."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.longrepr = f"tests/k8s must not skip (install what is missing): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    """The same for a whole module skipped at import (pytest.importorskip at module level)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"tests/k8s must not skip (install what is missing): {reason}"


def _tool(name: str) -> Path:
    path = TOOLS_BIN / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"{path} is missing: run `python scripts/install_tools.py` (make test does) to install helm and hadolint",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def helm() -> Path:
    return _tool("helm")


@pytest.fixture(scope="session")
def hadolint() -> Path:
    return _tool("hadolint")


@pytest.fixture(scope="session")
def render(helm: Path) -> Render:
    """render(values_files=..., set_values=[...], set_json=[...], api_versions=[...]) ->
    the rendered documents (helm test hooks included); fails the test if helm fails."""

    def _render(**kwargs: Any) -> list[dict[str, Any]]:
        proc = run_helm(helm, template_args(**kwargs))
        if proc.returncode != 0:
            pytest.fail(f"helm template failed ({kwargs}):\n{proc.stderr}", pytrace=False)
        return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]

    return _render
