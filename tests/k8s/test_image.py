"""The image, built from the Dockerfile with podman (scripts/image.py) and run as
the chart runs it: every container gets the env, securityContext, read-only root
and volumes of the StatefulSet `helm template` renders (tests/k8s/pods.py), the
chart's in-cluster configuration (a mounted service-account token and ca.crt,
KUBERNETES_SERVICE_HOST/PORT), and the Kubernetes API double (kube_api.py) behind
TLS. Each pod is a container on its own 127.0.0.x with --network host.

The chart's defaults include access control: each pod mounts the users file from
the Secret the chart renders (KVSTORE_AUTH_FILE), the test's clients send the
chart's admin token, readiness is asked on the ops listener as the probes do,
and a request without the token is refused.

Covered: one pod (serves, healthy by its HEALTHCHECK, read-only root, keeps its
data across a new container, stops within the grace period); three pods forming
one ring through the API, scaled 3 -> 4 -> 3 with every key kept at three copies
and the leaving pod handing off before it exits; and the start-up failures a
user meets, each one line naming the setting to fix: an unwritable volume (no
fsGroup), no service-account token (automountServiceAccountToken: false), and an
untrusted or unreachable API server (the pod stays up and unready, the reason in
/ready). What the kubelet does that this does not is listed in pods.py.

Run by `make test` and `make image-test`; a missing podman/buildah/runc/debootstrap
fails (never skips): `make container-tools` installs them.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.probes import membership_disagreement, read_replicas, rebalancing_left, wait_for
from tests.k8s.chart import REPO, Render
from tests.k8s.kube_api import KubeAPI
from tests.k8s.pods import (
    IMAGE_SCRIPT,
    Kubelet,
    Pki,
    Pod,
    PodTemplate,
    TlsFront,
    make_pki,
    podman,
    remove_orphans,
    write_service_account,
)
from tests.k8s.test_discovery import free_port_on

API_HOST = "127.0.0.60"  # the API server's TLS front (kubernetes.default.svc)
POD_HOSTS = {ordinal: f"127.0.0.{61 + ordinal}" for ordinal in range(4)}  # kv-kvstore-0 .. -3
READY_TIMEOUT_S = 30.0  # a container is ready in ~0.5 s; the ring forms within a watch round
SETTLE_TIMEOUT_S = 60.0  # rebalancing after a join
FAIL_TIMEOUT_S = 30.0  # a start-up failure exits in well under a second
UNREADY_TIMEOUT_S = 20.0  # the first failed list is reported within a connect timeout
KEYS = 60
RUN_FLAGS = ("--rm", "--network", "host", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")


@pytest.fixture(scope="session")
def image() -> str:
    missing = IMAGE_SCRIPT.missing_tools()
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run `make container-tools` (make test does)", pytrace=False)
    IMAGE_SCRIPT.build_image()
    remove_orphans()  # a run killed before its finalizers (SIGKILL, power loss) leaves containers
    return IMAGE_SCRIPT.IMAGE


@pytest.fixture(scope="session")
def port() -> int:
    return free_port_on([API_HOST, *POD_HOSTS.values()])


@pytest.fixture(scope="session")
def ops_port(port: int) -> int:
    """The pods' ops listener port (the chart's opsPort), free too and not the data port."""
    while (found := free_port_on(list(POD_HOSTS.values()))) == port:
        pass
    return found


def pod_values(port: int, ops_port: int, *more: str) -> list[str]:
    return [f"containerPort={port}", f"opsPort={ops_port}", *more]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki", server_ip=API_HOST)


@pytest.fixture
def api(pki: Pki) -> Iterator[tuple[KubeAPI, TlsFront]]:
    """kmock on 127.0.0.1, and its TLS front on API_HOST with the pki's server certificate."""
    kube = KubeAPI().start()
    front = TlsFront(host=API_HOST, upstream=(kube.host, kube.port or 0), pki=pki)
    try:
        front.start()
        yield kube, front
    finally:
        front.close()
        kube.close()


