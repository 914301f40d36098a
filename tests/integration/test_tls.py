"""Encryption in transit, with real certificates (tests/harness/certs.py) and
real node processes: a mutual-TLS cluster under a crash, a node from a
foreign CA, plaintext and certificate-less clients, and a rotation of every
file without a restart.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from app.web.server import ROTATION_GRACE_S
from tests.harness.certs import Authority, Issued, client_context, node_flags, tls_mode, write_secret
from tests.harness.processes import Cluster, NodeProcess, TlsMode
from tests.integration.history import Load, check, observe, success_ratio
from tests.integration.probes import admin_get, unreachable_peers, wait_converged, wait_for
from tests.integration.test_faults import KEYS, MIN_ACKNOWLEDGED, NODE_ARGS, REJOIN_WITHIN_S, TOKEN, N, owners_in

pytestmark = pytest.mark.slow

MakeCluster = Callable[..., Cluster]
StartLoad = Callable[..., Load]
RELOAD_INTERVAL_S = 0.2  # --tls-reload-interval in the rotation test
PEER_TIMEOUT_S = 0.5  # NODE_ARGS' --peer-timeout
# The documented bound: new connections use new files within one reload interval;
# pooled and accepted connections made before end within one more request (a peer timeout).
ROTATION_BOUND_S = RELOAD_INTERVAL_S + PEER_TIMEOUT_S
ROTATION_SLACK_S = 3.0  # a loaded CI box schedules late; the bound itself is asserted on the metric below
SHORT_ARGS = ["--replication-factor", str(N), "--peer-timeout", str(PEER_TIMEOUT_S), "--cluster-token", TOKEN]


def served_serial(host: str, port: int, context: ssl.SSLContext) -> int:
    """The serial number of the certificate a new TLS connection is served."""
    with (
        socket.create_connection((host, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def handshake_refused(url: str, context: ssl.SSLContext) -> str | None:
    """The error a request over `context` meets, or None if it is answered.
    (Under TLS 1.3 the server judges the client certificate after the client
    thinks the handshake is done, so the refusal may surface on the first read.)"""
    try:
        httpx.get(url + "/health", verify=context, timeout=5).raise_for_status()
    except (httpx.TransportError, ssl.SSLError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def ring_errors(url: str, context: ssl.SSLContext) -> dict[str, str]:
    """{member: last_error} of the members one node sees as unreachable."""
    members = admin_get(url, "/ring", verify=context)["members"]
    return {m["node_id"]: m["last_error"] or "" for m in members if not m["reachable"]}


def wait_ring_shows_tls_refusal(url: str, context: ssl.SSLContext, peer: str, *, what: str) -> None:
    """Until the node at url shows peer unreachable because its certificate failed verification."""

    def shown() -> str | None:
        errors = ring_errors(url, context)
        return None if "certificate verify failed" in errors.get(peer, "") else f"{url}/ring: {errors}"

    wait_for(shown, timeout=15, what=what)


def test_mutual_tls_cluster_loses_nothing_under_a_crash(
    make_cluster: MakeCluster, start_load: StartLoad, tmp_path: Path
) -> None:
    tls = tls_mode(tmp_path / "tls")
    cluster = make_cluster(3, args=NODE_ARGS, durable=True, tls=tls)
    assert all(url.startswith("https://") for url in cluster.direct_peers.values())
    load = start_load(
        urls=list(cluster.direct_peers.values()), keys=KEYS, clients=6, name="tls-crash", verify=tls.context
    )
    load.run_for(2.0, min_ops=300)

    victim = cluster.node("node3")
    fault_started = time.monotonic()
    victim.kill()
    load.run_for(3.0, min_ops=400)
    victim.start().wait_ready()
    load.run_for(3.0, min_ops=400)
    fault_ended = time.monotonic()
    ops = load.stop()

    ratio, requests = success_ratio(ops, since=fault_started, until=fault_ended)
    failures = [op.error for op in ops if op.outcome != "ok" and op.during(fault_started, fault_ended)]
    assert ratio >= 0.99, f"{ratio:.2%} of {requests} requests succeeded during the crash; e.g. {failures[:5]}"
    wait_for(
        lambda: unreachable_peers(cluster.running_urls(), expect=cluster.direct_peers, verify=tls.context),
        timeout=REJOIN_WITHIN_S,
        what="every node sees every node reachable over mutual TLS",
    )
    wait_converged(
        cluster.direct_peers, KEYS, owners=owners_in(cluster.direct_peers), token=TOKEN, timeout=30, verify=tls.context
    )
    verdict = check(ops, observe(cluster.direct_peers, KEYS, verify=tls.context))
    print(verdict.summary())
    assert verdict.acknowledged >= MIN_ACKNOWLEDGED, verdict.summary()
    assert verdict.lost == 0, verdict.summary()


def test_a_node_from_a_foreign_ca_cannot_join_and_the_ring_says_why(make_cluster: MakeCluster, tmp_path: Path) -> None:
    ours, foreign = Authority.create("our-ca"), Authority.create("foreign-ca")
    root = tmp_path / "tls"

    def node_args(node_id: str) -> list[str]:
        ca = foreign if node_id == "node3" else ours
        directory = root / node_id
        if not (directory / "tls.crt").exists():
            write_secret(directory, issued=ca.issue(node_id, ips=("127.0.0.1",)), ca_pem=ca.cert_pem)
        return node_flags(directory)

    # The test's own client trusts both CAs and presents no certificate, so it can watch both sides.
    watcher = ssl.create_default_context(cadata=(ours.cert_pem + foreign.cert_pem).decode())
    cluster = make_cluster(3, args=SHORT_ARGS, tls=TlsMode(node_args=node_args, context=watcher), unready=["node3"])
    node1, node3 = cluster.node("node1"), cluster.node("node3")

    # Writes through node1 replicate to every owner (N=3), so node1 calls node3 and fails.
    for i in range(5):
        httpx.put(f"{node1.url}/kv/foreign-{i}", content=b"v", verify=watcher, timeout=5)

    wait_ring_shows_tls_refusal(node1.url, watcher, "node3", what="node1 shows node3 refused over TLS")
    reason = ring_errors(node1.url, watcher)["node3"]
    assert "refused over TLS" in reason, reason
    assert "node2" not in ring_errors(node1.url, watcher)  # the peers of one CA still see each other

    # node3 sees its would-be peers fail the same way, and is refused when it presents its certificate.
    httpx.put(f"{node3.url}/kv/from-node3", content=b"v", verify=watcher, timeout=5)
    wait_ring_shows_tls_refusal(node3.url, watcher, "node1", what="node3 shows node1 refused over TLS")
    foreign_client = client_context(root / "node3")
    foreign_client.load_verify_locations(cadata=ours.cert_pem.decode())  # even trusting our CA, it is refused
    refusal = handshake_refused(node1.url, foreign_client)
    assert refusal is not None, "node1 accepted a certificate from a foreign CA"
    print(f"node3's certificate at node1: {refusal}")


def test_a_node_back_with_a_foreign_certificate_is_reported_by_the_prober(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    """node3 crashes (its peers see it down: connection refused) and comes back
    with a certificate of another CA: the prober that asks a down peer whether it
    is back is what finds out, and /ring says why, with no client traffic."""
    ours, foreign = Authority.create("our-ca"), Authority.create("foreign-ca")
    root = tmp_path / "tls"

    def node_args(node_id: str) -> list[str]:
        directory = root / node_id
        if not (directory / "tls.crt").exists():
            write_secret(directory, issued=ours.issue(node_id, ips=("127.0.0.1",)), ca_pem=ours.cert_pem)
        return node_flags(directory)

    watcher = ssl.create_default_context(cadata=(ours.cert_pem + foreign.cert_pem).decode())
    cluster = make_cluster(3, args=SHORT_ARGS, tls=TlsMode(node_args=node_args, context=watcher))
    node1, node3 = cluster.node("node1"), cluster.node("node3")
    node3.kill()
    for i in range(5):  # replica writes to node3 fail: node1 marks it down
        httpx.put(f"{node1.url}/kv/while-down-{i}", content=b"v", verify=watcher, timeout=5)
    wait_for(
        lambda: None if "node3" in ring_errors(node1.url, watcher) else "node3 still up",
        timeout=15,
        what="node1 sees node3 down",
    )
    assert "TLS" not in ring_errors(node1.url, watcher)["node3"]
    write_secret(root / "node3", issued=foreign.issue("node3", ips=("127.0.0.1",)), ca_pem=foreign.cert_pem)
    node3.start().wait_serving()
    wait_ring_shows_tls_refusal(node1.url, watcher, "node3", what="node1's prober reports node3's foreign certificate")


def test_plaintext_and_certificateless_clients_are_refused_cleanly(make_cluster: MakeCluster, tmp_path: Path) -> None:
    tls = tls_mode(tmp_path / "tls", client_cert_auth=True)
    cluster = make_cluster(1, args=SHORT_ARGS, tls=tls)
    node = cluster.node("node1")
    lines_before = len(node.log_path.read_text().splitlines())

    # Plain HTTP to the TLS port: no HTTP answer, the connection is closed.
    for _ in range(3):
        conn = http.client.HTTPConnection(node.host, node.port, timeout=5)
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError, http.client.BadStatusLine)):
            conn.request("GET", "/health")
            conn.getresponse()
        conn.close()
    # No client certificate under --client-cert-auth: the handshake is refused.
    anonymous = ssl.create_default_context(cafile=str(tmp_path / "tls" / "client" / "ca.crt"))
    assert handshake_refused(node.url, anonymous) is not None, "a client without a certificate was served"

    # The node kept serving, and said at most one line about it all.
    assert httpx.get(node.url + "/health", verify=tls.context, timeout=5).status_code == 200
    new_lines = node.log_path.read_text().splitlines()[lines_before:]
    assert len(new_lines) <= 1, new_lines

    # The CLI: --cacert/--cert/--key (or their env vars) get through; without a certificate it is refused.
    secret = tmp_path / "tls" / "client"
    flags = ["--url", node.url, "--cacert", str(secret / "ca.crt"), "--cert", str(secret / "tls.crt")]
    put = kvstore("put", "cli-key", "cli-value", *flags, "--key", str(secret / "tls.key"))
    assert put.returncode == 0, put.stderr
    env = {"KVSTORE_URL": node.url, "KVSTORE_CACERT": str(secret / "ca.crt"), "KVSTORE_CERT": str(secret / "tls.crt")}
    got = kvstore("get", "cli-key", env=env | {"KVSTORE_KEY": str(secret / "tls.key")})
    assert (got.returncode, got.stdout.strip()) == (0, "cli-value"), got.stderr
    refused = kvstore("get", "cli-key", "--url", node.url, "--cacert", str(secret / "ca.crt"))
    assert refused.returncode == 1 and "cannot reach" in refused.stderr, refused.stderr
    unverified = kvstore("get", "cli-key", "--url", node.url)  # the system CAs do not know the test CA
    assert unverified.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in unverified.stderr, unverified.stderr

    # backup and restore take the same options: a backup over TLS, restored onto the same data, applies nothing.
    cli_env = env | {"KVSTORE_KEY": str(secret / "tls.key"), "KVSTORE_CLUSTER_TOKEN": TOKEN}
    backup_file = tmp_path / "over-tls.kvbak"
    backup = kvstore("backup", "-o", str(backup_file), env=cli_env)
    assert backup.returncode == 0, backup.stderr
    assert json.loads(backup.stdout.splitlines()[-1])["records"] == 1
    restore = kvstore("restore", str(backup_file), env=cli_env)
    assert restore.returncode == 0, restore.stderr
    restored = json.loads(restore.stdout.splitlines()[-1])
    assert (restored["records"], restored["applied"]) == (1, 0), restored
    unverified_backup = kvstore("backup", "-o", str(tmp_path / "refused.kvbak"), "--url", node.url, "--token", TOKEN)
    assert unverified_backup.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in unverified_backup.stderr


def kvstore(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The `kvstore` client command, run as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_internal_routes_need_a_node_certificate_under_peer_tls(make_cluster: MakeCluster, tmp_path: Path) -> None:
    tls = tls_mode(tmp_path / "tls")
    cluster = make_cluster(1, args=SHORT_ARGS, tls=tls)
    url = cluster.node("node1").url + "/internal/v1/kv/some-key"
    anonymous = ssl.create_default_context(cafile=str(tmp_path / "tls" / "client" / "ca.crt"))
    # A client without a certificate is served on client routes, not on internal ones, token or not.
    assert httpx.get(cluster.node("node1").url + "/kv/some-key", verify=anonymous, timeout=5).status_code == 404
    refused = httpx.get(url, headers={"x-kvstore-token": TOKEN}, verify=anonymous, timeout=5)
    assert refused.status_code == 403, refused.text
    assert "node certificate" in refused.json()["error"]
    # With a certificate the CA signed, the token is still the second factor.
    assert httpx.get(url, verify=tls.context, timeout=5).status_code == 401
    assert httpx.get(url, headers={"x-kvstore-token": TOKEN}, verify=tls.context, timeout=5).status_code == 404


def metric(url: str, name: str, context: ssl.SSLContext) -> float:
    text = httpx.get(url + "/metrics", verify=context, timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_rotation_to_a_new_ca_without_restart(make_cluster: MakeCluster, tmp_path: Path) -> None:
    old_ca, new_ca = Authority.create("old-ca"), Authority.create("new-ca")
    root = tmp_path / "tls"
    old: dict[str, Issued] = {}

    def node_args(node_id: str) -> list[str]:
        directory = root / node_id
        if node_id not in old:
            old[node_id] = old_ca.issue(node_id, ips=("127.0.0.1",))
            write_secret(directory, issued=old[node_id], ca_pem=old_ca.cert_pem)
        return [*node_flags(directory), "--tls-reload-interval", str(RELOAD_INTERVAL_S)]

    both = (old_ca.cert_pem + new_ca.cert_pem).decode()
    watcher = ssl.create_default_context(cadata=both)  # verifies either CA, presents nothing
    cluster = make_cluster(3, args=SHORT_ARGS, tls=TlsMode(node_args=node_args, context=watcher))
    node1, node3 = cluster.node("node1"), cluster.node("node3")
    for i in range(20):  # traffic between the nodes, so their pools hold connections of the old certificates
        assert httpx.put(f"{node1.url}/kv/before-{i}", content=b"v", verify=watcher, timeout=5).status_code == 204
    assert served_serial(node1.host, node1.port, watcher) == old["node1"].serial
    handshakes_before = metric(node1.url, 'kvstore_tls_handshakes_total{side="client"}', watcher)

    # Step 1: node1 and node2 move to certificates of the new CA; every node trusts both.
    # node3 keeps its old certificate, trusting both too.
    new: dict[str, Issued] = {}
    swapped = time.monotonic()
    for node_id in ("node1", "node2", "node3"):
        issued = new[node_id] = new_ca.issue(node_id, ips=("127.0.0.1",)) if node_id != "node3" else old[node_id]
        write_secret(root / node_id, issued=issued, ca_pem=(old_ca.cert_pem + new_ca.cert_pem))
    took = wait_for(
        lambda: (
            None
            if served_serial(node1.host, node1.port, watcher) == new["node1"].serial
            else "node1 still serves its old certificate"
        ),
        timeout=ROTATION_BOUND_S + ROTATION_SLACK_S,
        what="new connections get the new certificate",
        interval=0.05,
    )
    print(f"new certificate served {time.monotonic() - swapped:.2f}s after the swap (checked in {took:.2f}s)")
    for node in cluster.nodes:

        def reloaded(node: NodeProcess = node) -> str | None:
            if metric(node.url, 'kvstore_tls_reloads_total{result="ok"}', watcher) >= 1:
                return None
            return f"{node.node_id} has not reloaded"

        wait_for(reloaded, timeout=ROTATION_BOUND_S + ROTATION_SLACK_S, what="every node reloads its files")
    # The cluster keeps working across the change, old and new certificates mixed.
    for i in range(20):
        url = cluster.nodes[i % 3].url
        assert httpx.put(f"{url}/kv/during-{i}", content=b"v", verify=watcher, timeout=5).status_code == 204
    # node1's pooled peer connections were cycled: it opened new ones, with its new certificate.
    assert metric(node1.url, 'kvstore_tls_handshakes_total{side="client"}', watcher) > handshakes_before
    assert unreachable_peers(cluster.running_urls(), expect=cluster.direct_peers, verify=watcher) is None

    # Step 2: node1 and node2 drop the old CA. node3, still presenting the old certificate, is refused.
    for node_id in ("node1", "node2"):
        write_secret(root / node_id, issued=new[node_id], ca_pem=new_ca.cert_pem)
    old_client = ssl.create_default_context(cadata=both)
    old_client.load_cert_chain(*_files(tmp_path / "old-node3", old["node3"]))
    new_client = ssl.create_default_context(cadata=both)
    new_client.load_cert_chain(*_files(tmp_path / "new-node1", new["node1"]))
    wait_for(
        lambda: None if handshake_refused(node1.url, old_client) else "node1 still accepts the old CA",
        timeout=ROTATION_BOUND_S + ROTATION_SLACK_S,
        what="the old CA is no longer trusted",
        interval=0.05,
    )
    assert handshake_refused(node1.url, new_client) is None  # a certificate of the new CA still is
    for i in range(10):
        httpx.put(f"{node1.url}/kv/after-{i}", content=b"v", verify=watcher, timeout=5)
    wait_ring_shows_tls_refusal(node1.url, watcher, "node3", what="node1 refuses node3's old certificate and says why")
    assert "node2" not in ring_errors(node1.url, watcher)
    assert node3.running


def _files(directory: Path, issued: Issued) -> tuple[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tls.crt").write_bytes(issued.cert_pem)
    (directory / "tls.key").write_bytes(issued.key_pem)
    return str(directory / "tls.crt"), str(directory / "tls.key")


def test_a_connection_open_at_a_rotation_answers_its_next_request_then_closes(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    """Connections accepted before a rotation end, but never by dropping a
    request: one already handshaken (idle, as every fresh connection is until
    its request is parsed) answers its next request with `connection: close`;
    one that sends nothing is closed after the grace. CI once saw a request
    on a fresh connection dropped by the rotation."""
    ca = Authority.create("rotation-ca")
    directory = tmp_path / "tls" / "node1"
    write_secret(directory, issued=ca.issue("node1", ips=("127.0.0.1",)), ca_pem=ca.cert_pem)
    context = ssl.create_default_context(cadata=ca.cert_pem.decode())

    def node_args(node_id: str) -> list[str]:
        return [*node_flags(directory), "--tls-reload-interval", str(RELOAD_INTERVAL_S)]

    node = make_cluster(1, args=SHORT_ARGS, tls=TlsMode(node_args=node_args, context=context)).node("node1")
    held, idle = (http.client.HTTPSConnection(node.host, node.port, context=context, timeout=5) for _ in range(2))
    held.connect()
    idle.connect()  # both handshaken, nothing sent yet

    write_secret(directory, issued=ca.issue("node1", ips=("127.0.0.1",)), ca_pem=ca.cert_pem)
    wait_for(
        lambda: None if metric(node.url, 'kvstore_tls_reloads_total{result="ok"}', context) >= 1 else "no reload yet",
        timeout=ROTATION_BOUND_S + ROTATION_SLACK_S,
        what="the node reloads its files",
    )
    held.request("GET", "/health")
    answer = held.getresponse()
    assert (answer.status, answer.read()) == (200, b"OK")
    assert answer.getheader("connection") == "close"

    assert idle.sock is not None
    idle.sock.settimeout(ROTATION_GRACE_S + ROTATION_SLACK_S)
    try:
        closed = idle.sock.recv(1) == b""
    except TimeoutError:
        closed = False
    except OSError:  # a reset or an unclean TLS close is a close too
        closed = True
    assert closed, "the idle connection was still open after the grace"
    held.close()
    idle.close()
