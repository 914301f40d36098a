"""The stage classifier and CPU accounting of bench/put_profile.py: py-spy's
raw stacks (recorded with --threads --full-filenames, no --idle) sorted into
the stages of a PUT, and each node's CPU per thread from /proc.

How a sample is charged (the rules, in the order they apply):

1. By thread. A thread named `*-sync` (app.storage.flusher: the LMDB store's
   and the hint store's) is "fsync wait" whole. Any other thread but
   MainThread (asyncio/uvloop executor threads running sweeps and
   anti-entropy digests, `lmdb-digests`) is "background".
2. Background tasks, whatever the leaf: a stack holding a frame of
   Node._forever / Node._run_source (app/cluster/node.py: the periodic
   probes, anti-entropy, hint delivery, sweeps), of app/cluster/
   anti_entropy, rebalance, handoff, surplus_drop, backup, restore, overview,
   of app/membership, of the admin/console/ops/backup routes, or of a
   node-to-node route other than the single-key and coalesced reads and
   writes (PeerRoutes.clock, digests, shared_digest, range, syncing,
   membership, batch), is "background".
3. Otherwise the innermost frame with a rule wins (frames without one, e.g.
   asyncio/tasks.py, app/clock.py, app/ring.py, app/web/keys.py,
   app/web/access.py, app/transport/base.py, are passed through to their
   caller). C code has no frame: py-spy charges it, kernel time included, to
   the Python frame that called it (LMDB's commit to LmdbStore.apply_many,
   blake2b to fingerprint, a socket write to whoever called
   transport.write). `role` is the node's part: coordinator (node1 at N=3),
   replica (node2, node3), single (N=1).

   Frames and their stages:
   - uvicorn's httptools_impl.py: RequestResponseCycle.send and
     on_response_complete: answer; the rest (data_received, on_url,
     on_header, on_headers_complete, on_body, receive, ...): client parse
     on a coordinator or single node, peer call in on a replica.
   - app/web/asgi.py Reply.*, reply_for, json_error; app/web/dataplane.py
     DataPlane._epoch; app/web/routes_data.py version_header: answer.
   - app/web/dataplane.py and app/web/routes_data.py, the rest: coordinator
     (on a replica: peer call in).
   - app/web/routes_peer.py (PeerRoutes.writes, reads, kv, the decoders):
     peer call in.
   - app/cluster/coordinator.py, hedging.py: coordinator.
   - app/transport/http.py, pool.py: peer call out; app/transport/codec.py:
     peer call out on a coordinator, peer call in on a replica.
   - app/coalesce.py: coalescer (both sides: the peer calls' queues and the
     local applies').
   - app/cluster/replica.py _durable; app/storage/flusher.py; lmdb_store.py
     _env_sync, sync, wait_durable; asyncio/futures.py's wrap_future chain
     (_call_set_state, _copy_future_state, _set_state, _chain_future,
     wrap_future): fsync wait.
   - app/cluster/replica.py, the rest: replica apply.
   - app/storage/digests.py; app/storage/base.py fingerprint and
     record_fingerprint: digest upkeep.
   - app/storage/lmdb_store.py, memory.py, hints.py, the rest: storage commit.
   - app/metrics.py, prometheus_client: metrics.
   - logging: event loop/other.

4. A stack whose innermost frame is the event loop's runner or uvicorn's
   serving loop (asyncio/runners.py, uvicorn/server.py, uvicorn/_compat.py,
   app/web/server.py): time in uvloop's C code with no Python callback
   running (epoll, reading sockets, scheduling): "event loop/other".
   A stack under uvicorn's RequestResponseCycle.run_asgi with no other rule
   is the request's own parse (its role's parse stage); one under aiohttp
   or app/cluster/health.py with no other rule is background.
5. Anything else is "unclassified": the residual, whose leaf functions the
   benchmark prints so these rules can be checked.

Stage shares are taken per thread and scaled to that thread's CPU time
(/proc/PID/task/TID/stat utime + stime) over the same window, so each
node's stages add up to its measured CPU. A thread py-spy never saw active
(a native libuv worker, a thread that exited) is "unsampled".
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Row order of the table.
CLIENT_PARSE = "client parse"
COORDINATOR = "coordinator"
PEER_OUT = "peer call out"
PEER_IN = "peer call in"
COALESCER = "coalescer"
REPLICA = "replica apply"
STORAGE = "storage commit"
DIGEST = "digest upkeep"
FSYNC = "fsync wait"
ANSWER = "answer"
METRICS = "metrics"
LOOP = "event loop/other"
BACKGROUND = "background"
UNCLASSIFIED = "unclassified"
UNSAMPLED = "unsampled threads"
STAGES = (
    CLIENT_PARSE,
    COORDINATOR,
    PEER_OUT,
    PEER_IN,
    COALESCER,
    REPLICA,
    STORAGE,
    DIGEST,
    FSYNC,
    ANSWER,
    METRICS,
    LOOP,
    BACKGROUND,
    UNCLASSIFIED,
    UNSAMPLED,
)

COORDINATOR_ROLE, REPLICA_ROLE, SINGLE_ROLE = "coordinator", "replica", "single"
PARSE = "<parse>"  # client parse on a coordinator or single node, peer call in on a replica
HANDLER = "<handler>"  # coordinator on a coordinator or single node, peer call in on a replica
PEER = "<peer>"  # peer call out on a coordinator, peer call in on a replica

Frame = tuple[str, str]  # (function, file: app/..., or the path inside site-packages / the stdlib)

# (file, function or None for any) -> stage; the function rules are looked up first.
DEFINITE: dict[tuple[str, str | None], str] = {
    ("uvicorn/protocols/http/httptools_impl.py", "RequestResponseCycle.send"): ANSWER,
    ("uvicorn/protocols/http/httptools_impl.py", "HttpToolsProtocol.on_response_complete"): ANSWER,
    ("uvicorn/protocols/http/httptools_impl.py", "RequestResponseCycle.run_asgi"): "",  # fallback only (below)
    ("uvicorn/protocols/http/httptools_impl.py", None): PARSE,
    ("app/web/asgi.py", "Reply.send"): ANSWER,
    ("app/web/asgi.py", "Reply.__init__"): ANSWER,
    ("app/web/asgi.py", "reply_for"): ANSWER,
    ("app/web/asgi.py", "json_error"): ANSWER,
    ("app/web/dataplane.py", "DataPlane._epoch"): ANSWER,
    ("app/web/dataplane.py", None): HANDLER,
    ("app/web/routes_data.py", "version_header"): ANSWER,
    ("app/web/routes_data.py", None): HANDLER,
    ("app/web/routes_peer.py", None): PEER_IN,
    ("app/cluster/coordinator.py", None): COORDINATOR,
    ("app/cluster/hedging.py", None): COORDINATOR,
    ("app/transport/http.py", None): PEER_OUT,
    ("app/transport/pool.py", None): PEER_OUT,
    ("app/transport/codec.py", None): PEER,
    ("app/coalesce.py", None): COALESCER,
    ("app/cluster/replica.py", "_durable"): FSYNC,
    ("app/cluster/replica.py", None): REPLICA,
    ("app/storage/flusher.py", None): FSYNC,
    ("app/storage/lmdb_store.py", "LmdbStore._env_sync"): FSYNC,
    ("app/storage/lmdb_store.py", "LmdbStore.sync"): FSYNC,
    ("app/storage/lmdb_store.py", "LmdbStore.wait_durable"): FSYNC,
    ("app/storage/lmdb_store.py", None): STORAGE,
    ("app/storage/memory.py", None): STORAGE,
    ("app/storage/hints.py", None): STORAGE,
    ("app/storage/digests.py", None): DIGEST,
    ("app/storage/base.py", "fingerprint"): DIGEST,
    ("app/storage/base.py", "record_fingerprint"): DIGEST,
    ("app/metrics.py", None): METRICS,
    ("asyncio/futures.py", "_call_set_state"): FSYNC,
    ("asyncio/futures.py", "_copy_future_state"): FSYNC,
    ("asyncio/futures.py", "_set_state"): FSYNC,
    ("asyncio/futures.py", "_chain_future"): FSYNC,
    ("asyncio/futures.py", "wrap_future"): FSYNC,
}
# By the first path component, for packages without per-file rules.
DEFINITE_PACKAGES = {"prometheus_client": METRICS, "logging": LOOP}
# Used only when no frame has a definite rule: the innermost of these decides.
FALLBACK: dict[tuple[str, str | None], str] = {
    ("uvicorn/protocols/http/httptools_impl.py", "RequestResponseCycle.run_asgi"): PARSE,
    ("app/cluster/health.py", None): BACKGROUND,
    ("app/cluster/clock_offsets.py", None): BACKGROUND,
}
FALLBACK_PACKAGES = {"aiohttp": BACKGROUND}
# The event loop's own frames: a stack ending in one of these is time in uvloop's C code.
LOOP_LEAVES = {"asyncio/runners.py", "uvicorn/server.py", "uvicorn/_compat.py", "app/web/server.py"}
BACKGROUND_FRAMES = {
    ("app/cluster/node.py", "Node._forever"),
    ("app/cluster/node.py", "Node._run_source"),
    ("app/web/routes_peer.py", "PeerRoutes.clock"),
    ("app/web/routes_peer.py", "PeerRoutes.digests"),
    ("app/web/routes_peer.py", "PeerRoutes.shared_digest"),
    ("app/web/routes_peer.py", "PeerRoutes.range"),
    ("app/web/routes_peer.py", "PeerRoutes.syncing"),
    ("app/web/routes_peer.py", "PeerRoutes.membership"),
    ("app/web/routes_peer.py", "PeerRoutes.batch"),
}
BACKGROUND_FILES = {
    "app/cluster/anti_entropy.py",
    "app/cluster/rebalance.py",
    "app/cluster/handoff.py",
    "app/cluster/surplus_drop.py",
    "app/cluster/backup.py",
    "app/cluster/restore.py",
    "app/cluster/overview.py",
    "app/web/routes_admin.py",
    "app/web/routes_backup.py",
    "app/web/routes_console.py",
    "app/web/routes_ops.py",
    "app/web/ops.py",
}
BACKGROUND_PREFIXES = ("app/membership/",)


def _resolve(stage: str, role: str) -> str:
    if stage == PARSE:
        return PEER_IN if role == REPLICA_ROLE else CLIENT_PARSE
    if stage == HANDLER:
        return PEER_IN if role == REPLICA_ROLE else COORDINATOR
    if stage == PEER:
        return PEER_IN if role == REPLICA_ROLE else PEER_OUT
    return stage


def _lookup(table: dict[tuple[str, str | None], str], packages: dict[str, str], frame: Frame) -> str | None:
    function, path = frame
    found = table.get((path, function))
    if found is None:
        found = table.get((path, None))
    if found is None:
        found = packages.get(path.split("/", 1)[0])
    return found


def classify(frames: Sequence[Frame], *, role: str, thread: str) -> str:
    """The stage of one sample: frames outermost first (the thread frame removed)."""
    if thread.endswith("-sync"):
        return FSYNC
    if thread != "MainThread":
        return BACKGROUND
    for function, path in frames:
        if (path, function) in BACKGROUND_FRAMES or path in BACKGROUND_FILES or path.startswith(BACKGROUND_PREFIXES):
            return BACKGROUND
    if frames and frames[-1][1] in LOOP_LEAVES:
        return LOOP
    fallback: str | None = None
    for frame in reversed(frames):
        stage = _lookup(DEFINITE, DEFINITE_PACKAGES, frame)
        if stage:
            return _resolve(stage, role)
        if fallback is None:
            fallback = _lookup(FALLBACK, FALLBACK_PACKAGES, frame)
    return _resolve(fallback, role) if fallback else UNCLASSIFIED


# -- py-spy's raw output ------------------------------------------------------------


def short_path(path: str, app_dir: Path) -> str:
    """A frame's file as the rules name it: app/... inside the tree under test,
    the path inside site-packages, or inside the stdlib."""
    for marker in ("/site-packages/", "/dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1]
    root = str(app_dir) + "/"
    if path.startswith(root):
        return path[len(root) :]
    if "/lib/python3" in path:
        return path.split("/lib/python3", 1)[1].split("/", 1)[1]
    return path


def parse_frame(text: str, app_dir: Path) -> Frame:
    """'Name.func (/full/path.py:123)' -> ('Name.func', 'app/path.py')."""
    function, _, where = text.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return function, short_path(path, app_dir)


@dataclass
class ThreadSamples:
    name: str
    total: int = 0
    by_stage: Counter[str] = field(default_factory=Counter)
    by_leaf: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))  # stage -> leaf -> n


def read_raw(raw: Path, *, role: str, app_dir: Path) -> dict[int, ThreadSamples]:
    """Per native thread id: its samples by stage and, per stage, by leaf function."""
    threads: dict[int, ThreadSamples] = {}
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        parts = stack.split(";")
        head = parts.pop(0)  # 'thread (26928): MainThread'
        if not head.startswith("thread ("):
            continue
        tid = int(head[len("thread (") :].split(")", 1)[0], 0)
        name = head.split(": ", 1)[1] if ": " in head else "?"
        frames = [parse_frame(p, app_dir) for p in parts]
        stage = classify(frames, role=role, thread=name)
        entry = threads.setdefault(tid, ThreadSamples(name=name))
        count = int(count_text)
        entry.total += count
        entry.by_stage[stage] += count
        leaf = f"{frames[-1][0]} ({frames[-1][1]})" if frames else "(no frame)"
        entry.by_leaf[stage][leaf] += count
    return threads


# -- CPU per thread from /proc ---------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class CpuSnapshot:
    process: tuple[int, int]  # (utime, stime) ticks of the whole process, exited threads included
    threads: dict[int, tuple[int, int, str]]  # tid -> (utime, stime, comm)


def _stat_times(path: Path) -> tuple[int, int] | None:
    try:
        fields = path.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]), int(fields[12])


def cpu_snapshot(pid: int) -> CpuSnapshot:
    threads: dict[int, tuple[int, int, str]] = {}
    task_dir = Path(f"/proc/{pid}/task")
    for entry in task_dir.iterdir() if task_dir.exists() else ():
        times = _stat_times(entry / "stat")
        if times is None:
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            comm = "?"
        threads[int(entry.name)] = (*times, comm)
    return CpuSnapshot(process=_stat_times(Path(f"/proc/{pid}/stat")) or (0, 0), threads=threads)


@dataclass
class ThreadCpu:
    tid: int
    name: str
    user_s: float
    sys_s: float

    @property
    def total_s(self) -> float:
        return self.user_s + self.sys_s


def cpu_between(before: CpuSnapshot, after: CpuSnapshot) -> tuple[list[ThreadCpu], ThreadCpu]:
    """Per live thread, and the rest of the process (threads that exited or
    were born and died inside the window), in seconds."""
    threads = []
    for tid, (user, system, comm) in after.threads.items():
        old_user, old_system, _ = before.threads.get(tid, (0, 0, comm))
        threads.append(ThreadCpu(tid, comm, (user - old_user) / TICK, (system - old_system) / TICK))
    rest_user = (after.process[0] - before.process[0]) / TICK - sum(t.user_s for t in threads)
    rest_sys = (after.process[1] - before.process[1]) / TICK - sum(t.sys_s for t in threads)
    return threads, ThreadCpu(0, "exited threads", max(rest_user, 0.0), max(rest_sys, 0.0))


# -- one node's profile -------------------------------------------------------------------

Floats = defaultdict[str, float]


def floats() -> Floats:
    return defaultdict(float)


def add_into(target: Floats, source: dict[str, float]) -> None:
    for key, value in source.items():
        target[key] += value


def top(values: dict[str, float], n: int) -> list[tuple[str, float]]:
    return sorted(values.items(), key=lambda item: -item[1])[:n]


def thread_group(name: str) -> str:
    if name == "MainThread":
        return "event-loop thread"
    if name.endswith("-sync"):
        return "fsync thread(s)"
    return "other threads"


@dataclass
class NodeProfile:
    """One node's CPU per client request, by stage, thread group and leaf function."""

    label: str
    requests: int
    samples: int = 0
    stages: Floats = field(default_factory=floats)  # stage -> us/request
    user_us: float = 0.0
    sys_us: float = 0.0
    groups: Floats = field(default_factory=floats)  # thread group -> us/request
    leaves: dict[str, Floats] = field(default_factory=lambda: defaultdict(floats))  # stage -> leaf -> us/request
    active_per_cpu: float = 0.0  # active samples over (on-CPU seconds x rate): > 1 means runnable-waiting sampled
    native: Floats = field(default_factory=floats)  # perf category -> us/request
    perf_samples: int = 0
    perf_per_cpu: float = 0.0  # perf's on-CPU samples over (/proc CPU seconds x perf's rate): ~1 when consistent

    @property
    def total_us(self) -> float:
        return self.user_us + self.sys_us


