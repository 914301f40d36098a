"""Every setting of a kvstore node: its flag, its KVSTORE_* environment variable,
its default and why. The CLI builds its parser from NODE_OPTIONS; the README's
configuration table lists the same rows. Imports nothing from the rest of app
except errors.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from app.errors import ConfigError

ENV_PREFIX = "KVSTORE_"

DEFAULT_VNODES = 1024  # measured: 3 nodes x 1024 keep the fullest within ~6% of the mean (256: ~10%)
MAX_KEY_BYTES = 1024  # keys are identifiers, not payloads; bounded so they fit in headers and logs
DEFAULT_MAX_VALUE_BYTES = 1024 * 1024  # 1 MiB: big enough for documents, small enough to buffer
MAX_BATCH_KEYS = 256  # keys per /batch/get or /batch/put: a few ms of coordinator work, one answer buffered
MAX_BATCH_BODY_BYTES = 16 * 1024 * 1024  # a batch body, base64 included: bounded memory per request
DEFAULT_PEER_TIMEOUT_S = 2.0  # a peer slower than this is treated as unavailable (503), not waited on
DEFAULT_LISTEN = "127.0.0.1:8080"  # the first node of `kvstore cluster` and the README's walkthrough


class Fsync(StrEnum):
    """--fsync: when a write is acknowledged (see the README's durability table)."""

    ALWAYS = "always"
    BATCH = "batch"
    NEVER = "never"


class Engine(StrEnum):
    """--storage: where records live."""

    MEMORY = "memory"
    LMDB = "lmdb"
    ROCKSDB = "rocksdb"


class Membership(StrEnum):
    """--membership: where the ring's members come from."""

    STATIC = "static"
    KUBERNETES = "kubernetes"


DEFAULT_STORAGE_FSYNC = Fsync.BATCH  # group commit: durable within a few ms at a fraction of per-write fsync
DEFAULT_FSYNC_WINDOW_MS = 10  # batch window: at most this much acknowledged data is exposed to power loss
DEFAULT_TOMBSTONE_GRACE_S = 86_400.0  # 1 day: longer than any partition we expect anti-entropy to heal
DEFAULT_SWEEP_INTERVAL_S = 30.0  # TTL / tombstone sweep pace: reclaim space without competing with traffic
# --map-size: 64 GiB of address space, not disk: the file grows only with data;
# ~400M small records. The chart sets it to the volume's size instead.
DEFAULT_LMDB_MAP_SIZE = 64 << 30
MIN_LMDB_MAP_SIZE = 64 << 10  # 16 pages: below this LMDB cannot even write its sub-databases' roots
# Kubernetes quantity suffixes, so the chart can pass persistence.size as it is.
SIZE_SUFFIXES = {
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
}
# writemap measured ~2x cheaper puts, but with unsynced commits a power loss can
# then corrupt the file (LMDB docs) and a full disk is SIGBUS: durability first.
LMDB_WRITEMAP = False
LMDB_SWEEP_BATCH = 512  # records purged per sweep transaction: each holds the write lock ~1 ms, so puts never wait long
LMDB_SCAN_CHUNK = 1024  # records read per iter_range/digest transaction: no read txn outlives a chunk, so pages recycle
# RocksDB (app/storage/rocksdb_store.py), tuned for many small records (16-byte
# keys, 100-byte values: ~150 bytes a record on disk); bench/storage_engines.py measures it.
# Measured and left at RocksDB's defaults: a data-block hash index and no compression
# changed neither GET (6.4-7.1 us) nor PUT (16.2-17.4 us) at 300k keys; snappy leaves
# incompressible blocks stored raw.
ROCKSDB_WRITE_BUFFER_BYTES = 16 << 20  # one memtable: ~100k records; bounds WAL replay at a restart and the RSS it adds
ROCKSDB_MAX_WRITE_BUFFERS = 2  # one filling while one flushes: 32 MiB of memtables at most
ROCKSDB_INDEX_WRITE_BUFFER_BYTES = 4 << 20  # the expiry, tombstone and meta column families: few, tiny entries
# Uncompressed blocks, private memory (RssAnon). At 1M keys (141 MiB of tables) a GET
# costs 12.4 us against LMDB's 4.7 (it reads the page cache through its map): a cache
# as big as the data would close that, at the price of that much RssAnon.
ROCKSDB_BLOCK_CACHE_BYTES = 32 << 20
ROCKSDB_BLOOM_BITS_PER_KEY = 10  # ~1% false positives: a GET or an apply's read of an absent key skips most files
ROCKSDB_BACKGROUND_JOBS = 2  # flushes and compactions: the machines we target have 2 cores
ROCKSDB_SCAN_CHUNK = 1024  # records per iterator in iter_range/digests: no iterator pins files for a whole arc
ROCKSDB_SWEEP_BATCH = 512  # records per sweep batch, as LMDB_SWEEP_BATCH: puts never wait long for the write lock
# Sub-arcs per ring arc in the maintained digest index (app.storage.digests):
# the Merkle level anti-entropy narrows a mismatched arc to. Measured in
# bench/anti_entropy.py (BENCHMARKS.md, "maintained digests").
DIGEST_SUBARCS = 16
DEFAULT_REPLICATION_FACTOR = 3  # survives one node down with quorum reads and writes (R + W > N)
DEFAULT_ANTI_ENTROPY_INTERVAL_S = 30.0  # replicas converge within minutes even with no reads; cheap when in sync
DEFAULT_MAX_CLOCK_OFFSET_S = 0.5  # CockroachDB's default; NTP keeps healthy clocks within a few ms of each other
DEFAULT_SYNC_DEADLINE_S = 60.0  # a joining node stops waiting for unreachable sources after this; repair catches up
# A leaving node's whole drain; outside Kubernetes nothing kills it sooner
# (the chart derives it from the pod's termination grace period).
DEFAULT_DRAIN_DEADLINE_S = 60.0
GC_THRESHOLDS = (
    50_000,
    50,
    100,
)  # young-generation collections every 50k allocations, not 700: see app/web/server.py serve
DEFAULT_LOG_LEVEL = "warning"  # a quiet node: what it logs is worth reading (refusals, peers down, reloads)
DEFAULT_CLUSTER_BASE_PORT = 8080  # `kvstore cluster`: 8080, 8081, 8082, as the README's walkthrough expects
DEFAULT_CLUSTER_NODES = 3
CLUSTER_READY_WAIT_S = 30.0  # `kvstore cluster` waits this long for every node's /ready before saying it runs
DEFAULT_CLIENT_URL = "http://127.0.0.1:8080"
# How often the TLS files are checked for a change (cert-manager rewrites the mounted Secret):
# a rotation reaches new connections within this, plus one peer timeout for pooled ones.
DEFAULT_TLS_RELOAD_INTERVAL_S = 1.0
# How often --auth-file is checked for a change (a Secret edit reaches the pod's
# mounted file within the kubelet's sync; from there it applies within this).
AUTH_RELOAD_INTERVAL_S = 1.0

STORAGE_ENGINES = tuple(Engine)
MEMBERSHIP_SOURCES = tuple(Membership)
DEFAULT_CLUSTER_DOMAIN = "cluster.local"  # Kubernetes' default; clusters may configure another
FSYNC_POLICIES = tuple(Fsync)


Parser = Callable[[str, str], Any]
"""What turns an option's raw text into its value: (flag, text) -> value, or
ConfigError naming the flag."""


def text(_flag: str, raw: str) -> str:
    return raw


def lower_text(_flag: str, raw: str) -> str:
    return raw.lower()


def positive_int(flag: str, raw: str) -> int:
    return int(_positive(flag, raw, int))


def positive_float(flag: str, raw: str) -> float:
    return float(_positive(flag, raw, float))


def one_of(kind: type[StrEnum]) -> Parser:
    def parse(flag: str, raw: str) -> StrEnum:
        try:
            return kind(raw)
        except ValueError:
            raise ConfigError(f"config: {flag} must be one of {', '.join(kind)}, got {raw!r}") from None

    return parse


@dataclass(frozen=True)
class Option:
    """One node setting: `--flag`, env var KVSTORE_FLAG, default, help text,
    and the parser that turns its text into NodeConfig's value.
    A repeatable flag may be given several times; its env var is comma-separated.
    A switch may be given alone (`--peer-tls`, meaning true) or with true/false.
    `direct`: the parsed value is NodeConfig's field of the same name as it is
    (the others are combined with other settings in NodeConfig.from_options)."""

    flag: str
    default: str | None
    help: str
    parse: Parser = text
    direct: bool = False
    repeatable: bool = False
    switch: bool = False

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()

    def value(self, values: dict[str, str | None]) -> Any:
        """The parsed value from raw option strings (keyed by dest): the text
        given, else the default; None when neither is set."""
        raw = values.get(self.dest) or self.default
        return None if raw is None else self.parse(self.flag, raw)


NODE_OPTIONS: tuple[Option, ...] = (
    Option("--node-id", None, "this node's unique id (required); also its name on the ring"),
    Option("--listen", DEFAULT_LISTEN, "HOST:PORT to serve HTTP on"),
    Option("--advertise-url", None, "URL peers use to reach this node (default: http://LISTEN)"),
    Option("--peers", "", "ring members as ID=URL,ID=URL,... (this node is added if missing)"),
    Option("--vnodes", str(DEFAULT_VNODES), "virtual nodes per member on the hash ring", positive_int, True),
    Option(
        "--replication-factor",
        str(DEFAULT_REPLICATION_FACTOR),
        "copies of each key (capped at the ring size)",
        positive_int,
        True,
    ),
    Option(
        "--anti-entropy-interval",
        str(DEFAULT_ANTI_ENTROPY_INTERVAL_S),
        "seconds between anti-entropy rounds",
        positive_float,
        True,
    ),
    Option(
        "--sync-deadline",
        str(DEFAULT_SYNC_DEADLINE_S),
        "seconds a joining node waits to pull its ranges before serving anyway",
        positive_float,
        True,
    ),
    Option(
        "--drain-deadline",
        str(DEFAULT_DRAIN_DEADLINE_S),
        "seconds a node that left the ring spends handing off its records before it exits",
        positive_float,
        True,
    ),
    Option(
        "--max-clock-offset",
        str(DEFAULT_MAX_CLOCK_OFFSET_S),
        "seconds two clocks may differ: a node further off from most peers stops coordinating writes, "
        "and versions further ahead are refused",
        positive_float,
        True,
    ),
    Option("--cluster-token", None, "shared secret required on internal replica routes (unset: open)", direct=True),
    Option(
        "--auth-file",
        None,
        "users, roles and tokens (YAML or JSON) every client request is checked against; "
        "re-read when it changes (unset: no access control; see Access control)",
        direct=True,
    ),
    Option(
        "--ops-listen",
        None,
        "HOST:PORT serving only /health, /ready and /metrics in plain HTTP, for probes and Prometheus "
        "(unset: they are served on --listen only)",
    ),
    Option("--max-value-bytes", str(DEFAULT_MAX_VALUE_BYTES), "largest accepted value, in bytes", positive_int, True),
    Option("--peer-timeout", str(DEFAULT_PEER_TIMEOUT_S), "seconds to wait for another node", positive_float, True),
    Option(
        "--storage",
        None,
        "storage engine: memory, lmdb or rocksdb (default: with --data-dir, the engine an existing data dir "
        "holds, else lmdb; without it, memory)",
        one_of(Engine),
    ),
    Option("--data-dir", None, "directory for durable data (implies a durable --storage)", direct=True),
    Option(
        "--map-size",
        str(DEFAULT_LMDB_MAP_SIZE),
        "lmdb: most bytes the store may hold, e.g. 10Gi; a full store refuses writes with 507 (see Storage limits)",
        lambda _flag, raw: parse_size(raw),
        True,
    ),
    Option(
        "--fsync", DEFAULT_STORAGE_FSYNC, "durability: always, batch or never (see Durability)", one_of(Fsync), True
    ),
    Option("--fsync-window-ms", str(DEFAULT_FSYNC_WINDOW_MS), "batch window for --fsync batch", positive_int, True),
    Option(
        "--tombstone-grace", str(DEFAULT_TOMBSTONE_GRACE_S), "seconds a delete marker is kept", positive_float, True
    ),
    Option(
        "--sweep-interval",
        str(DEFAULT_SWEEP_INTERVAL_S),
        "seconds between TTL/tombstone sweeps",
        positive_float,
        True,
    ),
    Option(
        "--membership",
        Membership.STATIC,
        "where members come from: static (--peers) or kubernetes (the StatefulSet)",
        one_of(Membership),
        True,
    ),
    Option(
        "--namespace",
        None,
        "kubernetes: the StatefulSet's namespace (downward API metadata.namespace)",
        direct=True,
    ),
    Option("--statefulset", None, "kubernetes: the StatefulSet whose pods are the ring", direct=True),
    Option("--headless-service", None, "kubernetes: the headless Service giving pods stable DNS names", direct=True),
    Option("--cluster-domain", DEFAULT_CLUSTER_DOMAIN, "kubernetes: the cluster's DNS domain", direct=True),
    Option("--kubeconfig", None, "kubernetes: kubeconfig file (default: KUBECONFIG, else in-cluster)", direct=True),
    Option(
        "--resolve",
        None,
        "NAME=ADDRESS: reach host NAME at ADDRESS, like curl --resolve (repeatable)",
        lambda _flag, raw: parse_resolve(raw),
        repeatable=True,
    ),
    Option("--tls-cert", None, "PEM certificate (cert-manager's tls.crt): serve HTTPS and talk https to peers"),
    Option("--tls-key", None, "PEM private key of --tls-cert (cert-manager's tls.key)"),
    Option("--tls-ca", None, "PEM CA bundle (cert-manager's ca.crt): verifies peers and client certificates"),
    Option(
        "--peer-tls",
        "false",
        "mutual TLS between nodes: present a certificate, require one on internal routes",
        switch=True,
    ),
    Option("--peer-tls-cert", None, "certificate this node presents to peers (default: --tls-cert)"),
    Option("--peer-tls-key", None, "key of --peer-tls-cert (default: --tls-key)"),
    Option("--peer-tls-ca", None, "CA bundle that verifies peers (default: --tls-ca)"),
    Option(
        "--client-cert-auth",
        "false",
        "require a client certificate signed by --tls-ca on every connection",
        switch=True,
    ),
    Option(
        "--tls-reload-interval",
        str(DEFAULT_TLS_RELOAD_INTERVAL_S),
        "seconds between checks of the TLS files for a rotation",
        positive_float,
    ),
    Option("--log-level", DEFAULT_LOG_LEVEL, "log level: debug, info, warning or error", lower_text, True),
)
OPTIONS_BY_DEST = {option.dest: option for option in NODE_OPTIONS}


def env_default(option: Option, environ: dict[str, str] | None = None) -> str | None:
    """The option's value from the environment, else its built-in default."""
    env = os.environ if environ is None else environ
    return env.get(option.env, option.default)


def parse_listen(listen: str, *, flag: str = "--listen") -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"config: {flag} must be HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


def parse_peers(spec: str) -> dict[str, str]:
    """'a=http://h:1,b=http://h:2' -> {'a': 'http://h:1', 'b': 'http://h:2'}."""
    peers: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        node_id, sep, url = item.partition("=")
        node_id, url = node_id.strip(), url.strip().rstrip("/")
        parts = urlsplit(url)
        if not sep or not node_id or parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"config: --peers entry must be ID=http://HOST:PORT, got {item!r}")
        if node_id in peers and peers[node_id] != url:
            raise ConfigError(f"config: --peers names {node_id!r} twice with different URLs")
        peers[node_id] = url
    return peers


