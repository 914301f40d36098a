"""TLS settings and material: which flag combinations make sense, and how a
change of the files is taken in, or refused while they are half-written.
(The handshakes themselves run in tests/integration/test_tls.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import NodeConfig, parse_tls
from app.errors import ConfigError
from app.membership.statefulset import member_urls
from app.transport.tls import TlsMaterial
from tests.harness.certs import Authority, node_flags, write_secret


def tls_values(directory: Path, **extra: str) -> dict[str, str | None]:
    flags = node_flags(directory, peer_tls=False)
    values: dict[str, str | None] = {flags[i].lstrip("-").replace("-", "_"): flags[i + 1] for i in range(0, 6, 2)}
    return {"node_id": "n1", "listen": "127.0.0.1:9443", **values, **extra}


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    ca = Authority.create("unit-ca")
    return write_secret(tmp_path / "n1", issued=ca.issue("n1", ips=("127.0.0.1",)), ca_pem=ca.cert_pem)


def test_tls_makes_the_node_https_and_refuses_plain_peers(secret: Path) -> None:
    config = NodeConfig.from_options(tls_values(secret, peer_tls="true", peers="n2=https://h:1"))
    assert config.advertise_url == "https://127.0.0.1:9443" and config.scheme == "https"
    assert config.tls is not None and config.tls.peer_tls and not config.tls.client_cert_auth
    assert config.tls.peer == config.tls.server  # the peer files default to the client ones
    with pytest.raises(ConfigError, match="https://"):
        NodeConfig.from_options(tls_values(secret, peers="n2=http://h:1"))


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"tls_cert": "c"}, "go together"),
        ({"peer_tls": "true"}, "need --tls-cert"),
        ({"client_cert_auth": "true"}, "need --tls-cert"),
        ({"tls_cert": "c", "tls_key": "k", "client_cert_auth": "true"}, "needs --tls-ca"),
        ({"tls_cert": "c", "tls_key": "k", "peer_tls": "true"}, "needs --tls-ca"),
        ({"tls_cert": "c", "tls_key": "k", "peer_tls": "maybe"}, "true or false"),
        ({"tls_cert": "c", "tls_key": "k", "tls_reload_interval": "0"}, "positive"),
    ],
)
def test_impossible_tls_settings_are_refused(values: dict[str, str | None], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_tls(values)


def test_no_tls_flags_means_plain_http() -> None:
    assert parse_tls({}) is None
    assert NodeConfig.from_options({"node_id": "n1"}).advertise_url.startswith("http://")


def test_unloadable_files_fail_at_start(secret: Path, tmp_path: Path) -> None:
    other = Authority.create("other").issue("x")
    (tmp_path / "wrong.key").write_bytes(other.key_pem)
    config = NodeConfig.from_options(tls_values(secret, tls_key=str(tmp_path / "wrong.key"))).tls
    assert config is not None
    with pytest.raises(ConfigError, match="cannot load the TLS files"):
        TlsMaterial(config)


def test_a_changed_secret_is_swapped_in_and_a_half_written_one_is_not(secret: Path) -> None:
    config = NodeConfig.from_options(tls_values(secret)).tls
    assert config is not None
    reloads: list[bool] = []
    rotations: list[int] = []
    material = TlsMaterial(config, on_reload=reloads.append)
    material.on_rotate(lambda: rotations.append(material.generation))
    first_server, first_client = material.server_context, material.client_context()
    assert material.reload() is False  # nothing changed

    # Half-written: a new certificate with the old key (the kubelet never does this; an editor might).
    new_ca = Authority.create("new-ca")
    issued = new_ca.issue("n1")
    (secret / "..data" / "tls.crt").write_bytes(issued.cert_pem)
    assert material.reload() is False and material.reload() is False
    assert reloads == [False]  # counted and logged once per content, retried on the next change
    assert material.client_context() is first_client and material.generation == 0

    write_secret(secret, issued=issued, ca_pem=new_ca.cert_pem)  # the atomic ..data swap
    assert material.reload() is True
    assert reloads == [False, True] and rotations == [1]
    assert material.client_context() is not first_client
    assert material.server_context is first_server  # uvicorn keeps listening with it; sni_callback swaps


def test_kubernetes_members_are_https_when_the_nodes_serve_tls() -> None:
    urls = member_urls(
        statefulset="kv", replicas=1, service="kv-h", namespace="ns", domain="d", port=8443, scheme="https"
    )
    assert urls == {"kv-0": "https://kv-0.kv-h.ns.svc.d:8443"}
