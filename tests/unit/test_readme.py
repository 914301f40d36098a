"""The README's configuration table lists exactly the node's settings."""

from __future__ import annotations

import re
from pathlib import Path

from app.config import NODE_OPTIONS

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_configuration_table_matches_the_settings() -> None:
    rows = re.findall(r"^\| `(--[a-z-]+)` \| `(KVSTORE_[A-Z_]+)` \| ([^|]+) \|", README.read_text(), re.M)
    documented = {flag: (env, default.strip()) for flag, env, default in rows}
    expected = {option.flag: (option.env, f"`{option.default}`" if option.default else "—") for option in NODE_OPTIONS}
    assert documented == expected