def kubelet_for(
    docs: list[dict], *, image: str, tmp_path: Path, api: tuple[KubeAPI, TlsFront] | None, ca_crt: Path | None
) -> Kubelet:
    template = PodTemplate.from_docs(docs)
    kubelet = Kubelet(template=template, image=image, workdir=tmp_path, hosts=POD_HOSTS)
    if api is not None:
        kubelet.api_host, kubelet.api_port = api[1].host, api[1].port
    if ca_crt is not None:
        kubelet.service_account = write_service_account(
            tmp_path / "serviceaccount", namespace=template.namespace, ca_crt=ca_crt
        )
    return kubelet


@pytest.fixture
def make_kubelet(image: str, tmp_path: Path) -> Iterator[Callable[..., Kubelet]]:
    """make_kubelet(docs, api=..., ca_crt=...) -> a Kubelet whose containers are all removed at the end."""
    made: list[Kubelet] = []

    def make(docs: list[dict], *, api: tuple[KubeAPI, TlsFront] | None = None, ca_crt: Path | None = None) -> Kubelet:
        kubelet = kubelet_for(docs, image=image, tmp_path=tmp_path / f"k{len(made)}", api=api, ca_crt=ca_crt)
        made.append(kubelet)
        return kubelet

    try:
        yield make
    finally:
        for kubelet in made:
            kubelet.close()


# -- helpers ------------------------------------------------------------------------


def create_statefulset(api: KubeAPI, template: PodTemplate, replicas: int) -> None:
    api.create_statefulset(
        namespace=template.namespace,
        name=template.statefulset,
        replicas=replicas,
        service=template.service,
        labels=template.labels,
    )


def start_pod(kubelet: Kubelet, *, api: KubeAPI, ordinal: int) -> Pod:
    """The StatefulSet controller creates the pod object (not ready), the kubelet runs its container."""
    t = kubelet.template
    api.create_pod(namespace=t.namespace, name=t.pod_name(ordinal), labels=t.labels, ready=False)
    return kubelet.run(ordinal)


def ready_reason(pod: Pod) -> str | None:
    """What the chart's readiness probe sees: /ready on the ops listener."""
    try:
        resp = httpx.get(pod.ops_url + "/ready", timeout=2.0)
    except httpx.HTTPError as exc:
        return f"{pod.name}: {type(exc).__name__}"
    return None if resp.status_code == 200 else f"{pod.name}: {resp.status_code} {resp.text[:1000]}"


def mark_ready(kubelet: Kubelet, *, api: KubeAPI, pod: Pod) -> None:
    """The readiness probe passes (/ready 200), so the pod's Ready condition turns True."""

    def check() -> str | None:
        if not pod.running():
            return f"{pod.name} exited:\n{pod.logs()}"
        return ready_reason(pod)

    try:
        wait_for(check, timeout=READY_TIMEOUT_S, what=f"{pod.name} ready")
    except AssertionError:
        raise AssertionError(f"{pod.name} not ready; its log:\n{pod.logs()[-3000:]}") from None
    api.set_pod_ready(namespace=kubelet.template.namespace, name=pod.name, ready=True)


def bearer(token: str | None) -> dict[str, str]:
    """The chart's admin token as a client sends it (auth.enabled); none with auth off."""
    return {"authorization": f"Bearer {token}"} if token else {}


def write_keys(pods: list[Pod], keys: list[str], *, tag: str, token: str | None) -> None:
    with httpx.Client(timeout=5.0, headers=bearer(token)) as client:
        for i, key in enumerate(keys):
            resp = client.put(f"{pods[i % len(pods)].url}/kv/{key}", content=f"{tag}-{key}".encode())
            assert resp.status_code == 204, f"PUT {key} via {pods[i % len(pods)].name}: {resp.status_code} {resp.text}"


