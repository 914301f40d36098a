"""Files a node re-reads when they change, without a restart: the TLS files
(app.transport.tls) and the users file (app.access).

A fingerprint of the files' bytes (read through symlinks, so a mounted
Secret's `..data` swap shows as the change it is; a missing file hashes as
absent) is compared at each check. The owner tries to load a changed
content and says how it went: `accepted`, or `refused`, which is true only
the first time for that content, so a half-written file is logged and
counted once and tried again when it changes. Pure: the standard library only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path


class WatchedFiles:
    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(dict.fromkeys(paths))
        self._current = self.fingerprint()
        self._refused: bytes | None = None

    def changed(self) -> bytes | None:
        """The files' new fingerprint if their bytes differ from the content
        last accepted (the one at start, first), else None."""
        fingerprint = self.fingerprint()
        return None if fingerprint == self._current else fingerprint

    def accepted(self, fingerprint: bytes) -> None:
        """The content of `fingerprint` loaded and is in force now."""
        self._current, self._refused = fingerprint, None

    def refused(self, fingerprint: bytes) -> bool:
        """The content of `fingerprint` did not load; True the first time
        (log and count it then), False while the same content stays."""
        if fingerprint == self._refused:
            return False
        self._refused = fingerprint
        return True

    def fingerprint(self) -> bytes:
        digest = hashlib.sha256()
        for path in self.paths:
            try:
                digest.update(Path(path).read_bytes())
            except OSError:
                digest.update(b"\0missing\0")
            digest.update(b"\0" + path.encode() + b"\0")
        return digest.digest()
