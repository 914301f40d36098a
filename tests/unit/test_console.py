"""The console's server side (issue 22): the static page and its assets
under /ui (app.web.routes_ui), the data under /console/ (routes_console),
the arcs-at-risk count, the verdict and its reasons, and each replica's copy
of a key (app.cluster.overview), over one node's ASGI app and over real
nodes on the in-process peer client. The page itself is tested in a real
browser: tests/integration/test_console.py."""

from __future__ import annotations

import fnmatch
import itertools
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from app import __version__
from app.cluster import overview
from app.config import DEFAULT_VNODES
from app.ring import HashRing
from app.storage.base import Record
from app.web.routes_ops import ring_view
from tests.unit.in_process import InProcessCluster

REPO = Path(__file__).resolve().parents[2]
CONSOLE = REPO / "app" / "web" / "console"


def test_ui_serves_the_page_with_a_same_origin_policy(client: TestClient) -> None:
    for path in ("/ui", "/ui/"):
        resp = client.get(path)
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
        assert 'id="verdict"' in resp.text and 'id="key-input"' in resp.text
        policy = resp.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy


def test_every_file_the_page_names_is_served_with_its_type(client: TestClient) -> None:
    html = client.get("/ui").text
    named = set(re.findall(r'(?:src|href)="(/ui/[^"]+)"', html))
    for script in CONSOLE.glob("*.js"):
        named |= {f"/ui/{name}" for name in re.findall(r'from "\./([^"]+)"', script.read_text())}
    assert {"/ui/console.js", "/ui/console.css", "/ui/favicon.svg", "/ui/ring.js"} <= named
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    for path in sorted(named):
        resp = client.get(path)
        assert resp.status_code == 200, path
        assert resp.headers["content-type"].startswith(types[path[path.rfind(".") :]]), path
    favicon = client.get("/favicon.ico")
    assert favicon.status_code == 200 and favicon.headers["content-type"] == "image/svg+xml"


@pytest.mark.parametrize("path", ["/ui/nothing.js", "/ui/..%2Fapp.py", "/ui/routes_ui.py", "/ui/console"])
def test_nothing_outside_the_shipped_files_is_served(client: TestClient, path: str) -> None:
    resp = client.get(path)
    assert resp.status_code == 404 and "error" in resp.json()


