"""The backup CLI's pieces that need no cluster: the progress line (on a
terminal only) and the refusals before any request is sent."""

from __future__ import annotations

import io

import pytest

from app.cli import main
from app.cli.backup import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_shows_keys_bytes_rate_and_eta_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    screen = Terminal()
    monkeypatch.setattr("sys.stderr", screen)
    progress = Progress("backup")
    progress.expected = 1000
    progress.started -= 2.0  # two seconds in
    progress.update(records=250, bytes_=5_000_000)
    progress.done()
    line = screen.getvalue()
    assert "backup: 250 keys, 5.0 MB" in line
    assert "keys/s" in line and "ETA 6 s" in line
    assert line.endswith("\n")


def test_no_progress_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = io.StringIO()
    monkeypatch.setattr("sys.stderr", pipe)
    progress = Progress("restore")
    progress.update(records=10, bytes_=10)
    progress.done()
    assert pipe.getvalue() == ""


def test_backup_needs_a_destination(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backup", "--url", "http://127.0.0.1:9"]) == 1
    assert "-o FILE, or `-` for stdout" in capsys.readouterr().err


def test_backup_takes_one_destination(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backup", "--url", "http://127.0.0.1:9", "-o", "x.kvbak", "-"]) == 1
    assert "not both" in capsys.readouterr().err


def test_restore_of_a_missing_file_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["restore", "--url", "http://127.0.0.1:9", "/nonexistent/backup.kvbak"]) == 1
    assert "cannot open /nonexistent/backup.kvbak" in capsys.readouterr().err
