"""The node's HTTP data path against a bare ASGI app, in one run.

Starts, one after another, the bare ASGI reference (bench/bare_asgi.py), a
single node, a two-node ring (GET through the non-owner: one internal hop)
and `kvstore cluster --nodes 3`; drives each with wrk (servers pinned to one
core, wrk to the other, 64 connections) and prints req/s, p50, p99 and the
ratio to the bare-ASGI figure of the same run, then checks the targets.

    .venv/bin/python -m bench http_node [--duration 5] [--warmup 1] [--markdown] [--tls] [--auth] [--console]

With --tls, a single node serving HTTPS (a certificate made by
tests/harness/certs.py; wrk speaks TLS over its keep-alive connections) is
measured beside the plain one: GET /kv/{key} and PUT /kv/{key}. Target:
HTTPS GET >= 0.6 x the plain single-node GET of the same run.

With --auth, a single node under access control (--auth-file, a user whose
token grants read and write on every key; each request sends it as a bearer
token) is measured beside the same node without it, alternating the two
--auth-pairs times: GET /kv/{key} and PUT /kv/{key}. Target: each >= 0.95 x
without auth (the median of the pairs' ratios).

With --console, a three-node cluster (default replication) is measured with
and without the web console open on node1, the node under load (issue 22),
alternating the two --console-pairs times: GET and PUT via node1, keys
spread. The open console is a poller that loads /ui and its files once,
then every 2 s asks /console/overview and looks a key up on its replicas,
as a page with a key typed in does. Also the CPU one poll costs the three
nodes together, on the idle cluster: a figure other work on a shared
machine barely moves, unlike req/s. Reported, no target (--only-console
runs this part alone).

Exit status 0 when every target is met, 1 when one is missed.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import statistics
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from app.config import DEFAULT_VNODES
from app.ring import HashRing
from bench.lib.common import (
    APP_DIR,
    BENCH_DIR,
    PYTHON,
    Result,
    cpu_seconds,
    format_table,
    free_port,
    http_request,
    lua_rest_put,
    machine_summary,
    require_wrk,
    run_wrk,
    serving,
    tempdir,
    wait_ready,
    write_lua,
)
from tests.harness.processes import free_port_run

HOST = "127.0.0.1"
VALUE = "v" * 100  # a 100-byte value: small, like most key-value traffic
HOT_KEY = "bench-hot"  # the single preloaded key the fixed-key GETs read
SPREAD_KEYS = 1000  # keys preloaded into the cluster, spread over its owners
PUT_KEYSPACE = 100_000  # PUTs cycle over this many keys: bounded memory, mostly overwrites

# Targets: ratio to the bare-ASGI figure of the same method; HTTPS GET to the plain node's GET.
TARGETS = {"get": 0.5, "put": 0.4, "hop": 0.1, "https_get": 0.6, "auth": 0.95}
AUTH_TOKEN = "bench-token-0123456789abcdef0123456789abcdef"  # a user's bearer token in the --auth bench

LUA_FIXED = "-- fixed request: the URL's path and query"
LUA_SEED_PUT = f"""
local counter = 0
local value = "{VALUE}"
request = function()
  counter = counter + 1
  local body = '{{"key":"k' .. (counter % {PUT_KEYSPACE}) .. '","value":"' .. value .. '"}}'
  return wrk.format("PUT", "/put", {{["Content-Type"] = "application/json"}}, body)
end
"""
LUA_REST_PUT = lua_rest_put(PUT_KEYSPACE, VALUE)
LUA_SPREAD_GET = f"""
local counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", "/get?key=s" .. (counter % {SPREAD_KEYS}))
end
"""
LUA_SPREAD_PUT = f"""
local counter = 0
local value = "{VALUE}"
request = function()
  counter = counter + 1
  local body = '{{"key":"s' .. (counter % {SPREAD_KEYS}) .. '","value":"' .. value .. '"}}'
  return wrk.format("PUT", "/put", {{["Content-Type"] = "application/json"}}, body)
