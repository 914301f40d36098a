"""The kubelet's part for tests/k8s/test_image.py: turns the StatefulSet that
`helm template` renders into `podman run` flags (env, securityContext, read-only
root, volumes, the service-account mount), runs the image built by
scripts/image.py as pods on their own loopback addresses, and fronts the API
double (kube_api.KubeAPI, plain HTTP) with TLS the way a pod reaches
kubernetes.default.svc: https on KUBERNETES_SERVICE_HOST/PORT, a CA in the
mounted ca.crt.

Secret volumes (the users file of access control) are written from the
Secrets the chart renders into a directory mounted read-only, with the
volume's items, mode and the pod's fsGroup, as the kubelet projects them.

What a real kubelet does that this does not: pull images, cgroup limits from
`resources`, probes (the test polls /ready on the ops port itself and patches
the pod's Ready condition), the fsGroup chown of the volume (emulated: the
data dir is given to group fsGroup, setgid, as the kubelet does), updates of a
mounted Secret, DNS (each pod's stable name is an --add-host entry), and a
network namespace per pod (--network host, each pod on its own 127.0.0.x).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.util
import os
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness.certs import Authority
from tests.k8s.chart import REPO

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
PODMAN_TIMEOUT_S = 60  # one podman call (run, exec, stop, rm); a start is ~0.5 s
FRONT_START_TIMEOUT_S = 5.0
CONTAINER_PREFIX = "kvstore-test-"  # + the test process's pid: remove_orphans knows a dead run's containers


def load_image_script() -> Any:
    """scripts/image.py as a module (scripts/ is not a package): PODMAN, build_image, missing_tools."""
    spec = importlib.util.spec_from_file_location("kvstore_image_script", REPO / "scripts" / "image.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


IMAGE_SCRIPT = load_image_script()
PODMAN: list[str] = IMAGE_SCRIPT.PODMAN


def podman(*args: str, check: bool = True, timeout: float = PODMAN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])} ... exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


# -- certificates ---------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca_crt: Path
    server_crt: Path
    server_key: Path


def make_pki(directory: Path, *, server_ip: str, name: str = "kvstore-test") -> Pki:
    """A CA and a server certificate for server_ip signed by it (the API server's serving cert)."""
    directory.mkdir(parents=True, exist_ok=True)
    authority = Authority.create(f"{name}-ca")
    issued = authority.issue("kube-apiserver", dns=(), ips=(server_ip,))
    pki = Pki(ca_crt=directory / "ca.crt", server_crt=directory / "server.crt", server_key=directory / "server.key")
    pki.ca_crt.write_bytes(authority.cert_pem)
    pki.server_crt.write_bytes(issued.cert_pem)
    pki.server_key.write_bytes(issued.key_pem)
    return pki


# -- the API server's TLS front --------------------------------------------------


class TlsFront:
    """https://host:port -> http://upstream: a TLS-terminating TCP relay in its own thread and loop."""

    def __init__(self, *, host: str, upstream: tuple[str, int], pki: Pki) -> None:
        self.host = host
        self.upstream = upstream
        self.port = 0
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(pki.server_crt, pki.server_key)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-front", daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> TlsFront:
        self._thread.start()

        async def serve() -> asyncio.Server:
            return await asyncio.start_server(self._relay, self.host, 0, ssl=self._context)

        self._server = asyncio.run_coroutine_threadsafe(serve(), self._loop).result(FRONT_START_TIMEOUT_S)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(OSError, RuntimeError):
                dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._tasks.discard(task)

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        if self._thread.is_alive():
            # stop() raises nothing itself (return_exceptions): a loop stuck past the timeout, or one
            # already stopped, must not keep the thread below from being asked to stop and joined.
            with contextlib.suppress(TimeoutError, RuntimeError):
                asyncio.run_coroutine_threadsafe(stop(), self._loop).result(FRONT_START_TIMEOUT_S)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(FRONT_START_TIMEOUT_S)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()


# -- the rendered pod, as podman flags ---------------------------------------------


def _find(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
    return found[0]


@dataclass
class PodTemplate:
    """What the chart's StatefulSet says a pod is, read from `helm template` output."""

    statefulset: str
    namespace: str
    service: str
    port: int
    ops_port: int
    labels: dict[str, str]
    replicas: int
    grace_s: int
    pre_stop_sleep_s: int
    env: list[dict[str, Any]]
    secrets: dict[tuple[str, str], str]  # (secret name, key) -> value
    pod_security: dict[str, Any]
    container_security: dict[str, Any]
    mounts: dict[str, str]  # volume name -> mountPath
    automount_token: bool
    secret_volumes: dict[str, dict[str, Any]]  # volume name -> its `secret` source
    admin_token: str | None  # the token the chart's helm test pod sends (auth.enabled), else None
    cluster_domain: str = "cluster.local"

    @classmethod
    def from_docs(cls, docs: list[dict[str, Any]]) -> PodTemplate:
        sts = _find(docs, "StatefulSet")
        pod = sts["spec"]["template"]["spec"]
        container = next(c for c in pod["containers"] if c["name"] == "kvstore")
        secrets = {}
        for doc in docs:
            if doc.get("kind") == "Secret":
                for key, value in (doc.get("data") or {}).items():
                    secrets[doc["metadata"]["name"], key] = base64.b64decode(value).decode()
        env = list(container.get("env") or [])
        domain = next((e["value"] for e in env if e["name"] == "KVSTORE_CLUSTER_DOMAIN"), "cluster.local")
        pre_stop = (((container.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command") or [
            "sleep",
            "0",
        ]
        assert pre_stop[0] == "sleep", pre_stop
        admin_token = None
        for doc in docs:  # the helm test pod, when rendered, names the client's token
            if doc.get("kind") == "Pod":
                for item in doc["spec"]["containers"][0].get("env") or []:
                    if item["name"] == "KVSTORE_TOKEN":
                        ref = item["valueFrom"]["secretKeyRef"]
                        admin_token = secrets[ref["name"], ref["key"]]
        return cls(
            statefulset=sts["metadata"]["name"],
            namespace=sts["metadata"]["namespace"],
            service=sts["spec"]["serviceName"],
            port=next(p["containerPort"] for p in container["ports"] if p["name"] == "http"),
            ops_port=next(p["containerPort"] for p in container["ports"] if p["name"] == "ops"),
            labels=dict(sts["spec"]["selector"]["matchLabels"]),
            replicas=sts["spec"]["replicas"],
            grace_s=pod["terminationGracePeriodSeconds"],
            pre_stop_sleep_s=int(pre_stop[1]),
            env=env,
            secrets=secrets,
            pod_security=dict(pod.get("securityContext") or {}),
            container_security=dict(container.get("securityContext") or {}),
            mounts={m["name"]: m["mountPath"] for m in container.get("volumeMounts") or []},
            automount_token=bool(pod.get("automountServiceAccountToken", True)),
            secret_volumes={v["name"]: v["secret"] for v in pod.get("volumes") or [] if "secret" in v},
            admin_token=admin_token,
            cluster_domain=domain,
        )

    def pod_name(self, ordinal: int) -> str:
        return f"{self.statefulset}-{ordinal}"

    def pod_dns(self, ordinal: int) -> str:
        return f"{self.pod_name(ordinal)}.{self.service}.{self.namespace}.svc.{self.cluster_domain}"

    def env_for(self, pod_name: str) -> dict[str, str]:
        """The container's env as the kubelet resolves it (downward API, secretKeyRef)."""
        resolved: dict[str, str] = {}
        for item in self.env:
            if "value" in item:
                resolved[item["name"]] = str(item["value"])
                continue
            source = item["valueFrom"]
            if "fieldRef" in source:
                resolved[item["name"]] = {"metadata.name": pod_name, "metadata.namespace": self.namespace}[
                    source["fieldRef"]["fieldPath"]
                ]
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                resolved[item["name"]] = self.secrets[ref["name"], ref["key"]]
            else:
                raise AssertionError(f"env {item['name']}: unsupported source {source}")
        return resolved

    def security_flags(self) -> list[str]:
        """securityContext as podman flags; fails on a field it does not translate."""
        merged = {**self.pod_security, **self.container_security}
        uid, gid = merged["runAsUser"], merged["runAsGroup"]
        assert merged.get("runAsNonRoot") and uid != 0
        flags = ["--user", f"{uid}:{gid}"]
        if "fsGroup" in self.pod_security:
            flags += ["--group-add", str(self.pod_security["fsGroup"])]
        if merged.get("readOnlyRootFilesystem"):
            flags.append("--read-only")
        if merged.get("allowPrivilegeEscalation") is False:
            flags += ["--security-opt", "no-new-privileges"]
        assert not merged.get("privileged")
        for cap in (merged.get("capabilities") or {}).get("drop") or []:
            flags += ["--cap-drop", cap.lower()]
        assert (merged.get("seccompProfile") or {}).get(
            "type", "RuntimeDefault"
        ) == "RuntimeDefault"  # podman's default profile
        return flags


@dataclass
class Pod:
    """One running container of the image, named so the test can always remove it."""

    name: str  # the pod's name (KVSTORE_NODE_ID)
    container: str
    host: str
    port: int
    ops_port: int
    token: str  # the cluster token
    data_dir: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ops_url(self) -> str:
        """The ops listener (/health, /ready, /metrics; plain HTTP): what the chart's probes ask."""
        return f"http://{self.host}:{self.ops_port}"

    def running(self) -> bool:
        proc = podman("inspect", "--format", "{{.State.Running}}", self.container, check=False)
        return proc.stdout.strip() == "true"

    def exit_code(self) -> int:
        return int(podman("inspect", "--format", "{{.State.ExitCode}}", self.container).stdout.strip())

    def wait_exit(self, timeout: float) -> int:
        return int(podman("wait", self.container, timeout=timeout).stdout.strip())

    def logs(self) -> str:
        proc = podman("logs", self.container, check=False)
        return proc.stdout + proc.stderr


@dataclass
class Kubelet:
    """Starts pods of one PodTemplate as containers; remembers every container it
    started and removes them all in close(), whatever happened."""

    template: PodTemplate
    image: str
    workdir: Path
    hosts: dict[int, str]  # ordinal -> 127.0.0.x
    api_host: str | None = None
    api_port: int | None = None
    service_account: Path | None = None
    prefix: str = field(default_factory=lambda: f"{CONTAINER_PREFIX}{os.getpid()}-{int(time.time())}")
    containers: list[str] = field(default_factory=list)

    def volume(self, name: str, *, fs_group: bool = True) -> Path:
        """A data volume as the kubelet hands it over: with fsGroup, group-owned and setgid."""
        path = self.workdir / "volumes" / name
        path.mkdir(parents=True, exist_ok=True)
        gid = self.template.pod_security.get("fsGroup")
        if fs_group and gid is not None:
            os.chown(path, 0, gid)
            path.chmod(0o2775)
        else:
            os.chown(path, 0, 0)
            path.chmod(0o755)
        return path

    def secret_volume(self, name: str, tag: str) -> Path:
        """A Secret volume as the kubelet projects it: each item (or every key) of the
        chart-rendered Secret as a file, the volume's defaultMode, group fsGroup."""
        source = self.template.secret_volumes[name]
        data = {key: value for (secret, key), value in self.template.secrets.items() if secret == source["secretName"]}
        assert data, f"volume {name}: Secret {source['secretName']} is not rendered by the chart (an existing one?)"
        items = source.get("items") or [{"key": key, "path": key} for key in data]
        path = self.workdir / "volumes" / f"{name}-{tag}"
        path.mkdir(parents=True, exist_ok=True)
        gid = self.template.pod_security.get("fsGroup", 0)
        for item in items:
            target = path / item["path"]
            target.write_text(data[item["key"]])
            os.chown(target, 0, gid)
            target.chmod(item.get("mode", source.get("defaultMode", 0o644)))
        return path

    def run(
        self,
        ordinal: int,
        *,
        volume: Path | None = None,
        mount_token: bool | None = None,
        extra_env: dict[str, str] | None = None,
        tag: str = "",
    ) -> Pod:
        t = self.template
        name = t.pod_name(ordinal)
        host = self.hosts[ordinal]
        container = f"{self.prefix}-{name}{tag}"
        env = t.env_for(name)
        # The pod's IP; the chart's 0.0.0.0 would collide under --network host.
        env["KVSTORE_LISTEN"] = f"{host}:{t.port}"
        env["KVSTORE_OPS_LISTEN"] = f"{host}:{t.ops_port}"
        if self.api_host is not None:
            env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"] = self.api_host, str(self.api_port)
        env.update(extra_env or {})
        data = volume if volume is not None else self.volume(f"data-{name}")
        tmp = self.workdir / "volumes" / f"tmp-{container}"
        tmp.mkdir(parents=True, exist_ok=True)
        tmp.chmod(0o1777)
        args = [
            "run",
            "--detach",
            "--name",
            container,
            "--network",
            "host",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            *t.security_flags(),
            "--volume",
            f"{data}:{t.mounts['data']}",
            "--volume",
            f"{tmp}:{t.mounts['tmp']}",
        ]
        for volume_name in t.secret_volumes:
            if volume_name in t.mounts:
                source = self.secret_volume(volume_name, container)
                args += ["--volume", f"{source}:{t.mounts[volume_name]}:ro"]
        if (t.automount_token if mount_token is None else mount_token) and self.service_account is not None:
            args += ["--volume", f"{self.service_account}:{SERVICE_ACCOUNT_DIR}:ro"]
        for other, address in self.hosts.items():
            args += ["--add-host", f"{t.pod_dns(other)}:{address}"]
        for key, value in env.items():
            args += ["--env", f"{key}={value}"]
        self.containers.append(container)
        podman(*args, self.image)
        return Pod(
            name=name,
            container=container,
            host=host,
            port=t.port,
            ops_port=t.ops_port,
            token=env["KVSTORE_CLUSTER_TOKEN"],
            data_dir=data,
        )

    def stop_like_kubelet(self, pod: Pod) -> tuple[int, float]:
        """preStop (the chart's sleep, run in the container), then SIGTERM with what is
        left of the grace period before SIGKILL. Returns (exit code, seconds from SIGTERM)."""
        t = self.template
        if t.pre_stop_sleep_s:
            podman(
                "exec", pod.container, "sleep", str(t.pre_stop_sleep_s), timeout=t.pre_stop_sleep_s + PODMAN_TIMEOUT_S
            )
        started = time.monotonic()
        remaining = max(1, t.grace_s - t.pre_stop_sleep_s)
        podman("stop", "--time", str(remaining), pod.container, timeout=remaining + PODMAN_TIMEOUT_S)
        return pod.exit_code(), time.monotonic() - started

    def close(self) -> None:
        for container in self.containers:
            podman("rm", "--force", "--time", "0", container, check=False)
        self.containers.clear()


def remove_orphans() -> list[str]:
    """Remove containers a killed test run left behind: ours by name, made by a process that is gone."""
    names = podman("ps", "--all", "--format", "{{.Names}}", check=False).stdout.split()
    orphans = []
    for name in names:
        pid = name.removeprefix(CONTAINER_PREFIX).split("-", 1)[0]
        if name.startswith(CONTAINER_PREFIX) and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            orphans.append(name)
    if orphans:
        podman("rm", "--force", "--time", "0", *orphans, check=False)
    return orphans


def write_service_account(directory: Path, *, namespace: str, ca_crt: Path, token: str = "test-token") -> Path:
    """The files the kubelet mounts at SERVICE_ACCOUNT_DIR, readable by the pod's user."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "token").write_text(token)
    (directory / "namespace").write_text(namespace)
    (directory / "ca.crt").write_bytes(ca_crt.read_bytes())
    for path in [directory, *directory.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return directory
