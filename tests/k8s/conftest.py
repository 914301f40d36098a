"""Fixtures for the Kubernetes-side tests: the real `helm` and `hadolint` binaries
that scripts/install_tools.py puts in .tools/bin, and a renderer for the chart.
A missing tool fails the test (never skips): CI must run every chart test.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TOOLS_BIN = REPO / ".tools" / "bin"
CHART = REPO / "deploy" / "helm" / "kvstore"
CHART_CI_VALUES = CHART / "ci"  # non-default values files, one scenario each (kept out of the package by .helmignore)
KUBE_VERSION = "1.33.0"
RELEASE = "kv"
NAMESPACE = "store"
HELM_TIMEOUT_S = 60

Render = Callable[..., list[dict[str, Any]]]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """No test under tests/k8s may skip (a missing tool or package would hide a whole
    area from CI): a skip is reported as a failure with its reason."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.longrepr = f"tests/k8s must not skip (install what is missing): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
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
        pytest.fail(f"{path} is missing: run `python scripts/install_tools.py` (make test does) to install helm and hadolint", pytrace=False)
    return path


@pytest.fixture(scope="session")
def helm() -> Path:
    return _tool("helm")


@pytest.fixture(scope="session")
def hadolint() -> Path:
    return _tool("hadolint")


def run_helm(helm: Path, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=HELM_TIMEOUT_S, check=False)


def template_args(
    *,
    values_files: Sequence[Path] = (),
    set_values: Sequence[str] = (),
    set_json: Sequence[str] = (),
    api_versions: Sequence[str] = (),
    show_tests: bool = True,
) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
    for path in values_files:
        args += ["--values", str(path)]
    for item in set_values:
        args += ["--set", item]
    for item in set_json:
        args += ["--set-json", item]
    for api in api_versions:
        args += ["--api-versions", api]
    if not show_tests:
        args.append("--skip-tests")
    return args


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
