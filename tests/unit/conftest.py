"""Fixtures for the unit tests: `client`, one node served in-process (helpers in nodes.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from app.web.app import create_app
from tests.unit.nodes import single_node_config


@pytest.fixture
def client() -> Iterator[TestClient]:
    """A one-member node served in-process (lifespan included), no sockets."""
    with TestClient(create_app(single_node_config(max_value_bytes="4096"))) as test_client:
        yield test_client
