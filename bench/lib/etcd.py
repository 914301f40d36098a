"""A 3-member etcd on loopback for the cluster benchmark's reference section
(cluster_etcd.py): Debian's etcd-server, each member with its own data dir,
pinned to the server core like our nodes and stopped like them
(common.serving); and the wrk Lua that drives its JSON gateway with keys
and values of our shape.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench.lib.cluster_nodes import VALUE
from bench.lib.common import Server, http_request, serving
from tests.harness.processes import free_port_run

HOST = "127.0.0.1"
MEMBERS = 3
ETCD_READY_TIMEOUT_S = 30.0  # a raft election plus WAL creation; usually ~2 s
ETCD_HINT = (
    "bench: etcd not found. Install Debian's etcd server:\n"
    "    sudo apt-get update && sudo apt-get install -y etcd-server\n"
    "(the package installs a systemd unit too; this bench starts its own members on free loopback ports)"
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def etcd_key(i: int) -> bytes:
    """'key' + 6 digits: 9 bytes, so its base64 is three independent 4-char groups
    and the Lua scripts can build it from a 1,000-entry table."""
    return b"key%03d%03d" % (i // 1000 % 1000, i % 1000)


def etcd_lua(path: str, keyspace: int, extra_json: str) -> str:
    table = ",".join(f'"{b64(b"%03d" % n)}"' for n in range(1000))
    value = f',"value":"{b64(VALUE)}"' if path.endswith("put") else ""
    return f"""
local t = {{[0]={table}}}
local counter = 0
request = function()
  counter = counter + 1
  local i = counter % {keyspace}
  local key = "{b64(b"key")}" .. t[math.floor(i / 1000) % 1000] .. t[i % 1000]
  local body = '{{"key":"' .. key .. '"{value}{extra_json}}}'
  return wrk.format("POST", "{path}", {{["Content-Type"] = "application/json"}}, body)
end
"""


def etcd_post(url: str, path: str, body: str) -> tuple[int, bytes]:
    return http_request(url, "POST", path, body.encode())


@contextmanager
def etcd_cluster(logdir: Path) -> Iterator[tuple[list[str], list[Server]]]:
    base = free_port_run(2 * MEMBERS)  # client ports, then peer ports
    client = [f"http://{HOST}:{base + i}" for i in range(MEMBERS)]
    peer = [f"http://{HOST}:{base + MEMBERS + i}" for i in range(MEMBERS)]
    initial = ",".join(f"m{i + 1}={peer[i]}" for i in range(MEMBERS))
    with ExitStack() as stack:
        servers = []
        for i in range(MEMBERS):
            argv = [
                "etcd",
                "--name",
                f"m{i + 1}",
                "--data-dir",
                str(logdir / f"etcd-m{i + 1}"),
                "--listen-client-urls",
                client[i],
                "--advertise-client-urls",
                client[i],
                "--listen-peer-urls",
                peer[i],
                "--initial-advertise-peer-urls",
                peer[i],
                "--initial-cluster",
                initial,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                f"kvstore-bench-{base}",
                "--logger",
                "zap",
                "--log-level",
                "error",
            ]
            server = stack.enter_context(serving(f"etcd-m{i + 1}", argv, health_urls=[], logdir=logdir))
            server.url = client[i]
            servers.append(server)
        deadline = time.monotonic() + ETCD_READY_TIMEOUT_S
        for url in client:
            while True:
                status, body = http_request(url, "GET", "/health")
                if status == 200 and b'"true"' in body:
                    break
                for server in servers:
                    if server.proc.poll() is not None:
                        raise RuntimeError(f"bench: {server.name} exited:\n{server.log_tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"bench: etcd member {url} not healthy in {ETCD_READY_TIMEOUT_S:.0f} s: {status} {body[:200]!r}"
                    )
                time.sleep(0.2)
        yield client, servers
