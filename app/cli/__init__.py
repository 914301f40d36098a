"""The `kvstore` command: run a node, run a local cluster, or talk to one.
The parser and the client commands live here; a node is served by
app.web.server, a local cluster by app.local_cluster.

    kvstore node --node-id ID --listen HOST:PORT --peers ID=URL,...   one node
    kvstore cluster --nodes 3 --base-port 8080                         three local nodes on 8080-8082
    kvstore put KEY VALUE | get KEY | delete KEY | ring [--url URL]    a client
    kvstore backup --url URL -o FILE | -;  kvstore restore --url URL FILE | -
    kvstore auth new-token                                             a token and its SHA-256

Every node flag also reads KVSTORE_<FLAG> from the environment (app.config).
Every client command takes --url, --token, --cacert, --cert and --key (env
KVSTORE_URL, KVSTORE_TOKEN, KVSTORE_CACERT, KVSTORE_CERT, KVSTORE_KEY) through
one helper, add_client_options() with open_client(), which makes the client
library's Client (kvstore_client, in client/): the CLI has no HTTP code of its own.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from app import local_cluster
from app.config import (
    DEFAULT_CLIENT_URL,
    DEFAULT_CLUSTER_BASE_PORT,
    DEFAULT_CLUSTER_NODES,
    NODE_OPTIONS,
    NodeConfig,
    env_default,
)
from app.errors import ConfigError, KvstoreError

if TYPE_CHECKING:
    import kvstore_client  # imported for real only by the client commands: a node never loads it


CLIENT_TIMEOUT_S = 10.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore", description="A distributed key-value store.")
    sub = parser.add_subparsers(dest="command", required=True)

    node = sub.add_parser("node", help="run one node")
    for option in NODE_OPTIONS:
        help_text = f"{option.help} [env {option.env}]"
        if option.repeatable:
            node.add_argument(option.flag, dest=option.dest, action="append", default=None, help=help_text)
        elif option.switch:
            node.add_argument(
                option.flag, dest=option.dest, nargs="?", const="true", default=env_default(option), help=help_text
            )
        else:
            node.add_argument(option.flag, dest=option.dest, default=env_default(option), help=help_text)

    cluster = sub.add_parser("cluster", help="run a local cluster, one process per node")
    cluster.add_argument("--nodes", type=int, default=DEFAULT_CLUSTER_NODES, help="how many nodes")
    cluster.add_argument(
        "--base-port", type=int, default=DEFAULT_CLUSTER_BASE_PORT, help="first node's port; the rest follow"
    )
    cluster.add_argument("--host", default="127.0.0.1", help="address every node listens on")
    cluster.add_argument("--data-dir", default=None, help="keep data durably under DIR/<node-id>")
    cluster.add_argument("--replication-factor", default=None, help="copies of each key")

    for name, help_text in (("get", "read a key"), ("delete", "delete a key")):
        client = sub.add_parser(name, help=help_text)
        client.add_argument("key")
        add_client_options(client)
    put = sub.add_parser("put", help="write a key")
    put.add_argument("key")
    put.add_argument("value")
    put.add_argument("--ttl", type=float, default=None, help="seconds until the key expires")
    add_client_options(put)
    ring = sub.add_parser("ring", help="show the ring: members, reachability, shares")
    add_client_options(ring)
    backup = sub.add_parser("backup", help="stream a backup of the whole cluster into a file or stdout")
    backup.add_argument("target", nargs="?", default=None, help="`-`: write to stdout (same as -o -)")
    backup.add_argument("-o", "--output", default=None, help="the file to write (`-`: stdout)")
    backup.add_argument("--compression", default="zstd", choices=("zstd", "none"), help="how chunks are compressed")
    backup.add_argument(
        "--pace",
        type=float,
        default=None,
        help="share of time the backup works, 0-1 (server default 0.3; 1: full speed)",
    )
    restore = sub.add_parser("restore", help="write a backup's records into a cluster; newer versions win")
    restore.add_argument("file", help="the backup file (`-`: stdin)")
    for command in (backup, restore):
        # They took the cluster token before access control; without --auth-file it still opens admin routes.
        add_client_options(command, token_env=("KVSTORE_TOKEN", "KVSTORE_CLUSTER_TOKEN"))
    auth = sub.add_parser("auth", help="access control helpers")
    auth_sub = auth.add_subparsers(dest="auth_command", required=True)
    auth_sub.add_parser("new-token", help="print a fresh random token and the SHA-256 a users file stores")
    return parser


def add_client_options(parser: argparse.ArgumentParser, *, token_env: tuple[str, ...] = ("KVSTORE_TOKEN",)) -> None:
    """--url, --token and the TLS options every client command takes (each with its env var)."""
    parser.add_argument(
        "--url", default=os.environ.get("KVSTORE_URL", DEFAULT_CLIENT_URL), help="a node's URL [env KVSTORE_URL]"
    )
    parser.add_argument(
        "--token",
        default=next((os.environ[name] for name in token_env if os.environ.get(name)), None),
        help="bearer token of a user in the nodes' --auth-file (admin routes without one: the cluster token) "
        f"[env {' or '.join(token_env)}]",
    )
    parser.add_argument(
        "--cacert",
        default=os.environ.get("KVSTORE_CACERT"),
        help="PEM CA bundle that verifies an https node (default: the system CAs) [env KVSTORE_CACERT]",
    )
    parser.add_argument(
        "--cert",
        default=os.environ.get("KVSTORE_CERT"),
        help="PEM client certificate, for nodes run with --client-cert-auth [env KVSTORE_CERT]",
    )
    parser.add_argument(
        "--key",
        dest="client_key",  # `key` is the commands' positional KEY
        default=os.environ.get("KVSTORE_KEY"),
        help="PEM private key of --cert [env KVSTORE_KEY]",
    )


def open_client(args: argparse.Namespace, *, timeout: float = CLIENT_TIMEOUT_S) -> kvstore_client.Client:
    """The client of a client command (kvstore_client), from add_client_options()'s options.

    Not ring-aware: a command is one or two calls to the node it names, and
    fetching the ring first would double them; behind a port-forward the
    members' own URLs may not even be reachable from here."""
    from app.transport.tls import client_context
    from kvstore_client import Client

    if args.client_key and not args.cert:
        raise ConfigError("config: --key needs --cert")
    try:
        verify = client_context(cafile=args.cacert, certfile=args.cert, keyfile=args.client_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"config: cannot load --cacert/--cert/--key: {exc}") from exc
    return Client([args.url], token=args.token or None, ca=verify, timeout=timeout, ring_aware=False)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "node":
            return run_node(args)
        if args.command == "cluster":
            return run_cluster(args)
        if args.command == "auth":
            return run_auth(args)
        return run_client(args)
    except ConfigError as exc:
        print(f"kvstore: {exc}", file=sys.stderr)
        return 2
    except KvstoreError as exc:
        print(f"kvstore: {exc}", file=sys.stderr)
        return 1


