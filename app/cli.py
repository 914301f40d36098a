"""The `kvstore` command: run a node, run a local cluster, or talk to one.

    kvstore node --node-id ID --listen HOST:PORT --peers ID=URL,...   one node
    kvstore cluster --nodes 3 --base-port 8080                         three local nodes on 8080-8082
    kvstore put KEY VALUE | get KEY | delete KEY | ring [--url URL]    a client
    kvstore backup --url URL -o FILE | -;  kvstore restore --url URL FILE | -
    kvstore auth new-token                                             a token and its SHA-256

Every node flag also reads KVSTORE_<FLAG> from the environment (app.config).
Every client command takes --url, --token, --cacert, --cert and --key (env
KVSTORE_URL, KVSTORE_TOKEN, KVSTORE_CACERT, KVSTORE_CERT, KVSTORE_KEY) through
one helper, add_client_options() with open_client().
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from app.config import (
    CLUSTER_READY_WAIT_S,
    DEFAULT_CLIENT_URL,
    DEFAULT_CLUSTER_BASE_PORT,
    DEFAULT_CLUSTER_NODES,
    GC_THRESHOLDS,
    NODE_OPTIONS,
    NodeConfig,
    env_default,
)
from app.errors import ConfigError, KvstoreError
from app.metrics import NodeMetrics

if TYPE_CHECKING:
    import asyncio

    import httpx  # imported for real only by the client commands: a node never loads it
    import uvicorn

    from app.transport.tls import TlsMaterial

CLUSTER_STOP_GRACE_S = 5.0  # how long `kvstore cluster` waits for nodes to exit before SIGKILL
CLIENT_TIMEOUT_S = 10.0
PR_SET_PDEATHSIG = 1  # linux prctl: signal the child when its parent dies
ROTATION_GRACE_S = 1.0  # after a TLS rotation, how long an idle connection may still send its next request


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


def open_client(args: argparse.Namespace, *, timeout: float = CLIENT_TIMEOUT_S) -> httpx.Client:
    """The HTTP client of a client command, from add_client_options()'s options."""
    import httpx

    from app.transport.tls import client_context

    if args.client_key and not args.cert:
        raise ConfigError("config: --key needs --cert")
    try:
        verify = client_context(cafile=args.cacert, certfile=args.cert, keyfile=args.client_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"config: cannot load --cacert/--cert/--key: {exc}") from exc
    headers = {"authorization": f"Bearer {args.token}"} if args.token else None
    return httpx.Client(base_url=args.url.rstrip("/"), timeout=timeout, verify=verify, headers=headers)


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
    import uvicorn

    from app.web.app import create_app

    values = {option.dest: getattr(args, option.dest) for option in NODE_OPTIONS}
    for option in NODE_OPTIONS:
        if option.repeatable:  # flags given: they win; else the env var's comma-separated list
            given = values[option.dest]
            values[option.dest] = ",".join(given) if given else env_default(option)
    config = NodeConfig.from_options(values)
    logging.basicConfig(
        level=config.log_level.upper(), format=f"%(asctime)s {config.node_id} %(levelname)s %(name)s: %(message)s"
    )
    metrics = NodeMetrics()
    tls = None
    if config.tls is not None:
        from app.transport.tls import TlsMaterial

        tls = TlsMaterial(config.tls, on_handshake=metrics.count_tls_handshake, on_reload=metrics.count_tls_reload)
    app = create_app(config, metrics=metrics, tls=tls)
    ops_socket = _bind_ops_listener(config)  # before anything starts: a taken port is a config error
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            loop="uvloop",
            http="httptools" if tls is None else _tls_protocol(tls),
            # uvicorn listens with our context: its sni_callback swaps in rotated certificates.
            ssl_context_factory=None if tls is None else (lambda _config, _default: tls.server_context),
            workers=1,  # the store lives in the process: exactly one worker
            lifespan="on",
            access_log=False,
            log_level=config.log_level,
            timeout_graceful_shutdown=3,
            server_header=False,
            proxy_headers=False,  # nothing reads the client address; saves a middleware per request
        )
    )
    # The memory engine keeps every record as Python objects, and each request
    # allocates more: with default thresholds, full collections walk the whole
    # store and put 40-60 ms into PUT p99. Freezing what start-up built and
    # collecting the young generation less often cut p99 to ~7 ms (BENCHMARKS.md).
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    if ops_socket is None:
        server.run()
    else:
        import asyncio

        from app.web.ops import OpsPlane

        ops = _ops_server(OpsPlane(slot=app.slot, metrics=metrics), log_level=config.log_level)
        with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
            runner.run(_serve_with_ops(server, ops, ops_socket))
    return 0 if server.started else 1