def parse_resolve(spec: str) -> dict[str, str]:
    """'a.svc=127.0.0.2,b.svc=127.0.0.3' -> {'a.svc': '127.0.0.2', 'b.svc': '127.0.0.3'}."""
    mapping: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, address = item.partition("=")
        if not sep or not name.strip() or not address.strip():
            raise ConfigError(f"config: --resolve entry must be NAME=ADDRESS, got {item!r}")
        mapping[name.strip()] = address.strip()
    return mapping


def parse_bool(name: str, raw: str | None) -> bool:
    """'true'/'false' (also 1/0, yes/no, on/off), as flags and env vars give them."""
    text = (raw or "false").strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"config: {name} must be true or false, got {raw!r}")


@dataclass(frozen=True)
class TlsFiles:
    """One certificate, its key and the CA bundle that verifies the other side
    (cert-manager's Secret layout: tls.crt, tls.key, ca.crt)."""

    cert: str
    key: str
    ca: str | None


@dataclass(frozen=True)
class TlsConfig:
    """What the node serves with (`server`) and presents to and trusts in peers (`peer`)."""

    server: TlsFiles
    peer: TlsFiles
    peer_tls: bool  # mutual TLS between nodes: present `peer.cert`; internal routes require a verified one
    client_cert_auth: bool  # every connection must present a certificate the CA signed
    reload_interval: float = DEFAULT_TLS_RELOAD_INTERVAL_S