def unreadable(pods: list[Pod], expected: dict[str, str], *, token: str | None) -> str | None:
    problems = []
    with httpx.Client(timeout=5.0, headers=bearer(token)) as client:
        for pod in pods:
            for key, value in expected.items():
                resp = client.get(f"{pod.url}/kv/{key}")
                if resp.status_code != 200 or resp.content != value.encode():
                    problems.append(f"{pod.name} {key}: {resp.status_code}")
    return f"{len(problems)} bad reads, e.g. {problems[:3]}" if problems else None


def stopped_cleanly(code: int) -> bool:
    """uvicorn exits 0, or re-raises SIGTERM after a clean shutdown (128 + 15); 137 is the kubelet's SIGKILL."""
    return code in (0, 128 + signal.SIGTERM)


def one_line_failure(pod: Pod) -> str:
    """The container exits 2 (a ConfigError) with exactly one line of output, no traceback."""
    code = pod.wait_exit(FAIL_TIMEOUT_S)
    out = pod.logs()
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, f"exit {code}, {len(lines)} lines:\n{out}"
    assert "Traceback" not in out and "Unclosed client session" not in out, out
    return lines[0]


# -- the image itself ----------------------------------------------------------------


def test_image_is_lean_and_installs_the_lock(image: str) -> None:
    lock = dict(
        re.findall(r"^([a-z0-9][a-z0-9._-]*)==(\S+)", (REPO / "requirements" / "runtime.txt").read_text(), re.M)
    )
    script = (
        "import importlib.util as u, importlib.metadata as m, json; "
        "print(json.dumps({'absent': [x for x in ('pip', 'setuptools', 'wheel', 'pkg_resources', 'kubernetes.aio') "
        "if u.find_spec(x.split('.')[0]) is None or (x == 'kubernetes.aio' and u.find_spec(x) is None)], "
        "'versions': {d.metadata['Name'].lower(): d.version for d in m.distributions()}}))"
    )
    proc = podman("run", *RUN_FLAGS, "--entrypoint", "python", image, "-c", script)
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(found["absent"]) == {"pip", "setuptools", "wheel", "pkg_resources", "kubernetes.aio"}, found["absent"]
    versions = {re.sub(r"[-_.]+", "-", name): version for name, version in found["versions"].items()}
    wrong = {
        name: (versions.get(name), pin) for name, pin in lock.items() if versions.get(name) != pin and name in versions
    }
    missing = sorted(name for name in lock if name not in versions)
    assert not wrong and not missing, f"image differs from requirements/runtime.txt: {wrong} missing {missing}"
    assert importlib.metadata.version("kvstore") == found["versions"]["kvstore"]
    # podman keeps HEALTHCHECK only in the docker format (scripts/image.py builds with --format docker).
    health = json.loads(podman("image", "inspect", "--format", "{{json .HealthCheck}}", image).stdout)
    assert health and health["Test"][:2] == ["CMD", "python"], health


# -- one pod ---------------------------------------------------------------------------


