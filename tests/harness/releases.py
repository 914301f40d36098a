"""Earlier releases of kvstore, built from this repository's own history for
the mixed-version test: the RELEASES file names each release's commit; the
release before the current one (app.__version__) is extracted with
`git archive` (no worktree, nothing in .git changes) and installed into a venv
of its own from that commit's locks (hash-checked, as `make` installs ours),
under a cache directory keyed by the commit, so only the first run pays.

Needs the commit in the clone (CI's checkout is a full clone; a shallow one
fails with the fix named) and the package index the locks install from.
Imports no pytest; used by tests/integration/test_upgrade.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from app import __version__

REPO = Path(__file__).resolve().parents[2]
RELEASES_FILE = REPO / "RELEASES"
# Outside the worktree: survives `make clean` and is shared by every clone on the machine.
CACHE_ROOT = Path(os.environ.get("KVSTORE_RELEASE_CACHE", "/var/tmp/kvstore-releases"))
COMPLETE = ".complete"  # written last: a directory without it is a build cut short, redone
INSTALL_TIMEOUT_S = 900.0  # a cold pip install of the runtime lock takes ~1 min here; a slow index more


@dataclass(frozen=True)
class Release:
    """A built release: run a node with `python -m app node ...` in `tree`."""

    version: str
    commit: str
    tree: Path  # the release's source, the cwd its nodes run in
    python: Path  # its venv's interpreter


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def listed_releases(path: Path = RELEASES_FILE) -> list[tuple[str, str]]:
    """(version, commit) of every release the RELEASES file names."""
    releases = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            version, commit = line.split()
            releases.append((version, commit))
    return releases


def previous_release(current: str = __version__) -> tuple[str, str]:
    """The newest listed release older than `current`: release X-1."""
    older = [(v, c) for v, c in listed_releases() if version_key(v) < version_key(current)]
    if not older:
        raise RuntimeError(f"{RELEASES_FILE} lists no release older than {current}")
    return max(older, key=lambda release: version_key(release[0]))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder per commit at a time (two test runs on one machine wait, then share)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run(args, capture_output=True, timeout=INSTALL_TIMEOUT_S, check=False, **kwargs)  # type: ignore[call-overload]  # kwargs are subprocess's own
    if done.returncode != 0:
        output = (done.stdout + done.stderr).decode(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{output}")
    return done


def build_release(version: str, commit: str, *, cache_root: Path = CACHE_ROOT) -> Release:
    """The release at `commit`, extracted and installed once, then reused."""
    home = cache_root / commit
    release = Release(version=version, commit=commit, tree=home / "tree", python=home / "venv" / "bin" / "python")
    with _locked(cache_root / f"{commit}.lock"):
        if (home / COMPLETE).exists():
            return release
        shutil.rmtree(home, ignore_errors=True)
        present = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{commit}^{{commit}}"], check=False)
        if present.returncode != 0:
            raise RuntimeError(
                f"release {version}'s commit {commit} is not in this clone ({REPO}): the mixed-version test builds "
                "it from history; fetch the full history (git fetch --unshallow)"
            )
        archive = _run(["git", "-C", str(REPO), "archive", "--format=tar", commit]).stdout
        release.tree.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            if hasattr(tarfile, "data_filter"):  # Python 3.11.4+: refuse links and paths leaving the tree
                tar.extractall(release.tree, filter="data")
            else:  # our own repository's archive: nothing hostile in it
                tar.extractall(release.tree)
        _run([sys.executable, "-m", "venv", str(home / "venv")])
        locks = release.tree / "requirements"
        pip = [str(release.python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        _run([*pip, "--require-hashes", "-r", str(locks / "build.txt"), "-r", str(locks / "runtime.txt")])
        _run([*pip, "--no-deps", "--no-build-isolation", str(release.tree)])
        shown = _run([str(release.python), "-c", "import app; print(app.__version__)"], cwd=release.tree)
        if shown.stdout.decode().strip() != version:
            raise RuntimeError(f"commit {commit} says it is kvstore {shown.stdout.decode().strip()}, not {version}")
        (home / COMPLETE).write_text(f"{version} {commit}\n")
    return release


def build_previous_release() -> Release:
    return build_release(*previous_release())
