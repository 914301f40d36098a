"""Access control's model (app.access) and its edge (app.web.access): the
users file's validation, prefix grants, token lookup, reloads that keep the
last good rules, rate-limited denial logs, and the settings that refuse to
start."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from app.access import EVERYONE, AuthFile, Permission, load_rules, new_token, parse_rules
from app.cli import main
from app.config import NodeConfig
from app.errors import ConfigError
from app.web.access import DENIAL_LOG_BURST, DenialLog

ALICE_TOKEN, ALICE_SHA = "alice-token", hashlib.sha256(b"alice-token").hexdigest()
OPS_TOKEN, OPS_SHA = "ops-token", hashlib.sha256(b"ops-token").hexdigest()

EXAMPLE = f"""
users:
  alice: {{token_sha256: "{ALICE_SHA}", roles: [app-rw]}}
  reporting: {{cert_cn: "reporting", roles: [app-ro]}}
  ops: {{token_sha256: "{OPS_SHA}", cert_cn: "ops.example", roles: [admin]}}
  carol: {{cert_cn: "carol", roles: [app-ro, team-w]}}
roles:
  app-rw: [{{prefix: "app/", permissions: [read, write]}}]
  app-ro: [{{prefix: "app/", permissions: [read]}}]
  team-w: [{{prefix: "app/team/", permissions: [write]}}]
  admin: [{{prefix: "", permissions: [read, write, admin]}}]