def test_one_pod_serves_is_healthy_keeps_its_data_and_stops_in_time(
    render: Render,
    port: int,
    ops_port: int,
    api: tuple[KubeAPI, TlsFront],
    pki: Pki,
    make_kubelet: Callable[..., Kubelet],
) -> None:
    kube, _ = api
    docs = render(set_values=pod_values(port, ops_port, "replicaCount=1", "replicationFactor=1"))
    kubelet = make_kubelet(docs, api=api, ca_crt=pki.ca_crt)
    admin = kubelet.template.admin_token
    assert admin, "the chart's default turns access control on, with a generated admin token"
    create_statefulset(kube, kubelet.template, 1)
    pod = start_pod(kubelet, api=kube, ordinal=0)
    mark_ready(kubelet, api=kube, pod=pod)

    # HEALTHCHECK (kept by --format docker) probes the pod's own address, not 127.0.0.1.
    health = podman("healthcheck", "run", pod.container, check=False)
    assert health.returncode == 0, f"healthcheck: {health.returncode} {health.stdout} {health.stderr}"
    assert podman("exec", pod.container, "id", "-u").stdout.strip() == str(kubelet.template.pod_security["runAsUser"])
    assert podman("exec", pod.container, "touch", "/opt/venv/x", check=False).returncode != 0, (
        "the root must be read-only"
    )
    # The console's page is package data (pyproject's package-data): the installed image serves it.
    for path in ("/ui", "/ui/console.js", "/favicon.ico"):
        assert httpx.get(pod.url + path, timeout=2.0).status_code == 200, path

    # The users file from the mounted Secret is in force: no token, 401; the admin token, in.
    anonymous = httpx.put(f"{pod.url}/kv/one-0", content=b"x", timeout=5.0)
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Bearer"), anonymous
    assert httpx.get(pod.ops_url + "/metrics", timeout=5.0).status_code == 200, "/metrics on ops needs no token"
    keys = [f"one-{i}" for i in range(KEYS)]
    write_keys([pod], keys, tag="v", token=admin)
    code, took = kubelet.stop_like_kubelet(pod)
    assert stopped_cleanly(code) and took < kubelet.template.grace_s - kubelet.template.pre_stop_sleep_s, (
        code,
        took,
        pod.logs(),
    )

    again = kubelet.run(0, volume=pod.data_dir, tag="-again")  # a new container on the same volume
    mark_ready(kubelet, api=kube, pod=again)
    assert unreadable([again], {k: f"v-{k}" for k in keys}, token=admin) is None


# -- three pods, scaled 3 -> 4 -> 3 ----------------------------------------------------------


def test_three_pods_form_a_ring_through_the_api_and_scale_3_4_3_without_loss(
    render: Render,
    port: int,
    ops_port: int,
    api: tuple[KubeAPI, TlsFront],
    pki: Pki,
    make_kubelet: Callable[..., Kubelet],
) -> None:
    kube, _ = api
    docs = render(set_values=pod_values(port, ops_port))
    kubelet = make_kubelet(docs, api=api, ca_crt=pki.ca_crt)
    t = kubelet.template
    admin = t.admin_token
    assert t.replicas == 3 and t.automount_token
    create_statefulset(kube, t, 3)
    pods = [start_pod(kubelet, api=kube, ordinal=ordinal) for ordinal in range(3)]
    for pod in pods:
        mark_ready(kubelet, api=kube, pod=pod)
    token = pods[0].token

    def urls(members: list[Pod]) -> dict[str, str]:
        return {pod.name: pod.url for pod in members}

    def same_ring(members: list[Pod], count: int) -> None:
        wait_for(
            lambda: membership_disagreement(
                urls(members), members={t.pod_name(i) for i in range(count)}, token=token, bearer=admin
            ),
            timeout=READY_TIMEOUT_S,
            what=f"every pod's ring has the {count} pods",
        )

    same_ring(pods, 3)
    ring = httpx.get(pods[0].url + "/ring", headers=bearer(admin), timeout=5.0).json()
    assert {m["url"] for m in ring["members"]} == {f"http://{t.pod_dns(i)}:{port}" for i in range(3)}
    keys = [f"early-{i}" for i in range(KEYS)]
    write_keys(pods, keys, tag="v", token=admin)

    kube.scale_statefulset(namespace=t.namespace, name=t.statefulset, replicas=4)
    pods.append(start_pod(kubelet, api=kube, ordinal=3))
    mark_ready(kubelet, api=kube, pod=pods[3])
    same_ring(pods, 4)
    wait_for(
        lambda: rebalancing_left(urls(pods), token=token, bearer=admin),
        timeout=SETTLE_TIMEOUT_S,
        what="rebalancing after the join",
    )
    late = [f"late-{i}" for i in range(KEYS)]
    write_keys(pods, late, tag="v", token=admin)  # some owned by the fourth pod, written through it too

    kube.scale_statefulset(namespace=t.namespace, name=t.statefulset, replicas=3)
    leaving = pods.pop()
    code, took = kubelet.stop_like_kubelet(leaving)
    log = leaving.logs()
    assert stopped_cleanly(code), (
        f"the leaving pod exited {code} after {took:.1f} s (137: killed mid-drain):\n{log[-3000:]}"
    )
    assert "left the ring" in log and "hand-off complete" in log, log[-3000:]
    kube.delete_pod(namespace=t.namespace, name=leaving.name)

    same_ring(pods, 3)
    everything = keys + late
    assert unreadable(pods, {k: f"v-{k}" for k in everything}, token=admin) is None

    def copies() -> str | None:
        records = read_replicas(urls(pods), everything, token=token)
        short = {k: n for k in everything if (n := sum(records[p.name, k].live for p in pods)) != 3}
        return (
            f"{len(short)} keys without exactly 3 live copies, e.g. {dict(list(short.items())[:5])}" if short else None
        )

    wait_for(copies, timeout=SETTLE_TIMEOUT_S, what="every key on all 3 remaining pods")