def test_every_console_file_is_package_data() -> None:
    """setuptools ships the page in the wheel (and so in the image), not only in a checkout."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["app.web"]
    for path in CONSOLE.iterdir():
        relative = f"console/{path.name}"
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative


def test_ring_adds_what_a_member_row_needs(client: TestClient) -> None:
    client.put("/put", json={"key": "k", "value": "v"})
    local = client.get("/ring").json()["local"]
    assert local["ready"] is True and local["not_ready_reason"] is None
    assert local["live_keys"] == 1 and local["hints_pending"] == 0
    assert local["storage_used_bytes"] is None  # in memory: no limit of its own
    assert local["rebalance"]["syncing"] is False and local["anti_entropy"]["last_round"] is None


def test_overview_of_a_single_node(client: TestClient) -> None:
    body = client.get("/console/overview").json()
    assert body["verdict"] == "healthy" and body["reasons"] == []
    assert [m["node_id"] for m in body["members"]] == ["n1"]
    row = body["members"][0]
    assert row["state"] == "up" and row["self"] and row["version"] == __version__ and row["seen_by"] == {}
    assert body["ring"]["arcs"] == DEFAULT_VNODES and body["ring"]["runs"] == []
    owners = client.get("/console/ring").json()
    assert owners["members"] == ["n1"] and owners["runs"] == [[0.0, 1.0, 0]]


def test_key_lookup_reads_the_copy_and_refuses_bad_keys(client: TestClient) -> None:
    version = client.put("/put", json={"key": "café", "value": "crème", "ttl": 60}).json()["version"]
    body = client.get("/console/key", params={"key": "café"}).json()
    assert body["key"] == "café" and body["agree"] is True and (body["answered"], body["replicas"]) == (1, 1)
    (copy,) = body["copies"]
    assert copy["node_id"] == "n1" and copy["state"] == "live" and copy["version"] == version
    assert copy["expires_at_ms"] > copy["version_wall_ms"] and copy["value_bytes"] == len("crème".encode())
    assert client.get("/console/key", params={"key": "never"}).json()["copies"][0]["state"] == "absent"
    for params in ({}, {"key": ""}, {"key": "k" * 1025}):
        resp = client.get("/console/key", params=params)
        assert resp.status_code == 400 and "key" in resp.json()["error"]


def test_arcs_below_n_and_below_quorum_are_counted_and_cover_what_they_claim() -> None:
    ring = HashRing(["a", "b", "c", "d"], vnodes=16)
    everyone = overview.arc_health(ring, n=3, up={"a", "b", "c", "d"})
    assert (everyone.total, everyone.below_n, everyone.below_quorum, everyone.runs) == (64, 0, 0, [])
    one_down = overview.arc_health(ring, n=3, up={"a", "b", "c"})
    expected = sum(1 for _, owners in ring.replica_sets(3) if "d" in owners)
    assert (one_down.below_n, one_down.below_quorum) == (expected, 0)
    assert one_down.below_n_share == pytest.approx(ring.shares(3)["d"], abs=1e-5)
    two_down = overview.arc_health(ring, n=3, up={"a", "b"})
    assert two_down.below_quorum == sum(1 for _, owners in ring.replica_sets(3) if {"c", "d"} <= set(owners))
    assert two_down.below_n + two_down.below_quorum == sum(
        1 for _, owners in ring.replica_sets(3) if {"c", "d"} & set(owners)
    )
    # The runs are in order, never overlap, and measure the shares counted.
    for health in (one_down, two_down):
        for (_, end, _), (start, _, _) in itertools.pairwise(health.runs):
            assert end <= start
        measured = sum(b - a for a, b, kind in health.runs if kind == overview.BELOW_QUORUM)
        assert measured == pytest.approx(health.below_quorum_share, abs=1e-4)


def test_owner_runs_tile_the_circle_with_each_arcs_owner() -> None:
    ring = HashRing(["a", "b", "c"], vnodes=32)
    runs = overview.owner_runs(ring)
    assert runs[0][0] == 0.0 and runs[-1][1] == 1.0
    for (_, end, _), (start, _, _) in itertools.pairwise(runs):
        assert end == start
    assert all(runs[i][2] != runs[i + 1][2] for i in range(len(runs) - 1)), "adjacent runs of one owner are merged"
    for a, b, index in runs:
        middle = int((a + b) / 2 * 2**64)
        assert ring.owners_of_token(middle, 1)[0] == ring.members[index]


def _facts(node_id: str, **kwargs: Any) -> overview.MemberFacts:
    return overview.MemberFacts(node_id=node_id, **kwargs)


def test_the_verdict_and_its_reasons() -> None:
    ring = HashRing(["a", "b", "c"], vnodes=8)
    fine = overview.arc_health(ring, n=3, up={"a", "b", "c"})
    members = [_facts("a", up=True, ready=True), _facts("b", up=True, ready=True), _facts("c", up=True, ready=True)]
    assert overview.verdict(members=members, arcs=fine, n=3, observer="a") == ("healthy", [])

    c_down = [*members[:2], _facts("c", up=False, why_down="refused", seen_down_by=("b",))]
    verdict, reasons = overview.verdict(
        members=c_down, arcs=overview.arc_health(ring, n=3, up={"a", "b"}), n=3, observer="a"
    )
    assert verdict == "degraded"
    assert reasons[0] == "c is down as a and b see it: refused"
    assert reasons[1].startswith("24 of 24 arcs (100.0% of the key space) have fewer than 3 replicas reachable")

    unready = [*members[:2], _facts("c", up=True, ready=False, not_ready_reason="pulling its ranges")]
    assert overview.verdict(members=unready, arcs=fine, n=3, observer="a") == (
        "degraded",
        ["c is not ready: pulling its ranges"],
    )
    partitioned = [*members[:2], _facts("c", up=True, ready=True, seen_down_by=("b",))]
    assert overview.verdict(members=partitioned, arcs=fine, n=3, observer="a")[1] == [
        "c is down as b sees it (up as a sees it)"
    ]

    two_down = [members[0], _facts("b", up=False), _facts("c", up=False)]
    verdict, reasons = overview.verdict(
        members=two_down, arcs=overview.arc_health(ring, n=3, up={"a"}), n=3, observer="a"
    )
    assert verdict == "unavailable" and "fewer than a quorum (2)" in reasons[0]


async def test_copies_come_from_every_replica_without_repairing_any(cluster: InProcessCluster) -> None:
    ids = ["a", "b", "c"]
    await cluster.start_holding(ids, [b"k"])
    a, c = cluster.nodes["a"], cluster.nodes["c"]
    stale = c.store.get(b"k")
    assert stale is not None
    newer = Record(version=a.clock.now(), value=b"newer")
    for node_id in ("a", "b"):
        cluster.nodes[node_id].store.apply(b"k", newer)
    copies = await overview.replica_copies(a, b"k")
    assert [copy.node_id for copy in copies] == list(a.topology.current.ring.owners(b"k", 3))
    versions = {copy.node_id: copy.record.version for copy in copies if copy.record is not None}
    assert versions == {"a": newer.version, "b": newer.version, "c": stale.version}
    assert overview.agreement(copies)["agree"] is False
    assert c.store.get(b"k") == stale, "looking a key up repaired nothing"

    cluster.peer_client.unreachable.add("c")
    copies = await overview.replica_copies(a, b"k")
    unreachable = next(copy for copy in copies if copy.node_id == "c")
    assert not unreachable.answered and "unreachable" in (unreachable.error or "")
    assert overview.agreement(copies) | {"now_ms": 0} == {"agree": True, "answered": 2, "replicas": 3, "now_ms": 0}


async def test_peer_views_mark_a_silent_peer_down(cluster: InProcessCluster) -> None:
    await cluster.start_holding(["a", "b", "c"], [])
    a = cluster.nodes["a"]
    views = await overview.peer_views(a, authorization=None)
    assert set(views) == {"b", "c"} and all(isinstance(view, dict) for view in views.values())
    b_view = views["b"]
    assert isinstance(b_view, dict) and b_view["node_id"] == "b"
    cluster.peer_client.unreachable.add("c")
    views = await overview.peer_views(a, authorization=None)
    assert isinstance(views["c"], str) and not a.health.is_up("c")
    views = await overview.peer_views(a, authorization=None)
    assert views["c"] == "c is down as a sees it; not asked"


async def test_the_last_anti_entropy_round_is_reported_in_ring(cluster: InProcessCluster) -> None:
    await cluster.start_holding(["a", "b"], [b"k"])
    a, b = cluster.nodes["a"], cluster.nodes["b"]
    b.store.apply(b"k", Record(version=b.clock.now(), value=b"newer"))
    assert await a.anti_entropy.run_round() == 1
    local = ring_view(a)["local"]
    assert isinstance(local, dict)
    reported = local["anti_entropy"]
    assert reported["rounds"] == 1 and reported["repaired_total"] == 1
    last = reported["last_round"]
    assert (last["peer"], last["repaired"], last["reached"]) == ("b", 1, True)


def test_an_incompatible_member_degrades_the_verdict() -> None:
    ring = HashRing(["a", "b"], vnodes=8)
    members = [_facts("a", up=True, ready=True), _facts("b", up=True, ready=True, incompatible="speaks protocol 3")]
    assert overview.verdict(members=members, arcs=overview.arc_health(ring, n=2, up={"a", "b"}), n=2, observer="a") == (
        "degraded",
        ["b is incompatible: speaks protocol 3"],
    )
