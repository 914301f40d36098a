"""Access control's model: users, roles over key prefixes, and the users file.

A role is a list of grants; a grant gives permissions (read, write, admin)
over every key that starts with its prefix ("" is every key). A user has
roles, and is known by a bearer token (stored only as its SHA-256), by the
name on a verified client certificate (its CN or a SAN), or both.

`load_rules(path)` reads and validates a file (YAML or JSON) into an
immutable `AccessRules`; `AuthFile` re-reads it when it changes and keeps the
last good rules when a new version does not validate. The web layer
(app.web.access) authenticates requests and asks `User.allows`. Pure: imports
nothing from the rest of app but errors, and no network or web library.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from app.errors import ConfigError
from app.watched_files import WatchedFiles

log = logging.getLogger(__name__)

TOKEN_BYTES = 32  # `kvstore auth new-token`: 256 bits, twice the floor of 128
SHA256_HEX_LENGTH = 64


class Permission(StrEnum):
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"


@dataclass(frozen=True)
class Grant:
    """Permissions over every key starting with `prefix` (bytes, as keys are)."""

    prefix: bytes
    permissions: frozenset[Permission]


@dataclass(frozen=True)
class User:
    name: str
    grants: tuple[Grant, ...]
    roles: tuple[str, ...] = ()
    token_sha256: bytes | None = None

    def allows(self, permission: Permission, key: bytes) -> bool:
        """True when some grant gives `permission` over a prefix of `key`.
        A key equal to a prefix is under it; `app/` does not cover `app2/x`."""
        for grant in self.grants:  # noqa: SIM110 - a loop: any() over a generator costs more on every request
            if permission in grant.permissions and key.startswith(grant.prefix):
                return True
        return False

    def allows_everywhere(self, permission: Permission) -> bool:
        """The permission over every key: what admin routes (backup reads
        every key, a membership change moves them all) need."""
        return any(permission in grant.permissions and grant.prefix == b"" for grant in self.grants)


EVERYONE = User(
    name="anonymous",
    grants=(Grant(prefix=b"", permissions=frozenset(Permission)),),
)
"""Who every request is when access control is off: allowed everything."""


@dataclass(frozen=True)
class AccessRules:
    """The users of one validated users file, indexed by how they authenticate."""

    by_token_sha256: Mapping[bytes, User]
    by_cert_name: Mapping[str, User]

    def user_for_token(self, token: bytes) -> User | None:
        """The user whose token this is. Looked up by the token's SHA-256: a
        timing difference in the lookup can only tell a caller about the hash
        of their own guess, which they cannot steer toward a stored one; the
        final comparison is constant-time all the same."""
        digest = hashlib.sha256(token).digest()
        user = self.by_token_sha256.get(digest)
        if user is None or user.token_sha256 is None or not hmac.compare_digest(user.token_sha256, digest):
            return None
        return user

    def user_for_certificate(self, names: tuple[str, ...]) -> User | None:
        """The user mapped to any of a verified certificate's names (its CN, then its SANs)."""
        for name in names:
            user = self.by_cert_name.get(name)
            if user is not None:
                return user
        return None

    @property
    def user_count(self) -> int:
        return len({id(user) for user in (*self.by_token_sha256.values(), *self.by_cert_name.values())})


def new_token() -> tuple[str, str]:
    """A fresh random token and the hex SHA-256 to put in the users file."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    return token, hashlib.sha256(token.encode()).hexdigest()


# -- the users file -------------------------------------------------------------


def load_rules(path: str) -> AccessRules:
    """Read and validate a users file; ConfigError naming the file and the problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"auth: cannot read the users file {path}: {exc}") from None
    try:
        return parse_rules(text)
    except ConfigError as exc:
        raise ConfigError(f"auth: the users file {path} is invalid: {exc}") from None


