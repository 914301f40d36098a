"""Fixtures for the unit tests: `client`, one node served in-process, and `cluster`, real nodes
over the in-process peer client (helpers in nodes.py and in_process.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from starlette.testclient import TestClient

from app.web.app import create_app
from tests.unit.in_process import InProcessCluster
from tests.unit.nodes import single_node_config


@pytest.fixture
def client() -> Iterator[TestClient]:
    """A one-member node served in-process (lifespan included), no sockets."""
    with TestClient(create_app(single_node_config(max_value_bytes="4096"))) as test_client:
        yield test_client


@pytest.fixture
async def cluster() -> AsyncIterator[InProcessCluster]:
    """Real nodes in this process over the in-process peer client; all closed at teardown."""
    built = InProcessCluster()
    try:
        yield built
    finally:
        await built.close()