# -- node ---------------------------------------------------------------------


def run_node(args: argparse.Namespace) -> int:
    from app.web.server import serve  # the web stack loads only for `kvstore node`

    values = {option.dest: getattr(args, option.dest) for option in NODE_OPTIONS}
    for option in NODE_OPTIONS:
        if option.repeatable:  # flags given: they win; else the env var's comma-separated list
            given = values[option.dest]
            values[option.dest] = ",".join(given) if given else env_default(option)
    return serve(NodeConfig.from_options(values))


# -- cluster ------------------------------------------------------------------


def run_cluster(args: argparse.Namespace) -> int:
    return local_cluster.run(
        nodes=args.nodes,
        base_port=args.base_port,
        host=args.host,
        data_dir=args.data_dir,
        replication_factor=args.replication_factor,
    )


# -- auth ---------------------------------------------------------------------


def run_auth(args: argparse.Namespace) -> int:
    from app.access import new_token

    token, digest = new_token()
    print(f"token:        {token}")
    print(f"token_sha256: {digest}")
    print("(give the token to its user; put token_sha256 in the --auth-file under that user)", file=sys.stderr)
    return 0


# -- client -------------------------------------------------------------------


def run_client(args: argparse.Namespace) -> int:
    import kvstore_client

    try:
        with open_client(args) as kv:
            if args.command in ("backup", "restore"):
                from app.cli import backup as cli_backup

                return cli_backup.run(kv, args)
            if args.command == "get":
                value = kv.get(args.key)
                if value is None:
                    print("kvstore: 404: key not found", file=sys.stderr)
                    return 1
                sys.stdout.buffer.write(value + b"\n")
            elif args.command == "put":
                version = kv.put(args.key, args.value.encode(), ttl=args.ttl or None)
                print(f"OK {version}".rstrip())
            elif args.command == "delete":
                kv.delete(args.key)
                print("OK")
            else:
                print(format_ring(kv.ring()))
            return 0
    except kvstore_client.KvstoreError as exc:
        print(f"kvstore: {error_text(exc)}", file=sys.stderr)
        return 1


def error_text(exc: kvstore_client.KvstoreError) -> str:
    """What the CLI says about a client error: `STATUS: the node's message` for
    an answer (as it always has), or where it could not reach."""
    if exc.status is not None:
        return f"{exc.status}: {exc.message}"
    return str(exc)


def format_ring(ring: dict[str, Any]) -> str:
    """The ring as a table. A 0.1.0 node's /ring has no versions: they show as "?"."""
    rows = [("NODE", "URL", "VERSION", "REACHABLE", "SHARE", "REPLICA SHARE")]
    for member in ring["members"]:
        name = member["node_id"] + (" (self)" if member["self"] else "")
        rows.append(
            (
                name,
                member["url"],
                member.get("version") or "?",
                "yes" if member["reachable"] else "NO",
                f"{member['share'] * 100:.1f}%",
                f"{member['replica_share'] * 100:.1f}%",
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    header = (
        f"ring of {ring['node_id']}: {len(rows) - 1} members, {ring['vnodes']} vnodes each, "
        f"replication factor {ring['replication_factor']}"
    )
    if "cluster" in ring:  # 0.2.0 on: the protocol the whole ring runs (README: Upgrade and rollback)
        header += f", cluster protocol {ring['cluster']['protocol']}"
    return "\n".join([header, *lines])
