"""The chart under test and how to run helm on it: paths, the release and
namespace every render uses, and `template_args`/`run_helm`. Shared by
test_chart.py, test_dockerfile.py and conftest.py's fixtures (`helm`,
`render`); imports no pytest.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TOOLS_BIN = REPO / ".tools" / "bin"  # scripts/install_tools.py puts helm and hadolint here
CHART = REPO / "deploy" / "helm" / "kvstore"
CHART_CI_VALUES = CHART / "ci"  # non-default values files, one scenario each (kept out of the package by .helmignore)
KUBE_VERSION = "1.33.0"
RELEASE = "kv"
NAMESPACE = "store"
HELM_TIMEOUT_S = 60

Render = Callable[..., list[dict[str, Any]]]


def run_helm(helm: Path, args: Sequence[str], *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm), *args], capture_output=True, text=True, timeout=HELM_TIMEOUT_S, check=False, env=env
    )


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