def _ops_server(app: Any, *, log_level: str) -> uvicorn.Server:
    """A uvicorn server for the ops listener that leaves signals to the node's
    server (uvicorn's own restores and re-raises them; two would race)."""
    import uvicorn

    class OpsServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return OpsServer(
        uvicorn.Config(
            app,
            http="httptools",
            lifespan="off",
            access_log=False,
            log_level=log_level,
            server_header=False,
            proxy_headers=False,
        )
    )


def _bind_ops_listener(config: NodeConfig) -> socket.socket | None:
    """The --ops-listen socket, bound and listening, or None without the flag."""
    if config.ops_listen is None:
        return None
    host, port = config.ops_listen
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        raise ConfigError(f"config: cannot listen on --ops-listen {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


async def _serve_with_ops(server: uvicorn.Server, ops: uvicorn.Server, ops_socket: socket.socket) -> None:
    """The node's server and the ops listener in one loop. The ops listener
    starts first, so probes get /health (and /ready's 503) while the node
    opens; it stops once the node's server has shut down."""
    import asyncio

    ops_task = asyncio.create_task(ops.serve(sockets=[ops_socket]))
    try:
        await server.serve()
    finally:
        ops.should_exit = True
        await ops_task


def _tls_protocol(tls: TlsMaterial) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, over TLS, with two additions.

    It tells the app what client certificate the connection presented, in
    the ASGI TLS extension (scope["extensions"]["tls"]): under --peer-tls,
    internal routes need one (app.web.asgi.check_peer_certificate). The
    handshake has verified it against the CA before connection_made runs, so
    it is read once per connection, not per request.

    And it ends the connections accepted before a certificate rotation, so a
    certificate or CA that was withdrawn stops being trusted within one
    request, not at the client's leisure: each answers the request it is
    serving or the next one to arrive, then closes; one that sends nothing
    within ROTATION_GRACE_S is closed then. Not at once when idle (uvicorn's
    own shutdown): a connection just accepted is idle until its first request
    is parsed, so closing it dropped a request already sent (seen in CI, as
    "Server disconnected without sending a response").
    """
    import weakref

    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from app.web.access import CERT_NAMES

    class TlsHttpToolsProtocol(HttpToolsProtocol):
        tls_extension: dict[object, object]  # set in connection_made, before any request
        retiring = False  # a rotation happened since it was accepted: close after the next response

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn's own
            super().connection_made(transport)
            open_connections.add(self)
            ssl_object = transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            names = _certificate_names(ssl_object.getpeercert()) if der else ()
            self.tls_extension = {
                "server_cert": None,
                "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
                "client_cert_name": None,
                "client_cert_error": None,
                "tls_version": None,
                "cipher_suite": None,
                CERT_NAMES: names,  # what --auth-file's cert_cn is matched against (app.web.access)
            }

        def connection_lost(self, exc: Exception | None) -> None:
            open_connections.discard(self)
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.scope["extensions"] = {"tls": self.tls_extension}  # the ASGI TLS extension

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            if self.retiring and self.cycle is not None:
                self.cycle.keep_alive = False  # answer this request, then close

        def retire(self) -> None:
            self.retiring = True
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.keep_alive = False
            else:
                self.loop.call_later(ROTATION_GRACE_S, self.shutdown)  # closes it if still idle then

    open_connections: weakref.WeakSet[TlsHttpToolsProtocol] = weakref.WeakSet()

    def end_connections_of_old_certificates() -> None:
        for connection in list(open_connections):
            connection.retire()

    tls.on_rotate(end_connections_of_old_certificates)
    return TlsHttpToolsProtocol


def _certificate_names(cert: dict[str, Any] | None) -> tuple[str, ...]:
    """A verified certificate's subject CN, then its SANs (DNS, URI, email, IP),
    from ssl's decoded form: the names a users file's cert_cn can match."""
    if not cert:
        return ()
    names = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    names += [value for _kind, value in cert.get("subjectAltName", ())]
    return tuple(dict.fromkeys(names))


# -- cluster ------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if `kvstore cluster` itself dies,
    so even a SIGKILLed parent leaves no orphan node behind."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def cluster_node_args(*, node_id: str, listen: str, peers: dict[str, str]) -> list[str]:
    """The `kvstore node` flags of one cluster member; the test and bench harness
    (tests/harness/processes.py) starts its nodes with the same."""
    return ["--node-id", node_id, "--listen", listen, "--peers", ",".join(f"{nid}={url}" for nid, url in peers.items())]


def run_cluster(args: argparse.Namespace) -> int:
    if not 1 <= args.nodes <= 64:
        raise ConfigError("config: --nodes must be between 1 and 64")
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    procs: list[subprocess.Popen[bytes]] = []
    peers = {f"node{i + 1}": f"http://{args.host}:{args.base_port + i}" for i in range(args.nodes)}
    try:
        for index, node_id in enumerate(peers):
            node_args = cluster_node_args(node_id=node_id, listen=f"{args.host}:{args.base_port + index}", peers=peers)
            if args.data_dir:
                node_args += ["--data-dir", os.path.join(args.data_dir, node_id)]
            if args.replication_factor:
                node_args += ["--replication-factor", str(args.replication_factor)]
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "app", "node", *node_args],
                    preexec_fn=_die_with_parent,
                    # Own session: a terminal's Ctrl-C reaches only us, and we stop
                    # the nodes in order instead of racing them.
                    start_new_session=True,
                )
            )
            print(f"kvstore: started {node_args[1]} on http://{node_args[3]} (pid {procs[-1].pid})", flush=True)
        if wait_until_ready(list(peers.values()), procs=procs, stopping=lambda: stopping):
            print("kvstore: cluster running, every node ready; Ctrl-C stops it", flush=True)
        elif not stopping:
            print(
                f"kvstore: cluster running, but not every node was ready within {CLUSTER_READY_WAIT_S:.0f} s "
                "(see GET /ready on each); Ctrl-C stops it",
                flush=True,
            )
        while not stopping:
            if any(proc.poll() is not None for proc in procs):
                dead = [p.pid for p in procs if p.returncode is not None]
                print(f"kvstore: node process(es) {dead} exited; stopping the cluster", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    finally:
        stop_all(procs)
        print("kvstore: cluster stopped", flush=True)


def wait_until_ready(
    urls: Sequence[str],
    *,
    procs: Sequence[subprocess.Popen[bytes]],
    stopping: Callable[[], bool] = lambda: False,
    timeout: float = CLUSTER_READY_WAIT_S,
    path: str = "/ready",
    ssl_context: ssl.SSLContext | None = None,
) -> bool:
    """Poll each node's /ready: a fresh cluster's nodes first pull their
        ranges from each other, and until then quorum reads may get 503. Saying
        "running" only after that keeps the README's curl walkthrough from racing it.
        False when time runs out, `stopping()` turns true, or a process in
        `procs` exits. The test and bench harness waits with this too (with
    `ssl_context` for https nodes)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    pending = list(urls)
    while pending and not stopping() and time.monotonic() < deadline:
        if any(proc.poll() is not None for proc in procs):
            return False  # the caller reports the dead node
        try:
            with urllib.request.urlopen(pending[0] + path, timeout=1, context=ssl_context) as resp:
                if resp.status == 200:
                    pending.pop(0)
                    continue
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    return not pending


def stop_all(procs: Sequence[subprocess.Popen[bytes]], *, grace_s: float = CLUSTER_STOP_GRACE_S) -> None:
    """SIGTERM every process's group at once (SIGCONT first: a stopped process
    cannot act on it), wait up to grace_s for all, then SIGKILL the group of
    any still running. Each process must lead its own session
    (start_new_session), as `kvstore cluster`'s nodes and the harness's do."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGCONT)
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):  # it exited between the wait and the kill
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


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
    import httpx

    base = args.url.rstrip("/")
    try:
        with open_client(args) as client:
            if args.command in ("backup", "restore"):
                from app import cli_backup

                return cli_backup.run(client, args)
            path = "/kv/" + quote(args.key, safe="") if args.command != "ring" else "/ring"
            if args.command == "get":
                resp = client.get(path)
                if resp.status_code == 200:
                    sys.stdout.buffer.write(resp.content + b"\n")
                    return 0
            elif args.command == "put":
                params = {"ttl": args.ttl} if args.ttl else None
                resp = client.put(path, content=args.value.encode(), params=params)
                if resp.status_code == 204:
                    print(f"OK {resp.headers.get('x-kvstore-version', '')}".rstrip())
                    return 0
            elif args.command == "delete":
                resp = client.delete(path)
                if resp.status_code == 204:
                    print("OK")
                    return 0
            else:
                resp = client.get(path)
                if resp.status_code == 200:
                    print(format_ring(resp.json()))
                    return 0
    except httpx.HTTPError as exc:
        print(f"kvstore: cannot reach {base}: {exc}", file=sys.stderr)
        return 1
    print(f"kvstore: {resp.status_code}: {_error_text(resp)}", file=sys.stderr)
    return 1


def _error_text(resp: httpx.Response) -> str:
    try:
        return str(resp.json().get("error", resp.text))
    except ValueError:
        return resp.text


def format_ring(ring: dict[str, Any]) -> str:
    rows = [("NODE", "URL", "REACHABLE", "SHARE", "REPLICA SHARE")]
    for member in ring["members"]:
        name = member["node_id"] + (" (self)" if member["self"] else "")
        rows.append(
            (
                name,
                member["url"],
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
    return "\n".join([header, *lines])
