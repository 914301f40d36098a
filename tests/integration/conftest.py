from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.nodes import Cluster


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Start clusters of real node processes; every one is stopped at teardown,
    whatever the test did."""
    clusters: list[Cluster] = []

    def make(size: int = 3, args: list[str] | None = None, durable: bool = False) -> Cluster:
        cluster = Cluster(size=size, log_dir=tmp_path, args=args, data_root=tmp_path / "data" if durable else None)
        clusters.append(cluster)
        return cluster.start()

    try:
        yield make
    finally:
        for cluster in clusters:
            cluster.stop()
