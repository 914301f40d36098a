"""Settings: parsing, validation, environment defaults."""

from __future__ import annotations

import dataclasses

import pytest

from app.config import DEFAULT_LMDB_MAP_SIZE, NODE_OPTIONS, NodeConfig, env_default, parse_peers, parse_size
from app.errors import ConfigError


def test_peers_parse_and_self_is_added() -> None:
    config = NodeConfig.from_options(
        {"node_id": "n3", "listen": "127.0.0.1:8082", "peers": "n1=http://h:1, n2=http://h:2/"}
    )
    assert config.peers == {"n1": "http://h:1", "n2": "http://h:2", "n3": "http://127.0.0.1:8082"}
    assert config.advertise_url == "http://127.0.0.1:8082"


def test_self_url_comes_from_the_peer_list_when_named_there() -> None:
    config = NodeConfig.from_options({"node_id": "n1", "listen": "0.0.0.0:80", "peers": "n1=http://node-1.svc:80"})
    assert config.advertise_url == "http://node-1.svc:80" and config.host == "0.0.0.0"


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({}, "--node-id"),
        ({"node_id": "a,b"}, "may not contain"),
        ({"node_id": "n", "listen": "nowhere"}, "HOST:PORT"),
        ({"node_id": "n", "listen": "h:70000"}, "HOST:PORT"),
        ({"node_id": "n", "peers": "n2"}, "ID=http"),
        ({"node_id": "n", "peers": "n2=ftp://x"}, "ID=http"),
        ({"node_id": "n", "peers": "a=http://x:1,a=http://y:2"}, "twice"),
        ({"node_id": "n", "vnodes": "0"}, "positive"),
        ({"node_id": "n", "vnodes": "many"}, "number"),
        ({"node_id": "n", "storage": "floppy"}, "--storage"),
        ({"node_id": "n", "fsync": "sometimes"}, "--fsync"),
        ({"node_id": "n", "storage": "lmdb"}, "--data-dir"),
        ({"node_id": "n", "map_size": "lots"}, "--map-size"),
        ({"node_id": "n", "map_size": "10Xi"}, "--map-size"),
        ({"node_id": "n", "map_size": "1Ki"}, "at least"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_message(values: dict[str, str | None], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        NodeConfig.from_options(values)


def test_every_option_reads_its_kvstore_env_var() -> None:
    envs = {option.env for option in NODE_OPTIONS}
    assert "KVSTORE_NODE_ID" in envs and "KVSTORE_PEERS" in envs and "KVSTORE_VNODES" in envs
    option = next(o for o in NODE_OPTIONS if o.flag == "--vnodes")
    assert env_default(option, {"KVSTORE_VNODES": "64"}) == "64"
    assert env_default(option, {}) == option.default


def test_empty_peer_entries_are_ignored() -> None:
    assert parse_peers(" , a=http://x:1 ,") == {"a": "http://x:1"}


@pytest.mark.parametrize(
    ("raw", "size"),
    [("1048576", 1 << 20), ("10Gi", 10 << 30), ("512Mi", 512 << 20), ("2G", 2 * 10**9), ("100k", 10**5)],
)
def test_map_size_takes_bytes_or_a_kubernetes_quantity(raw: str, size: int) -> None:
    assert parse_size(raw) == size
    assert NodeConfig.from_options({"node_id": "n", "map_size": raw}).map_size == size


def test_map_size_defaults_to_the_lmdb_default() -> None:
    assert NodeConfig.from_options({"node_id": "n"}).map_size == DEFAULT_LMDB_MAP_SIZE


def test_each_direct_option_parses_its_default_into_nodeconfigs_default() -> None:
    """A default is stated once, in its named constant: the flag's default text
    parses to the dataclass's default, so a config built in code and one built
    from flags agree."""
    fields = {f.name: f for f in dataclasses.fields(NodeConfig)}
    direct = [option for option in NODE_OPTIONS if option.direct]
    assert len(direct) >= 15
    for option in direct:
        assert fields[option.dest].default == option.value({}), option.flag
    assert NodeConfig.from_options({"node_id": "n"}) == NodeConfig(
        node_id="n",
        host="127.0.0.1",
        port=8080,
        advertise_url="http://127.0.0.1:8080",
        peers={"n": "http://127.0.0.1:8080"},
    )