"""


def test_the_issue_example_parses_and_each_user_gets_their_roles_grants() -> None:
    rules = parse_rules(EXAMPLE)
    alice = rules.user_for_token(ALICE_TOKEN.encode())
    assert alice is not None and alice.name == "alice" and alice.roles == ("app-rw",)
    ops = rules.user_for_token(OPS_TOKEN.encode())
    assert ops is not None and ops is rules.user_for_certificate(("ops.example",))
    assert ops.allows_everywhere(Permission.ADMIN)
    assert not alice.allows_everywhere(Permission.ADMIN)
    assert rules.user_count == 4


def test_json_is_accepted_too() -> None:
    doc = {
        "users": {"alice": {"token_sha256": ALICE_SHA, "roles": ["rw"]}},
        "roles": {"rw": [{"prefix": "app/", "permissions": ["read", "write"]}]},
    }
    user = parse_rules(json.dumps(doc)).user_for_token(ALICE_TOKEN.encode())
    assert user is not None and user.allows(Permission.WRITE, b"app/x")


@pytest.mark.parametrize(
    ("who", "permission", "key", "allowed"),
    [
        ("alice", Permission.READ, b"app/x", True),
        ("alice", Permission.WRITE, b"app/x", True),
        ("alice", Permission.READ, b"app/", True),  # a key equal to the prefix is under it
        ("alice", Permission.READ, b"app", False),  # shorter than the prefix: not under it
        ("alice", Permission.READ, b"app2/x", False),  # a bordering prefix is another prefix
        ("alice", Permission.READ, b"App/x", False),  # bytes: case matters
        ("alice", Permission.ADMIN, b"app/x", False),
        ("reporting", Permission.READ, b"app/x", True),
        ("reporting", Permission.WRITE, b"app/x", False),
        ("carol", Permission.WRITE, b"app/team/x", True),  # nested: the inner grant adds write
        ("carol", Permission.READ, b"app/team/x", True),  # ... and the outer one still gives read
        ("carol", Permission.WRITE, b"app/x", False),
        ("carol", Permission.WRITE, b"app/teamx", False),
        ("ops", Permission.WRITE, b"anything", True),
        ("ops", Permission.READ, "ключ/ü".encode(), True),
    ],
)
def test_a_grant_covers_exactly_the_keys_starting_with_its_prefix(
    who: str, permission: Permission, key: bytes, allowed: bool
) -> None:
    rules = parse_rules(EXAMPLE)
    user = {
        "alice": rules.user_for_token(ALICE_TOKEN.encode()),
        "ops": rules.user_for_token(OPS_TOKEN.encode()),
        "reporting": rules.user_for_certificate(("reporting",)),
        "carol": rules.user_for_certificate(("carol",)),
    }[who]
    assert user is not None
    assert user.allows(permission, key) is allowed


def test_unknown_tokens_and_names_find_nobody() -> None:
    rules = parse_rules(EXAMPLE)
    assert rules.user_for_token(b"") is None
    assert rules.user_for_token(b"alice-token ") is None
    assert rules.user_for_token(ALICE_SHA.encode()) is None  # the hash is not the token
    assert rules.user_for_certificate(("nobody", "also-nobody")) is None
    assert rules.user_for_certificate(("nobody", "reporting")) is not None  # any of the names (SANs) counts


def test_everyone_is_allowed_everything_when_access_control_is_off() -> None:
    for permission in Permission:
        assert EVERYONE.allows(permission, b"any/key") and EVERYONE.allows_everywhere(permission)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("users: [", "does not parse"),
        ("- a list", "mapping"),
        ("roles: {}", "at least one user"),
        (f'users: {{a: {{token_sha256: "{ALICE_SHA}", roles: [nope]}}}}', "not defined under `roles`: nope"),
        ('users: {a: {token_sha256: "abc", roles: []}}', "64 hex digits"),
        ("users: {a: {roles: []}}", "token_sha256, cert_cn or both"),
        (f'users: {{a: {{token_sha256: "{ALICE_SHA}", rolez: []}}}}', "unknown fields rolez"),
        (
            f'users: {{a: {{token_sha256: "{ALICE_SHA}"}}, b: {{token_sha256: "{ALICE_SHA}"}}}}',
            "same token as user 'a'",
        ),
        ('users: {a: {cert_cn: "x"}, b: {cert_cn: "x"}}', "same cert_cn"),
        (
            f'users: {{a: {{token_sha256: "{ALICE_SHA}", roles: [r]}}}}\nroles: {{r: [{{prefix: "app/", '
            "permissions: [admin]}]}",
            "admin is granted over every key only",
        ),
        (
            f'users: {{a: {{token_sha256: "{ALICE_SHA}", roles: [r]}}}}\nroles: {{r: [{{prefix: "", '
            "permissions: [delete]}]}",
            "read, write and admin",
        ),
        (
            f'users: {{a: {{token_sha256: "{ALICE_SHA}", roles: [r]}}}}\nroles: {{r: [{{prefix: 5, '
            "permissions: [read]}]}",
            "prefix must be a string",
        ),
        (
            f'users: {{a: {{token_sha256: "{ALICE_SHA}", roles: [r]}}}}\nroles: {{r: [{{prefix: "", '
            "permissions: []}]}",
            "non-empty list",
        ),
        ("users: {a: {cert_cn: x}}\nextra: 1", "unknown fields extra"),
    ],
)
def test_an_invalid_file_is_refused_saying_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_rules(text)
    assert words in str(caught.value), str(caught.value)


def test_load_rules_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    path.write_text("users: [")
    with pytest.raises(ConfigError, match=f"auth: the users file {path} is invalid: it does not parse"):
        load_rules(str(path))
    with pytest.raises(ConfigError, match=f"cannot read the users file {tmp_path / 'missing.yaml'}"):
        load_rules(str(tmp_path / "missing.yaml"))


def test_a_reload_swaps_good_rules_in_and_keeps_the_old_ones_when_the_new_file_is_bad(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    path.write_text(EXAMPLE)
    results: list[bool] = []
    auth_file = AuthFile(str(path), on_reload=results.append)
    assert auth_file.reload() is False and results == []  # unchanged: nothing happens

    path.write_text("users: {")  # garbled: refused, counted once, old rules stay
    assert auth_file.reload() is False and auth_file.reload() is False
    assert results == [False]
    assert auth_file.rules.user_for_token(ALICE_TOKEN.encode()) is not None

    without_alice = EXAMPLE.replace(f'  alice: {{token_sha256: "{ALICE_SHA}", roles: [app-rw]}}\n', "")
    path.write_text(without_alice)
    assert auth_file.reload() is True and results == [False, True]
    assert auth_file.rules.user_for_token(ALICE_TOKEN.encode()) is None
    assert auth_file.rules.user_for_token(OPS_TOKEN.encode()) is not None

    path.unlink()  # a missing file is a bad file: the rules stay
    assert auth_file.reload() is False and results == [False, True, False]
    assert auth_file.rules.user_for_token(OPS_TOKEN.encode()) is not None


def test_new_tokens_are_random_256_bit_and_come_with_their_hash() -> None:
    first, first_sha = new_token()
    second, _ = new_token()
    assert first != second
    assert len(first) >= 43  # 32 random bytes, URL-safe base64: at least 128 bits as the issue asks
    assert hashlib.sha256(first.encode()).hexdigest() == first_sha


def test_denials_are_logged_in_bursts_then_at_a_rate_with_a_count_of_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    denials = DenialLog(clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="app.web.access"):
        for i in range(DENIAL_LOG_BURST + 5):
            denials.record(f"denied {i}")
        assert len(caplog.records) == DENIAL_LOG_BURST
        assert denials.suppressed == 5
        now[0] += 1.0
        denials.record("denied later")
    assert caplog.records[-1].getMessage() == "denied later (5 more denials not logged)"
    assert denials.suppressed == 0


def test_auth_without_a_guard_on_internal_routes_refuses_to_start() -> None:
    base: dict[str, str | None] = {"node_id": "n1", "auth_file": "/x/users.yaml"}
    with pytest.raises(ConfigError, match=r"/internal/.*would stay open"):
        NodeConfig.from_options(base)
    assert NodeConfig.from_options(base | {"cluster_token": "t"}).auth_file == "/x/users.yaml"


def test_the_ops_listener_needs_a_port_of_its_own() -> None:
    with pytest.raises(ConfigError, match="port of its own"):
        NodeConfig.from_options({"node_id": "n1", "listen": "127.0.0.1:8080", "ops_listen": "0.0.0.0:8080"})
    with pytest.raises(ConfigError, match="--ops-listen must be HOST:PORT"):
        NodeConfig.from_options({"node_id": "n1", "ops_listen": "9090"})
    config = NodeConfig.from_options({"node_id": "n1", "ops_listen": "0.0.0.0:9090"})
    assert config.ops_listen == ("0.0.0.0", 9090)


def test_a_node_with_an_invalid_users_file_stops_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "users.yaml"
    path.write_text('users: {a: {token_sha256: "short"}}')
    code = main(["node", "--node-id", "n1", "--cluster-token", "t", "--auth-file", str(path)])
    assert code == 2
    error = capsys.readouterr().err
    assert str(path) in error and "64 hex digits" in error


def test_auth_new_token_prints_a_token_and_its_hash(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["auth", "new-token"]) == 0
    lines = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines())
    token, digest = lines["token"].strip(), lines["token_sha256"].strip()
    assert hashlib.sha256(token.encode()).hexdigest() == digest