def profile_node(
    label: str,
    *,
    samples: dict[int, ThreadSamples],
    threads: Iterable[ThreadCpu],
    rest: ThreadCpu,
    requests: int,
    sampled_threads: Iterable[ThreadCpu],
    rate_hz: float,
) -> NodeProfile:
    """Each thread's CPU per request (threads, rest, requests: the run without
    profilers) split by its own samples' stage shares (taken in the profiled
    run, whose per-thread CPU is sampled_threads)."""
    profile = NodeProfile(label=label, requests=max(requests, 1))
    per_request = 1e6 / profile.requests
    for thread in [*threads, rest]:
        us = thread.total_s * per_request
        profile.user_us += thread.user_s * per_request
        profile.sys_us += thread.sys_s * per_request
        seen = samples.get(thread.tid) if thread.tid else None
        name = seen.name if seen is not None else thread.name
        profile.groups[thread_group(name)] += us
        if seen is None or seen.total == 0:
            profile.stages[UNSAMPLED] += us
            continue
        for stage, count in seen.by_stage.items():
            profile.stages[stage] += us * count / seen.total
            for leaf, n in seen.by_leaf[stage].items():
                profile.leaves[stage][leaf] += us * n / seen.total
    profile.samples = sum(seen.total for seen in samples.values())
    cpu_sampled = sum(t.total_s for t in sampled_threads if t.tid in samples)
    if cpu_sampled > 0:
        profile.active_per_cpu = profile.samples / (cpu_sampled * rate_hz)
    return profile


def add_native(
    profile: NodeProfile,
    by_thread: dict[int, Counter[str]],
    tids: Iterable[int],
    *,
    cpu_s: float,
    rate_hz: float,
) -> None:
    """perf's categories for this node's threads, each scaled to the node's
    measured CPU per request; cpu_s: the node's CPU seconds while perf ran."""
    counts: Counter[str] = Counter()
    for tid in tids:
        counts.update(by_thread.get(tid, Counter()))
    total = sum(counts.values())
    profile.perf_samples = total
    if not total:
        return
    for category, n in counts.items():
        profile.native[category] = profile.total_us * n / total
    profile.perf_per_cpu = total / (cpu_s * rate_hz) if cpu_s else 0.0
