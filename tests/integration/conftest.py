from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.processes import Cluster, TlsMode
from tests.harness.proxy import ProxyMesh
from tests.integration.history import Load


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Start clusters of real node processes; every one is stopped at teardown,
    whatever the test did (nodes added later with Cluster.add_node included)."""
    clusters: list[Cluster] = []

    def make(
        size: int = 3,
        args: list[str] | None = None,
        durable: bool = False,
        peers_for: Callable[[str, dict[str, str]], dict[str, str]] | None = None,
        env_for: dict[str, dict[str, str]] | None = None,
        unready: Iterable[str] = (),
        tls: TlsMode | None = None,
    ) -> Cluster:
        cluster = Cluster(
            size=size,
            log_dir=tmp_path,
            args=args,
            data_root=tmp_path / "data" if durable else None,
            peers_for=peers_for,
            env_for=env_for,
            tls=tls,
        )
        clusters.append(cluster)
        return cluster.start(unready=unready)

    try:
        yield make
    finally:
        for cluster in clusters:
            cluster.stop()


@pytest.fixture
def proxy_mesh() -> Iterator[ProxyMesh]:
    """Per-pair TCP proxies (pass `proxy_mesh.route` as make_cluster's peers_for);
    all closed at teardown."""
    mesh = ProxyMesh()
    try:
        yield mesh
    finally:
        mesh.close()


@pytest.fixture
def start_load() -> Iterator[Callable[..., Load]]:
    """Start background client loads (see history.Load); any still running
    at teardown is stopped."""
    loads: list[Load] = []

    def start(**kwargs: Any) -> Load:
        load = Load(**kwargs)
        loads.append(load)
        return load.start()

    try:
        yield start
    finally:
        for load in loads:
            load.halt()