# -- start-up failures: one line, naming the setting to fix --------------------------------


def test_unwritable_data_volume_fails_in_one_line_naming_fsgroup(
    render: Render,
    port: int,
    ops_port: int,
    api: tuple[KubeAPI, TlsFront],
    pki: Pki,
    make_kubelet: Callable[..., Kubelet],
) -> None:
    docs = render(set_values=pod_values(port, ops_port))
    kubelet = make_kubelet(docs, api=api, ca_crt=pki.ca_crt)
    root_owned = kubelet.volume("no-fsgroup", fs_group=False)  # a volume the kubelet did not give to fsGroup
    line = one_line_failure(kubelet.run(0, volume=root_owned))
    assert "fsGroup" in line and "KVSTORE_DATA_DIR" in line and "not writable" in line, line


def test_missing_service_account_token_fails_in_one_line(
    render: Render,
    port: int,
    ops_port: int,
    api: tuple[KubeAPI, TlsFront],
    pki: Pki,
    make_kubelet: Callable[..., Kubelet],
) -> None:
    docs = render(set_values=pod_values(port, ops_port, "serviceAccount.automountServiceAccountToken=false"))
    kubelet = make_kubelet(docs, api=api, ca_crt=pki.ca_crt)
    assert not kubelet.template.automount_token  # so run() mounts no token, as the kubelet would not
    line = one_line_failure(kubelet.run(0))
    assert "automountServiceAccountToken" in line and "--kubeconfig" in line, line