def parse_tls(values: dict[str, str | None]) -> TlsConfig | None:
    """The TLS settings, or None when the node serves plain HTTP."""
    cert, key, ca = values.get("tls_cert") or None, values.get("tls_key") or None, values.get("tls_ca") or None
    peer_tls = parse_bool("--peer-tls", values.get("peer_tls"))
    client_cert_auth = parse_bool("--client-cert-auth", values.get("client_cert_auth"))
    if not cert and not key:
        if peer_tls or client_cert_auth or ca:
            raise ConfigError("config: --peer-tls, --client-cert-auth and --tls-ca need --tls-cert and --tls-key")
        return None
    if not (cert and key):
        raise ConfigError("config: --tls-cert and --tls-key go together (cert-manager's tls.crt and tls.key)")
    if client_cert_auth and not ca:
        raise ConfigError("config: --client-cert-auth needs --tls-ca to verify client certificates")
    peer_ca = values.get("peer_tls_ca") or ca
    if peer_tls and not peer_ca:
        raise ConfigError("config: --peer-tls needs --tls-ca (or --peer-tls-ca) to verify the other nodes")
    peer = TlsFiles(cert=values.get("peer_tls_cert") or cert, key=values.get("peer_tls_key") or key, ca=peer_ca)
    interval = OPTIONS_BY_DEST["tls_reload_interval"].value(values)
    return TlsConfig(
        server=TlsFiles(cert=cert, key=key, ca=ca),
        peer=peer,
        peer_tls=peer_tls,
        client_cert_auth=client_cert_auth,
        reload_interval=interval,
    )


