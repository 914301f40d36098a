"""The release list the mixed-version test builds from: RELEASES parses, the
previous release of this one is found, every listed commit is in this
repository's history (an ancestor of HEAD) and says it is that version, and
CHANGELOG.md names the same commits."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from app import __version__
from tests.harness.releases import REPO, listed_releases, previous_release, version_key


def git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30, check=False)


def test_the_previous_release_is_the_newest_older_one(tmp_path: Path) -> None:
    listing = tmp_path / "RELEASES"
    listing.write_text("# comment\n0.1.0 aaa\n0.2.0 bbb  # trailing comment\n0.10.0 ccc\n")
    assert listed_releases(listing) == [("0.1.0", "aaa"), ("0.2.0", "bbb"), ("0.10.0", "ccc")]
    assert version_key("0.10.0") > version_key("0.9.1")
    assert previous_release(__version__)[0] != __version__
    with pytest.raises(RuntimeError, match=r"no release older than 0\.0\.1"):
        previous_release("0.0.1")


def test_every_listed_release_is_in_history_and_in_the_changelog() -> None:
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert f"## {__version__}" in changelog, "CHANGELOG.md has no entry for the current version"
    for version, commit in listed_releases():
        assert len(commit) == 40, f"{version}: give the full commit id"
        assert git("merge-base", "--is-ancestor", commit, "HEAD").returncode == 0, f"{version} {commit} not in HEAD"
        shown = git("show", f"{commit}:app/__init__.py").stdout
        assert f'__version__ = "{version}"' in shown, f"{commit} is not kvstore {version}"
        assert f"## {version}" in changelog and commit[:7] in changelog, f"CHANGELOG.md does not name {version}"