end
"""


CONSOLE_POLL_S = 2.0  # the page's own interval (app/web/routes_console.py POLL_INTERVAL_MS)
CONSOLE_FILES = (
    "/ui",
    "/ui/console.css",
    "/ui/console.js",
    "/ui/api.js",
    "/ui/format.js",
    "/ui/lookup.js",
    "/ui/members.js",
    "/ui/ring.js",
    "/ui/favicon.svg",
    "/console/ring",
)


@contextmanager
def console_polling(url: str, key: str) -> Iterator[dict[str, int]]:
    """An open console on url while the block runs: its files once, then
    every CONSOLE_POLL_S the overview and a key lookup. Yields its counts."""
    counts = {"polls": 0, "failed": 0}
    stop = threading.Event()

    def fetch(path: str) -> None:
        status, _ = http_request(url, "GET", path)
        counts["failed"] += status != 200

    def run() -> None:
        for path in CONSOLE_FILES:
            fetch(path)
        while not stop.is_set():
            fetch("/console/overview")
            fetch(f"/console/key?key={key}")
            counts["polls"] += 1
            stop.wait(CONSOLE_POLL_S)

    poller = threading.Thread(target=run, name="console-poller", daemon=True)
    poller.start()
    try:
        yield counts
    finally:
        stop.set()
        poller.join(timeout=10)


POLL_COST_SAMPLES = 50


def poll_cost(url: str, key: str, pids: list[int]) -> float:
    """Server CPU seconds (every node together) one console poll costs: the
    mean over POLL_COST_SAMPLES polls on an otherwise idle cluster (the
    kernel counts CPU in 10 ms ticks, so one poll alone is below its
    resolution). A figure other work on the machine barely moves, unlike req/s."""
    before = cpu_seconds(pids)
    for _ in range(POLL_COST_SAMPLES):
        for path in ("/console/overview", f"/console/key?key={key}"):
            status, _ = http_request(url, "GET", path)
            assert status == 200, f"{path} answered {status}"
    return (cpu_seconds(pids) - before) / POLL_COST_SAMPLES


def node_argv(node_id: str, port: int, peers: dict[str, int], *, scheme: str = "http") -> list[str]:
    """A data-path node: one owner per key (replication factor 1), so a key
    another node owns costs exactly one internal hop."""
    spec = ",".join(f"{nid}={scheme}://{HOST}:{p}" for nid, p in peers.items())
    return [
        PYTHON,
        "-m",
        "app",
        "node",
        "--node-id",
        node_id,
        "--listen",
        f"{HOST}:{port}",
        "--peers",
        spec,
        "--replication-factor",
        "1",
        "--log-level",
        "warning",
    ]


def put_seed(url: str, key: str, value: str = VALUE) -> None:
    status, body = http_request(url, "PUT", "/put", f'{{"key":"{key}","value":"{value}"}}'.encode())
    if status != 200:
        raise RuntimeError(f"bench: preloading {key!r} through {url} answered {status}: {body[:200]!r}")


def forwarded_reads(url: str, peer: str) -> float:
    """kvstore_forwarded_requests_total{peer=peer, op="read"} as the node reports it."""
    status, body = http_request(url, "GET", "/metrics")
    for line in body.decode().splitlines() if status == 200 else ():
        if line.startswith("kvstore_forwarded_requests_total{") and f'peer="{peer}"' in line and 'op="read"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def owned_key(members: list[str], owner: str, prefix: str) -> str:
    ring = HashRing(members, vnodes=DEFAULT_VNODES)
    return next(f"{prefix}{i}" for i in range(10_000) if ring.owner(f"{prefix}{i}".encode()) == owner)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of discarded warm-up before each run")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown (for BENCHMARKS.md)")
    parser.add_argument("--tls", action="store_true", help="also measure a single node serving HTTPS")
    parser.add_argument(
        "--console", action="store_true", help="also measure with the web console open and polling (issue 22)"
    )
    parser.add_argument("--console-pairs", type=int, default=3, help="--console: alternated with/without pairs")
    parser.add_argument("--only-console", action="store_true", help="measure the --console pairs alone")
    parser.add_argument("--auth", action="store_true", help="also measure a single node under access control")
    parser.add_argument("--auth-pairs", type=int, default=3, help="--auth: alternated with/without pairs")
    parser.add_argument("--only-auth", action="store_true", help="measure the --auth pairs alone")
    args = parser.parse_args()
    require_wrk()
    print(f"machine: {machine_summary()}", flush=True)
    print(f"app under test: {APP_DIR / 'app'}", flush=True)
    results: dict[str, Result] = {}

    def measure(key: str, label: str, url: str, lua: Path, pids: list[int]) -> Result:
        result = run_wrk(label, url, lua=lua, duration_s=args.duration, warmup_s=args.warmup, server_pids=pids)
        results[key] = result
        print(
            f"  {label:<44} {result.rps:>9,.0f} req/s  p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms"
            f"  errors {result.errors}",
            flush=True,
        )
        return result

    if args.only_console:
        with tempdir("kvstore-bench-") as tmp:
            report_console(*measure_console(Path(tmp), measure, pairs=args.console_pairs))
        return 0

    if args.only_auth:
        with tempdir("kvstore-bench-") as tmp:
            ratios = measure_auth(Path(tmp), measure, pairs=args.auth_pairs)
        return 0 if check_auth(ratios) else 1

    with tempdir("kvstore-bench-") as tmp:
        logdir = Path(tmp)
        fixed = write_lua(logdir, "fixed", LUA_FIXED)
        seed_put = write_lua(logdir, "seed_put", LUA_SEED_PUT)
        rest_put = write_lua(logdir, "rest_put", LUA_REST_PUT)
        spread_get = write_lua(logdir, "spread_get", LUA_SPREAD_GET)
        spread_put = write_lua(logdir, "spread_put", LUA_SPREAD_PUT)

        # 1. the reference
        port = free_port()
        with serving(
            "bare",
            [PYTHON, str(BENCH_DIR / "bare_asgi.py"), "--port", str(port)],
            health_urls=[f"http://{HOST}:{port}"],
            logdir=logdir,
        ) as bare:
            url = f"http://{HOST}:{port}"
            measure("bare_get", "bare ASGI GET (reference)", url + "/get?key=" + HOT_KEY, fixed, bare.pids())
            measure("bare_put", "bare ASGI PUT (body read, reference)", url, rest_put, bare.pids())

        # 2-4. one node that owns every key
        port = free_port()
        with serving(
            "single", node_argv("n1", port, {"n1": port}), health_urls=[f"http://{HOST}:{port}"], logdir=logdir
        ) as node:
            url = f"http://{HOST}:{port}"
            wait_ready([url], servers=[node])
            put_seed(url, HOT_KEY)
            measure("get", "1 node GET /get?key=K", f"{url}/get?key={HOT_KEY}", fixed, node.pids())
            measure("kv_get", "1 node GET /kv/{key}", f"{url}/kv/{HOT_KEY}", fixed, node.pids())
            measure("put", "1 node PUT /put (seed JSON)", url, seed_put, node.pids())
            measure("kv_put", "1 node PUT /kv/{key} (raw body)", url, rest_put, node.pids())

        if args.tls:  # the same node over HTTPS
            from tests.harness.certs import tls_mode

            tls = tls_mode(logdir / "certs")
            port = free_port()
            url = f"https://{HOST}:{port}"
            argv = node_argv("n1", port, {"n1": port}, scheme="https") + tls.node_args("n1")
            with serving("single-tls", argv, health_urls=[url], logdir=logdir, ssl_context=tls.context) as node:
                status, _ = http_request(url, "PUT", "/kv/" + HOT_KEY, VALUE.encode(), context=tls.context)
                assert status == 204, f"seeding over https answered {status}"
                measure("https_kv_get", "1 node HTTPS GET /kv/{key}", f"{url}/kv/{HOT_KEY}", fixed, node.pids())
                measure("https_kv_put", "1 node HTTPS PUT /kv/{key} (raw body)", url, rest_put, node.pids())

        auth_ratios = measure_auth(logdir, measure, pairs=args.auth_pairs) if args.auth else None

        # 5. one internal hop: GET through n1 of a key n2 owns; both nodes on the server core
        p1, p2 = free_port(), free_port()
        peers = {"n1": p1, "n2": p2}
        remote_key = owned_key(["n1", "n2"], "n2", "hop-")
        with ExitStack() as stack:
            n1 = stack.enter_context(
                serving("hop-n1", node_argv("n1", p1, peers), health_urls=[f"http://{HOST}:{p1}"], logdir=logdir)
            )
            n2 = stack.enter_context(
                serving("hop-n2", node_argv("n2", p2, peers), health_urls=[f"http://{HOST}:{p2}"], logdir=logdir)
            )
            wait_ready([f"http://{HOST}:{p1}", f"http://{HOST}:{p2}"], servers=[n1, n2])
            url = f"http://{HOST}:{p1}"
            put_seed(url, remote_key)
            before = forwarded_reads(url, "n2")
            hop = measure(
                "hop", "2 nodes GET via non-owner (1 hop)", f"{url}/get?key={remote_key}", fixed, n1.pids() + n2.pids()
            )
            forwarded = forwarded_reads(url, "n2") - before
            if forwarded < hop.requests:  # warm-up is outside the window, so forwarded >= measured requests
                print(f"  WARNING: n1 forwarded only {forwarded:.0f} reads for {hop.requests} requests", flush=True)

        # 6. `kvstore cluster --nodes 3`, every node on the server core; keys spread over the owners.
        # Replication factor 1 (one owner per key: the data path alone) first;
        # the default (what `make run` starts) is shown beside it.
        ring = HashRing(["node1", "node2", "node3"], vnodes=DEFAULT_VNODES)
        remote = sum(ring.owner(f"s{i}".encode()) != "node1" for i in range(SPREAD_KEYS)) / SPREAD_KEYS
        for rf, suffix in (("1", f"rf=1, {remote:.0%} fwd"), (None, "default rf")):
            base = free_port_run(3)
            urls = [f"http://{HOST}:{base + i}" for i in range(3)]
            argv = [PYTHON, "-m", "app", "cluster", "--nodes", "3", "--base-port", str(base), "--host", HOST]
            with serving(
                "cluster", argv + (["--replication-factor", rf] if rf else []), health_urls=urls, logdir=logdir
            ) as cluster:
                wait_ready(urls, servers=[cluster])
                for i in range(SPREAD_KEYS):
                    put_seed(urls[0], f"s{i}")
                pids = cluster.pids()
                tag = "cluster" if rf else "cluster_default"
                measure(
                    f"{tag}_get", f"3-node cluster GET via node1 ({suffix})", urls[0] + "/get?key=s0", spread_get, pids
                )
                measure(f"{tag}_put", f"3-node cluster PUT via node1 ({suffix})", urls[0], spread_put, pids)

        # the reference again: a drift check, since other work may share the machine
        port = free_port()
        with serving(
            "bare-again",
            [PYTHON, str(BENCH_DIR / "bare_asgi.py"), "--port", str(port)],
            health_urls=[f"http://{HOST}:{port}"],
            logdir=logdir,
        ) as bare:
            measure(
                "bare_get_again",
                "bare ASGI GET (again: drift check)",
                f"http://{HOST}:{port}/get?key={HOT_KEY}",
                fixed,
                bare.pids(),
            )

    print_report(results, markdown=args.markdown, duration=args.duration)
    if args.console:
        with tempdir("kvstore-bench-") as tmp:
            report_console(*measure_console(Path(tmp), measure, pairs=args.console_pairs))
    ok = check_targets(results)
    if auth_ratios is not None:
        ok &= check_auth(auth_ratios)
    return 0 if ok else 1


def measure_auth(logdir: Path, measure: Callable[..., Result], *, pairs: int) -> dict[str, list[float]]:
    """One node without and one under access control, measured in turn
    `pairs` times (each pair back to back, so drift hits both alike):
    {"get": [ratio, ...], "put": [...]}, each ratio auth / without."""
    digest = hashlib.sha256(AUTH_TOKEN.encode()).hexdigest()
    users = logdir / "users.yaml"
    users.write_text(
        f'users:\n  bench: {{token_sha256: "{digest}", roles: [rw]}}\n'
        'roles:\n  rw: [{prefix: "", permissions: [read, write]}]\n'
    )
    header = f'wrk.headers["Authorization"] = "Bearer {AUTH_TOKEN}"\n'
    scripts = {
        False: (write_lua(logdir, "fixed", LUA_FIXED), write_lua(logdir, "rest_put", LUA_REST_PUT)),
        True: (
            write_lua(logdir, "auth_fixed", header + LUA_FIXED),
            write_lua(logdir, "auth_put", header + LUA_REST_PUT),
        ),
    }
    # req/s ratios, and server-CPU-per-request ratios (without / under auth): the
    # second stays put when other work on the machine moves the first.
    ratios: dict[str, list[float]] = {"get": [], "put": [], "get_cpu": [], "put_cpu": []}
    for pair in range(pairs):
        got: dict[tuple[bool, str], float] = {}
        for auth in (False, True) if pair % 2 == 0 else (True, False):  # alternate who goes first
            port = free_port()
            argv = node_argv("n1", port, {"n1": port})
            if auth:
                argv += ["--auth-file", str(users), "--cluster-token", "bench-cluster-token"]
            url = f"http://{HOST}:{port}"
            tag = "auth" if auth else "plain"
            with serving(f"single-{tag}-{pair}", argv, health_urls=[url], logdir=logdir) as node:
                wait_ready([url], servers=[node])
                conn = http.client.HTTPConnection(HOST, port, timeout=5)
                conn.request(
                    "PUT", "/kv/" + HOT_KEY, body=VALUE.encode(), headers={"authorization": f"Bearer {AUTH_TOKEN}"}
                )
                status = conn.getresponse().status
                conn.close()
                assert status == 204, f"seeding the {tag} node answered {status}"
                get_lua, put_lua = scripts[auth]
                label = "under auth (bearer token)" if auth else "without auth"
                get = measure(
                    f"{tag}_kv_get_{pair}",
                    f"1 node GET /kv/{{key}} {label}",
                    f"{url}/kv/{HOT_KEY}",
                    get_lua,
                    node.pids(),
                )
                put = measure(f"{tag}_kv_put_{pair}", f"1 node PUT /kv/{{key}} {label}", url, put_lua, node.pids())
                got[auth, "get"], got[auth, "put"] = get.rps, put.rps
                got[auth, "get_cpu"], got[auth, "put_cpu"] = get.cpu_us_per_request, put.cpu_us_per_request
        for method in ("get", "put"):
            ratios[method].append(got[True, method] / got[False, method])
            ratios[f"{method}_cpu"].append(got[False, f"{method}_cpu"] / got[True, f"{method}_cpu"])
    return ratios


def check_auth(ratios: dict[str, list[float]]) -> bool:
    """The target is on req/s; the CPU-per-request ratio beside it tells a
    slower path from a noisy neighbour (a req/s miss with a CPU ratio >= the
    target is the machine, not the code: rerun)."""
    ok = True
    print("\naccess control (under auth / without, same run, alternated pairs):")
    for method in ("get", "put"):
        for key, what in ((method, "req/s"), (f"{method}_cpu", "CPU/req")):
            values = ratios[key]
            median = statistics.median(values)
            shown = ", ".join(f"{value:.3f}" for value in values)
            verdict = ""
            if key == method:
                met = median >= TARGETS["auth"]
                ok &= met
                verdict = f"  target >= {TARGETS['auth']}x  {'met' if met else 'MISSED'}"
            print(f"  {method.upper():<4} {what:<8} median {median:.3f}x ({shown}){verdict}")
    return ok


def measure_console(
    logdir: Path, measure: Callable[..., Result], *, pairs: int
) -> tuple[dict[str, list[tuple[float, float]]], float]:
    """A three-node cluster measured without and with a console polling node1,
    `pairs` times (each pair back to back, the order alternated, so drift
    hits both alike): ({"get"|"put": [(req/s ratio, CPU/req ratio), ...]},
    each with / without), and the CPU seconds one poll costs the cluster."""
    spread_get = write_lua(logdir, "console_spread_get", LUA_SPREAD_GET)
    spread_put = write_lua(logdir, "console_spread_put", LUA_SPREAD_PUT)
    base = free_port_run(3)
    urls = [f"http://{HOST}:{base + i}" for i in range(3)]
    argv = [PYTHON, "-m", "app", "cluster", "--nodes", "3", "--base-port", str(base), "--host", HOST]
    ratios: dict[str, list[tuple[float, float]]] = {"get": [], "put": []}
    with serving("console-cluster", argv, health_urls=urls, logdir=logdir) as cluster:
        wait_ready(urls, servers=[cluster])
        for i in range(SPREAD_KEYS):
            put_seed(urls[0], f"s{i}")
        pids = cluster.pids()
        cost = poll_cost(urls[0], "s0", pids)
        for pair in range(pairs):
            got: dict[tuple[bool, str], Result] = {}
            for console in (False, True) if pair % 2 == 0 else (True, False):
                label = "console polling" if console else "no console"
                with ExitStack() as stack:
                    polled = stack.enter_context(console_polling(urls[0], "s0")) if console else None
                    for method, lua, url in (
                        ("get", spread_get, urls[0] + "/get?key=s0"),
                        ("put", spread_put, urls[0]),
                    ):
                        got[console, method] = measure(
                            f"console_{method}_{console}_{pair}",
                            f"3-node cluster {method.upper()} via node1, {label}",
                            url,
                            lua,
                            pids,
                        )
                if polled is not None:
                    print(f"    console: {polled['polls']} polls, {polled['failed']} failed requests", flush=True)
            for method in ratios:
                without, with_console = got[False, method], got[True, method]
                cpu = with_console.cpu_us_per_request / without.cpu_us_per_request if without.requests else 0.0
                ratios[method].append((with_console.rps / without.rps, cpu))
    return ratios, cost


def report_console(ratios: dict[str, list[tuple[float, float]]], cost: float) -> None:
    print("\nweb console polling node1 / no console (3-node cluster, same run, alternated pairs):")
    for method, pairs in ratios.items():
        rps = statistics.median(r for r, _ in pairs)
        cpu = statistics.median(c for _, c in pairs)
        shown = ", ".join(f"{r:.3f}/{c:.3f}" for r, c in pairs)
        print(f"  {method.upper():<4} req/s median x{rps:.3f}, server CPU/req median x{cpu:.3f}  (pairs: {shown})")
    print(
        f"  one poll (overview + key lookup) costs the three nodes {cost * 1000:.1f} ms of CPU in all"
        f" (mean of {POLL_COST_SAMPLES}, idle cluster): {cost / CONSOLE_POLL_S:.2%} of one core"
        f" at one poll every {CONSOLE_POLL_S:g} s"
    )


def references(results: dict[str, Result]) -> tuple[float, float]:
    """(bare GET, bare PUT) req/s. GET is the higher of the two bare runs, so a
    slowdown during the run can only lower the ratios, never flatter them."""
    bare_get = max(results["bare_get"].rps, results["bare_get_again"].rps)
    return bare_get, results["bare_put"].rps


def print_report(results: dict[str, Result], *, markdown: bool, duration: float) -> None:
    bare_get, bare_put = references(results)
    bare_cpu = {"get": results["bare_get"].cpu_us_per_request, "put": results["bare_put"].cpu_us_per_request}
    headers = [
        "scenario",
        "req/s",
        "p50 ms",
        "p99 ms",
        "x bare GET",
        "x bare same method",
        "server CPU us/req",
        "CPU x bare",
        "server core busy",
        "errors",
    ]
    rows = []
    for key, result in results.items():
        method = "put" if "put" in key else "get"
        same = bare_put if method == "put" else bare_get
        cpu_ratio = bare_cpu[method] / result.cpu_us_per_request if result.cpu_us_per_request else 0.0
        rows.append(
            [
                result.label,
                f"{result.rps:,.0f}",
                f"{result.p50_ms:.2f}",
                f"{result.p99_ms:.2f}",
                f"{result.rps / bare_get:.2f}",
                f"{result.rps / same:.2f}",
                f"{result.cpu_us_per_request:.0f}",
                f"{cpu_ratio:.2f}",
                f"{result.server_core_busy:.0%}",
                str(result.errors),
            ]
        )
    print()
    print(format_table(headers, rows, markdown=markdown))
    print(
        f"\n({duration:g} s per run after a warm-up; ratios divide by the bare-ASGI figure of this run,"
        " GET by the higher of its two runs. 'CPU x bare' = bare CPU per request / this CPU per request:"
        " the same ratio from CPU time, steadier when other work shares the machine. A server core busy"
        " well under 100% means the server was starved of load or of CPU by other work: rerun)"
    )


def check_targets(results: dict[str, Result]) -> bool:
    bare_get, bare_put = references(results)
    checks = [
        ("single-node GET /get", results["get"].rps / bare_get, TARGETS["get"]),
        ("single-node GET /kv", results["kv_get"].rps / bare_get, TARGETS["get"]),
        ("single-node PUT /put", results["put"].rps / bare_put, TARGETS["put"]),
        ("single-node PUT /kv", results["kv_put"].rps / bare_put, TARGETS["put"]),
        ("GET via non-owner", results["hop"].rps / bare_get, TARGETS["hop"]),
    ]
    if "https_kv_get" in results:
        checks.append(
            ("HTTPS GET / plain GET", results["https_kv_get"].rps / results["kv_get"].rps, TARGETS["https_get"])
        )
    ok = True
    print("\ntargets (data path vs bare ASGI):")
    for name, ratio, target in checks:
        met = ratio >= target
        ok &= met
        print(f"  {name:<22} {ratio:5.2f}x  target >= {target}x  {'met' if met else 'MISSED'}")
    starved = [r.label for r in results.values() if r.server_core_busy < 0.85]
    if starved:
        print(f"  WARNING: server core under 85% busy in: {', '.join(starved)} (machine contention? rerun)")
    bad = [r.label for r in results.values() if r.errors]
    if bad:
        print(f"  errors (socket errors or non-2xx) in: {', '.join(bad)}")
        ok = False
    return ok


if __name__ == "__main__":
    sys.exit(main())
