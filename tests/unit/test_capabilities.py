"""Capability negotiation and the protocol header: what a node learns of its
peers, what the cluster may use (all support it, then one does not, then it
leaves), the "no header is 0.1.0" default, peers too old or too new kept
down; and the header on the wire of one node's HTTP API."""

from __future__ import annotations

import logging

import pytest
from starlette.testclient import TestClient

from app import __version__
from app.cli import format_ring
from app.cluster.capabilities import Capabilities
from app.cluster.health import PeerHealth
from app.transport.protocol import LEGACY, OWN, PROTOCOL_HEADER, PeerProtocol, parse
from app.web.app import create_app
from tests.unit.nodes import single_node_config


def speaking(*capabilities: str, protocol: int = 3, min_protocol: int = 1, release: str = "9.9.9") -> str:
    """A peer's header value."""
    return PeerProtocol(
        protocol=protocol, min_protocol=min_protocol, release=release, capabilities=frozenset(capabilities)
    ).render()


def node(*capabilities: str, members: tuple[str, ...] = ("n1", "n2", "n3")) -> Capabilities:
    own = PeerProtocol(protocol=3, min_protocol=2, release="9.9.9", capabilities=frozenset(capabilities))
    caps = Capabilities(self_id="n1", own=own)
    caps.set_members(members)
    return caps


def test_a_feature_is_used_once_every_member_supports_it_and_until_one_does_not() -> None:
    caps = node("digest-v2", "batch-v2")
    assert not caps.cluster_supports("digest-v2"), "peers not heard from count as no"
    assert caps.unknown_members() == ["n2", "n3"]
    caps.observe("n2", speaking("digest-v2", "batch-v2"))
    assert not caps.cluster_supports("digest-v2"), "n3 not heard from yet"
    caps.observe("n3", speaking("digest-v2"))
    assert caps.cluster_supports("digest-v2")
    assert not caps.cluster_supports("batch-v2"), "n3 lacks it"
    assert caps.cluster_capabilities() == {"digest-v2"}
    assert caps.peer_supports("n2", "batch-v2") and not caps.peer_supports("n3", "batch-v2")

    caps.observe("n3", speaking())  # n3 replaced by a release without it (a rollback)
    assert not caps.cluster_supports("digest-v2")
    caps.set_members(["n1", "n2"])  # n3 leaves the ring
    assert caps.cluster_supports("digest-v2") and caps.cluster_supports("batch-v2")
    assert caps.peer("n3") is None
    caps.set_members(["n1", "n2", "n3"])  # and comes back: unknown until heard from
    assert not caps.cluster_supports("digest-v2")


def test_a_feature_this_node_lacks_is_never_used() -> None:
    caps = node(members=("n1", "n2"))
    caps.observe("n2", speaking("digest-v2"))
    assert not caps.cluster_supports("digest-v2") and not caps.peer_supports("n2", "digest-v2")


def test_forgetting_a_peer_holds_the_cluster_back_until_it_is_heard_again() -> None:
    caps = node("digest-v2", members=("n1", "n2"))
    caps.observe("n2", speaking("digest-v2"))
    assert caps.cluster_supports("digest-v2")
    caps.forget("n2")  # it went away: it may come back as another release
    assert not caps.cluster_supports("digest-v2")
    caps.observe("n2", speaking("digest-v2"))
    assert caps.cluster_supports("digest-v2")


def test_no_header_means_0_1_0() -> None:
    assert parse(None) == LEGACY
    assert (LEGACY.release, LEGACY.protocol, LEGACY.capabilities) == ("0.1.0", 1, frozenset())
    caps = Capabilities(self_id="n1")  # this build
    caps.set_members(["n1", "n2", "n3"])
    caps.observe("n2", None)
    caps.observe("n3", OWN.render())
    n2 = caps.peer("n2")
    assert n2 is not None and n2.release == "0.1.0" and n2.protocol == 1
    assert caps.incompatibility("n2") is None, "this release talks to the one before it"
    assert caps.cluster_protocol() == 1, "the cluster runs the old protocol while an old node is a member"
    caps.observe("n2", OWN.render())  # upgraded
    assert caps.cluster_protocol() == OWN.protocol


def test_the_header_round_trips_and_unknown_fields_are_ignored() -> None:
    assert parse(OWN.render()) == OWN
    assert OWN.release == __version__
    later = parse("7; min=2; release=4.0.0; capabilities=a,b; compression=zstd; future")
    assert later == PeerProtocol(protocol=7, min_protocol=2, release="4.0.0", capabilities=frozenset({"a", "b"}))
    for bad in ("", "two", "2; min=3", "0", "2; min=x"):
        with pytest.raises(ValueError):
            parse(bad)