@pytest.mark.parametrize("fault", ["untrusted", "unreachable"])
def test_a_bad_api_server_keeps_the_pod_up_and_unready_with_the_reason(
    fault: str,
    render: Render,
    port: int,
    ops_port: int,
    api: tuple[KubeAPI, TlsFront],
    tmp_path: Path,
    make_kubelet: Callable[..., Kubelet],
) -> None:
    kube, _front = api
    docs = render(set_values=pod_values(port, ops_port, "replicaCount=1", "replicationFactor=1"))
    if fault == "untrusted":  # ca.crt of another CA than the one that signed the API server's certificate
        kubelet = make_kubelet(docs, api=api, ca_crt=make_pki(tmp_path / "other", server_ip=API_HOST).ca_crt)
        expected = ("untrusted", "CERTIFICATE_VERIFY_FAILED", "ca.crt")
    else:  # nothing listens on the port the pod is told
        kubelet = make_kubelet(docs, api=api, ca_crt=make_pki(tmp_path / "same", server_ip=API_HOST).ca_crt)
        kubelet.api_port = free_port_on([API_HOST])
        expected = ("unreachable", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")
    create_statefulset(kube, kubelet.template, 1)
    pod = start_pod(kubelet, api=kube, ordinal=0)

    def reason() -> str | None:
        assert pod.running(), f"the pod exited instead of waiting unready:\n{pod.logs()}"
        why = ready_reason(pod) or ""
        return None if all(word in why for word in expected) else f"/ready says {why!r}"

    wait_for(reason, timeout=UNREADY_TIMEOUT_S, what=f"/ready naming the {fault} API server")
    assert httpx.get(pod.ops_url + "/health", timeout=2.0).status_code == 200, "alive: the kubelet must not restart it"
    log = pod.logs()
    assert "Traceback" not in log and any(all(word in line for word in expected) for line in log.splitlines()), log[
        -3000:
    ]


# -- the backup CronJob's container --------------------------------------------------------


def test_the_backup_cronjob_container_backs_up_and_prunes_in_the_image(
    image: str, render: Render, tmp_path: Path
) -> None:
    """The CronJob's container as the chart renders it (command, env, securityContext,
    the /backups and /tmp volumes), run from the image against a real node: the
    image has what its script uses, and the backup is written under a read-only root. The node
    runs with the chart's users file, the container gets the admin token its Secret reference names."""
    from app.storage.backup_format import BackupReader
    from tests.harness.processes import NodeProcess

    docs = render(set_values=["backup.enabled=true", "backup.keep=1"], show_tests=False)
    template = PodTemplate.from_docs(docs)
    cronjob = next(doc for doc in docs if doc["kind"] == "CronJob")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    security = {**pod["securityContext"], **container["securityContext"]}
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"] == {"drop": ["ALL"]}
    host, token = "127.0.0.70", "backup-token"
    users = tmp_path / "users.yaml"
    users_source = template.secret_volumes["auth"]
    users.write_text(template.secrets[users_source["secretName"], users_source["items"][0]["key"]])
    node_port = free_port_on([host])
    node = NodeProcess(
        node_id="n1",
        host=host,
        port=node_port,
        peers={"n1": f"http://{host}:{node_port}"},
        log_dir=tmp_path,
        args=["--replication-factor", "1", "--cluster-token", token, "--auth-file", str(users)],
    )
    backups, tmp = tmp_path / "backups", tmp_path / "tmp"
    for path in (backups, tmp):
        path.mkdir()
    os.chown(backups, 0, pod["securityContext"]["fsGroup"])  # as the kubelet hands over a volume with fsGroup
    backups.chmod(0o2775)
    tmp.chmod(0o1777)
    (backups / "kvstore-20240101T000000Z.kvbak").write_bytes(b"old")
    env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
    ref = next(item for item in container["env"] if item["name"] == "KVSTORE_TOKEN")["valueFrom"]["secretKeyRef"]
    env["KVSTORE_URL"], env["KVSTORE_TOKEN"] = node.url, template.secrets[ref["name"], ref["key"]]  # Service, Secret
    node.start()
    try:
        node.wait_ready()
        for i in range(20):
            put = httpx.put(f"{node.url}/kv/b{i}", content=b"v", headers=bearer(env["KVSTORE_TOKEN"]), timeout=5)
            assert put.status_code == 204
        flags = [
            "--user",
            f"{security['runAsUser']}:{security['runAsGroup']}",
            "--group-add",
            str(pod["securityContext"]["fsGroup"]),
            "--read-only",
            "--security-opt",
            "no-new-privileges",
            "--cap-drop",
            "all",
        ]
        proc = podman(
            "run",
            *RUN_FLAGS,
            *flags,
            "--volume",
            f"{backups}:/backups",
            "--volume",
            f"{tmp}:/tmp",
            *[arg for name, value in env.items() for arg in ("--env", f"{name}={value}")],
            "--entrypoint",
            container["command"][0],
            image,
            *container["command"][1:],
            *container["args"],
            check=False,
        )
    finally:
        node.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [written] = list(backups.iterdir())
    assert written.name != "kvstore-20240101T000000Z.kvbak" and "pruned kvstore-20240101T000000Z.kvbak" in proc.stdout
    with written.open("rb") as stream:
        reader = BackupReader(stream)
        assert sum(chunk.records for chunk in reader) == 20 and reader.trailer is not None