def parse_rules(text: str) -> AccessRules:
    """The rules in a users file's text (YAML; JSON is YAML too)."""
    try:
        doc = yaml.safe_load(text) if not text.lstrip().startswith("{") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"it does not parse: {_one_line(exc)}") from None
    if not isinstance(doc, dict):
        raise ConfigError("it must be a mapping with `users` and `roles`")
    _only_keys(doc, {"users", "roles"}, "the top level")
    roles = _parse_roles(doc.get("roles") or {})
    raw_users = doc.get("users")
    if not isinstance(raw_users, dict) or not raw_users:
        raise ConfigError("`users` must map at least one user name to {token_sha256, cert_cn, roles}")
    by_token: dict[bytes, User] = {}
    by_cert: dict[str, User] = {}
    for name, spec in raw_users.items():
        where = f"user {name!r}"
        if not isinstance(name, str) or not name:
            raise ConfigError(f"user names must be non-empty strings, got {name!r}")
        if not isinstance(spec, dict):
            raise ConfigError(f"{where} must be a mapping with token_sha256, cert_cn and roles")
        _only_keys(spec, {"token_sha256", "cert_cn", "roles"}, where)
        role_names = spec.get("roles") or []
        if not isinstance(role_names, list) or not all(isinstance(r, str) for r in role_names):
            raise ConfigError(f"{where}: roles must be a list of role names")
        unknown = [r for r in role_names if r not in roles]
        if unknown:
            raise ConfigError(f"{where} has roles that are not defined under `roles`: {', '.join(unknown)}")
        token_sha256, cert_cn = spec.get("token_sha256"), spec.get("cert_cn")
        if token_sha256 is None and cert_cn is None:
            raise ConfigError(f"{where} needs token_sha256, cert_cn or both, or nobody can be them")
        digest = None if token_sha256 is None else _sha256_hex(token_sha256, where)
        user = User(
            name=name,
            grants=tuple(grant for role in role_names for grant in roles[role]),
            roles=tuple(role_names),
            token_sha256=digest,
        )
        if digest is not None:
            if digest in by_token:
                raise ConfigError(f"{where} has the same token as user {by_token[digest].name!r}")
            by_token[digest] = user
        if cert_cn is not None:
            if not isinstance(cert_cn, str) or not cert_cn:
                raise ConfigError(f"{where}: cert_cn must be a non-empty string")
            if cert_cn in by_cert:
                raise ConfigError(f"{where} has the same cert_cn as user {by_cert[cert_cn].name!r}")
            by_cert[cert_cn] = user
    return AccessRules(by_token_sha256=by_token, by_cert_name=by_cert)


def _parse_roles(raw: object) -> dict[str, tuple[Grant, ...]]:
    if not isinstance(raw, dict):
        raise ConfigError("`roles` must map role names to lists of grants")
    roles: dict[str, tuple[Grant, ...]] = {}
    for name, grants in raw.items():
        where = f"role {name!r}"
        if not isinstance(grants, list):
            raise ConfigError(f"{where} must be a list of grants: [{{prefix: ..., permissions: [...]}}]")
        parsed = []
        for index, grant in enumerate(grants):
            at = f"{where}, grant {index + 1}"
            if not isinstance(grant, dict):
                raise ConfigError(f"{at} must be a mapping: {{prefix: ..., permissions: [...]}}")
            _only_keys(grant, {"prefix", "permissions"}, at)
            prefix, permissions = grant.get("prefix"), grant.get("permissions")
            if not isinstance(prefix, str):
                raise ConfigError(f'{at}: prefix must be a string ("" for every key)')
            if not isinstance(permissions, list) or not permissions:
                raise ConfigError(f"{at}: permissions must be a non-empty list of read, write, admin")
            try:
                granted = frozenset(Permission(p) for p in permissions)
            except ValueError:
                raise ConfigError(f"{at}: permissions are read, write and admin, got {permissions!r}") from None
            if Permission.ADMIN in granted and prefix:
                raise ConfigError(
                    f'{at}: admin is granted over every key only (prefix ""): backup reads every key '
                    "and a membership change moves them all"
                )
            parsed.append(Grant(prefix=prefix.encode("utf-8"), permissions=granted))
        roles[str(name)] = tuple(parsed)
    return roles


def _sha256_hex(raw: object, where: str) -> bytes:
    text = raw.strip().lower() if isinstance(raw, str) else ""
    if len(text) != SHA256_HEX_LENGTH or any(c not in "0123456789abcdef" for c in text):
        raise ConfigError(
            f"{where}: token_sha256 must be 64 hex digits (the SHA-256 of the token; "
            "`kvstore auth new-token` prints both)"
        )
    return bytes.fromhex(text)


def _only_keys(mapping: dict[Any, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(str(key) for key in mapping if key not in allowed)
    if unknown:
        raise ConfigError(f"{where} has unknown fields {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


class AuthFile:
    """The users file and its current rules, re-read when its bytes change.

    The same discipline as the TLS files (app.watched_files): a file that
    does not load is refused, logged once per content and reported to
    `on_reload(False)`; the last good rules stay in force. At start a bad
    file is a ConfigError: the node does not serve with rules it cannot read.
    """

    def __init__(self, path: str, *, on_reload: Callable[[bool], None] | None = None) -> None:
        self.path = path
        self._on_reload = on_reload or (lambda ok: None)
        self._files = WatchedFiles([path])
        self.rules = load_rules(path)

    def reload(self) -> bool:
        """Swap in the file's rules if its bytes changed and they validate;
        True when a swap happened."""
        fingerprint = self._files.changed()
        if fingerprint is None:
            return False
        try:
            rules = load_rules(self.path)
        except ConfigError as exc:
            if self._files.refused(fingerprint):
                log.warning("%s; keeping the previous rules", exc)
                self._on_reload(False)
            return False
        self.rules = rules
        self._files.accepted(fingerprint)
        log.warning("auth: reloaded %s: %d users", self.path, rules.user_count)
        self._on_reload(True)
        return True