@pytest.mark.parametrize(
    ("header", "words"),
    [
        (speaking(protocol=1, min_protocol=1, release="0.1.0"), "too old: it runs kvstore 0.1.0"),
        (speaking(protocol=6, min_protocol=4, release="5.0.0"), "too new: it runs kvstore 5.0.0"),
        ("garbage", "unreadable"),
    ],
)
def test_a_peer_too_old_too_new_or_unreadable_is_named_and_kept_down(
    header: str, words: str, caplog: pytest.LogCaptureFixture
) -> None:
    health = PeerHealth()
    caps = Capabilities(
        self_id="n1",
        own=PeerProtocol(protocol=3, min_protocol=2, release="9.9.9"),
        on_verdict=health.set_incompatible,
    )
    caps.set_members(["n1", "n2"])
    with caplog.at_level(logging.ERROR, logger="app.cluster.capabilities"):
        caps.observe("n2", header)
    assert "peer n2 is incompatible, treated as unreachable" in caplog.text and words in caplog.text
    reason = caps.incompatibility("n2")
    assert reason is not None and words in reason
    assert caps.peer("n2") is None and caps.incompatible_members() == ["n2"]
    assert not health.is_up("n2") and words in health.state("n2").last_error
    health.mark_up("n2")  # a probe answered, a request came: still down
    health.heard_from("n2")
    assert not health.is_up("n2")
    caps.observe("n2", speaking(protocol=3, min_protocol=2))  # replaced by a release that fits
    assert caps.incompatibility("n2") is None and caps.peer("n2") is not None
    health.mark_up("n2")  # the next probe brings it back
    assert health.is_up("n2")


def test_the_node_speaks_the_header_on_health_internal_answers_ring_and_metrics(client: TestClient) -> None:
    health = client.get("/health")
    assert parse(health.headers[PROTOCOL_HEADER]) == OWN
    answer = client.get("/internal/v1/kv/k")
    assert answer.status_code == 404 and parse(answer.headers[PROTOCOL_HEADER]) == OWN
    assert PROTOCOL_HEADER not in client.get("/kv/k").headers, "client routes carry no protocol header"
    ring = client.get("/ring").json()
    assert ring["version"] == __version__
    assert ring["protocol"] == {"version": OWN.protocol, "min": OWN.min_protocol, "capabilities": []}
    assert ring["cluster"] == {"protocol": OWN.protocol, "capabilities": [], "waiting_for": []}
    assert ring["members"][0]["version"] == __version__
    metrics = client.get("/metrics").text
    assert (
        f'kvstore_build_info{{min_protocol="{OWN.min_protocol}",protocol="{OWN.protocol}",version="{__version__}"}} 1.0'
        in metrics
    )
    assert f"kvstore_cluster_protocol {float(OWN.protocol)}" in metrics


def test_an_internal_request_from_a_peer_too_new_marks_it_unreachable_in_ring_and_metrics() -> None:
    config = single_node_config(peers="n1=http://127.0.0.1:9,n2=http://127.0.0.1:1")
    with TestClient(create_app(config)) as client:
        too_new = speaking(protocol=OWN.protocol + 2, min_protocol=OWN.protocol + 1, release="9.0.0")
        client.get("/internal/v1/kv/k", headers={"x-kvstore-from": "n2", PROTOCOL_HEADER: too_new})
        ring = client.get("/ring").json()
        n2 = next(member for member in ring["members"] if member["node_id"] == "n2")
        assert not n2["reachable"] and "too new: it runs kvstore 9.0.0" in n2["incompatible"]
        assert ring["cluster"]["waiting_for"] == ["n2"]
        assert "kvstore_peers_incompatible 1.0" in client.get("/metrics").text


def test_the_cli_ring_table_shows_versions_of_both_releases(client: TestClient) -> None:
    table = format_ring(client.get("/ring").json())
    assert (
        "VERSION" in table.splitlines()[1]
        and f" {__version__} " in table
        and f"cluster protocol {OWN.protocol}" in table
    )
    old_ring = client.get("/ring").json()  # as 0.1.0 answers: no versions, no cluster
    old_ring.pop("cluster")
    for member in old_ring["members"]:
        member.pop("version")
    assert " ? " in format_ring(old_ring) and "cluster protocol" not in format_ring(old_ring)
