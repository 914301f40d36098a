"""Building a node's configuration for in-process tests: `single_node_config`,
a one-member node on a port nothing listens on. Used by conftest.py's
`client` fixture and by tests that need a node configured otherwise."""

from __future__ import annotations

from app.config import NodeConfig


def single_node_config(**overrides: str) -> NodeConfig:
    values: dict[str, str | None] = {"node_id": "n1", "listen": "127.0.0.1:9", **overrides}
    return NodeConfig.from_options(values)