def parse_size(raw: str) -> int:
    """'10Gi' -> 10737418240: bytes, with an optional Kubernetes quantity suffix."""
    text = raw.strip()
    suffix = next((s for s in sorted(SIZE_SUFFIXES, key=len, reverse=True) if text.endswith(s)), "")
    number = text[: len(text) - len(suffix)]
    if not number.isdigit():
        raise ConfigError(f"config: --map-size must be bytes, optionally with Ki, Mi, Gi, Ti, k, M, G or T: {raw!r}")
    size = int(number) * SIZE_SUFFIXES.get(suffix, 1)
    if size < MIN_LMDB_MAP_SIZE:
        raise ConfigError(f"config: --map-size must be at least {MIN_LMDB_MAP_SIZE} bytes, got {raw!r}")
    return size


def _positive(name: str, raw: str, kind: type[int] | type[float]) -> int | float:
    try:
        value: int | float = kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"config: {name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"config: {name} must be positive, got {raw!r}")
    return value


@dataclass(frozen=True)
class NodeConfig:
    node_id: str
    host: str
    port: int
    advertise_url: str
    peers: dict[str, str]
    vnodes: int = DEFAULT_VNODES
    replication_factor: int = DEFAULT_REPLICATION_FACTOR
    cluster_token: str | None = None
    anti_entropy_interval: float = DEFAULT_ANTI_ENTROPY_INTERVAL_S
    sync_deadline: float = DEFAULT_SYNC_DEADLINE_S
    drain_deadline: float = DEFAULT_DRAIN_DEADLINE_S
    max_clock_offset: float = DEFAULT_MAX_CLOCK_OFFSET_S
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    peer_timeout: float = DEFAULT_PEER_TIMEOUT_S
    storage: Engine = Engine.MEMORY
    # Whether --storage was given: if not, a data dir that already holds a
    # store opens with the engine that wrote it (app.storage.resolve_engine).
    storage_chosen: bool = False
    data_dir: str | None = None
    map_size: int = DEFAULT_LMDB_MAP_SIZE
    fsync: Fsync = DEFAULT_STORAGE_FSYNC
    fsync_window_ms: int = DEFAULT_FSYNC_WINDOW_MS
    tombstone_grace: float = DEFAULT_TOMBSTONE_GRACE_S
    sweep_interval: float = DEFAULT_SWEEP_INTERVAL_S
    log_level: str = DEFAULT_LOG_LEVEL
    membership: Membership = Membership.STATIC
    namespace: str | None = None
    statefulset: str | None = None
    headless_service: str | None = None
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN
    kubeconfig: str | None = None
    resolve: dict[str, str] = field(default_factory=dict)
    tls: TlsConfig | None = None
    auth_file: str | None = None
    ops_listen: tuple[str, int] | None = None

    @property
    def scheme(self) -> str:
        """How peers and clients reach this node: https once it serves TLS."""
        return "https" if self.tls is not None else "http"

    @classmethod
    def from_options(cls, values: dict[str, str | None]) -> NodeConfig:
        """Validate raw option strings (keyed by Option.dest) into a config:
        each direct option through its own parser (NODE_OPTIONS), then the
        settings that depend on one another."""
        direct = {option.dest: option.value(values) for option in NODE_OPTIONS if option.direct}
        node_id = (values.get("node_id") or "").strip()
        if not node_id:
            raise ConfigError("config: --node-id (KVSTORE_NODE_ID) is required")
        if any(c in node_id for c in ",= /") or not node_id.isprintable():
            raise ConfigError(f"config: --node-id may not contain ',', '=', '/' or spaces: {node_id!r}")
        host, port = parse_listen(values.get("listen") or DEFAULT_LISTEN)
        tls = parse_tls(values)
        scheme = "https" if tls is not None else "http"
        advertise = (values.get("advertise_url") or f"{scheme}://{host}:{port}").rstrip("/")
        peers = parse_peers(values.get("peers") or "")
        if tls is not None and (plain := sorted(nid for nid, url in peers.items() if url.startswith("http:"))):
            raise ConfigError(
                f"config: with --tls-cert every peer URL must be https://, not http:// ({', '.join(plain)})"
            )
        if peers.get(node_id, advertise) != advertise and values.get("advertise_url"):
            raise ConfigError(f"config: --peers gives {node_id} a URL other than --advertise-url")
        advertise = peers.setdefault(node_id, advertise)
        data_dir = direct["data_dir"]
        chosen = OPTIONS_BY_DEST["storage"].value(values)
        storage = chosen or (Engine.LMDB if data_dir else Engine.MEMORY)
        if storage != Engine.MEMORY and not data_dir:
            raise ConfigError(f"config: --storage {storage} needs --data-dir")
        if direct["membership"] == Membership.KUBERNETES:
            missing = [
                f"--{name}"
                for name in ("namespace", "statefulset", "headless-service")
                if not values.get(name.replace("-", "_"))
            ]
            if missing:
                raise ConfigError(
                    f"config: --membership kubernetes needs {', '.join(missing)} (or their KVSTORE_* env vars)"
                )
        if direct["auth_file"] and not direct["cluster_token"] and not (tls is not None and tls.peer_tls):
            raise ConfigError(
                "config: --auth-file guards the client routes, but with neither --cluster-token nor --peer-tls "
                "the node-to-node routes (/internal/) would stay open to anyone; set one of them"
            )
        ops_spec = values.get("ops_listen")
        ops_listen = parse_listen(ops_spec, flag="--ops-listen") if ops_spec else None
        if ops_listen is not None and ops_listen[1] == port and ops_listen[0] in (host, "0.0.0.0", "::"):
            raise ConfigError("config: --ops-listen needs a port of its own, not --listen's")
        return cls(
            node_id=node_id,
            host=host,
            port=port,
            advertise_url=advertise,
            peers=peers,
            storage=storage,
            storage_chosen=chosen is not None,
            resolve=OPTIONS_BY_DEST["resolve"].value(values) or {},
            tls=tls,
            ops_listen=ops_listen,
            **direct,
        )
