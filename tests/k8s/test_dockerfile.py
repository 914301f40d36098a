"""The image recipe (Dockerfile, .dockerignore): hadolint clean, the shape the chart
relies on (user, port, entrypoint), the HEALTHCHECK's probe, and the install the
Dockerfile performs, replayed into a fresh venv: dependencies from the lock
(requirements/runtime.txt, --require-hashes), then the project non-editable from
the files .dockerignore lets in, built by the locked setuptools; the entrypoint
`kvstore node` must serve /health and stop cleanly on SIGTERM. The image itself
is built and run with podman in tests/k8s/test_image.py.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.harness.processes import free_port, wait_ready
from tests.k8s.chart import CHART, REPO

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PIP_TIMEOUT_S = 240  # a cold cache; usually ~20 s
START_TIMEOUT_S = 20
STOP_TIMEOUT_S = 10


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    return [(head.upper(), rest.strip()) for head, _, rest in (item.partition(" ") for item in logical)]


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in instructions():
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def test_hadolint_is_clean(hadolint: Path) -> None:
    proc = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_shape_matches_the_chart() -> None:
    builder, rootfs, runtime = stages()
    assert builder[0][1].split()[0] == rootfs[0][1].split()[0], "the runtime's root must be the builder's Python"
    assert runtime[0][1].split()[0] == "scratch", "the runtime stage copies the pruned root; it inherits no base layers"
    copies = [args for op, args in runtime if op == "COPY"]
    assert copies[:2] == ["--from=rootfs / /", "--from=builder /opt/venv /opt/venv"], copies
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    runtime_ops = dict(runtime)
    assert runtime_ops["ENTRYPOINT"] == '["kvstore", "node"]', "exec-form entrypoint"
    assert runtime_ops["EXPOSE"] == str(values["containerPort"])
    uid, _, gid = runtime_ops["USER"].partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root USER lets runAsNonRoot verify it"
    assert (int(uid), int(gid)) == (
        values["podSecurityContext"]["runAsUser"],
        values["podSecurityContext"]["runAsGroup"],
    )
    runtime_text = " ".join(args for _, args in runtime)
    for tool in ("gcc", "build-essential", "apt-get install", "pip install"):
        assert tool not in runtime_text, f"the runtime stage must not install {tool!r}"
    # Dependencies get their own layer: pyproject.toml is copied and installed before the code.
    builder_ops = [(op, args) for op, args in builder if op in ("COPY", "RUN")]
    first_code = next(i for i, (op, args) in enumerate(builder_ops) if op == "COPY" and "app" in args.split())
    assert any(op == "COPY" and "requirements/runtime.txt" in args for op, args in builder_ops[:first_code])
    assert any(
        op == "RUN" and "--require-hashes -r requirements/runtime.txt" in args for op, args in builder_ops[:first_code]
    )
    last_run = [args for op, args in builder_ops if op == "RUN"][-1]
    assert "pip uninstall --yes setuptools wheel packaging pip" in last_run, "the installers must not reach the image"


def healthcheck_command() -> list[str]:
    """The HEALTHCHECK's exec-form command, from the runtime stage."""
    args = dict(stages()[-1])["HEALTHCHECK"]
    return json.loads(args[args.index("CMD ") + len("CMD ") :])


def run_healthcheck(python: Path, listen: str, *, ops: str | None = None) -> subprocess.CompletedProcess[str]:
    command = healthcheck_command()
    assert command[0] == "python", command
    env = {"PATH": os.environ.get("PATH", ""), "KVSTORE_LISTEN": listen}
    if ops is not None:
        env["KVSTORE_OPS_LISTEN"] = ops
    return subprocess.run([str(python), *command[1:]], env=env, capture_output=True, text=True, timeout=30, check=False)


def dockerignore_admits(relpath: str) -> bool:
    """Docker's rule: the last matching pattern wins; '!' re-admits."""
    admitted = True
    for raw in DOCKERIGNORE.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        pattern = pattern.replace("**/", "*")
        if fnmatch.fnmatch(relpath, pattern) or fnmatch.fnmatch(relpath, pattern + "/*"):
            admitted = negate
    return admitted


def build_context(dest: Path) -> Path:
    """The files `docker build .` would send, per .dockerignore (the COPY sources)."""
    for path in sorted(REPO.rglob("*")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith((".git/", ".venv/", ".tools/")) or not path.is_file() or not dockerignore_admits(rel):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return dest


def test_dockerignore_sends_only_what_the_build_copies(tmp_path: Path) -> None:
    context = build_context(tmp_path / "ctx")
    top = {p.name for p in context.iterdir()}
    assert top == {"pyproject.toml", "README.md", "app", "client", "requirements"}
    assert (context / "client" / "src" / "kvstore_client" / "py.typed").exists()
    assert not list(context.rglob("*.egg-info")) and not (context / "client" / "build").exists()
    assert {p.name for p in (context / "requirements").iterdir()} == {"runtime.txt", "build.txt"}
    assert not list(context.rglob("__pycache__"))
    assert not dockerignore_admits(".venv/bin/python") and not dockerignore_admits("tests/unit/test_ring.py")


def pip_install(target: Path, *args: str, cwd: Path) -> None:
    """This interpreter's pip, installing into the venv `target` (pip --python): it skips
    seeding pip into the fresh venv (~9 s). The machine's pip configuration (index,
    find-links, certificates, cache) applies as in a developer's shell."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(target),
        "install",
        "--disable-pip-version-check",
        "--quiet",
        *args,
    ]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    assert proc.returncode == 0, f"pip install {shlex.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Dockerfile's builder stage, replayed: a fresh venv, the locked dependencies with
    their hashes, then the project itself and the client library its CLI uses
    (`pip install --no-deps --no-build-isolation . ./client`, built by the locked
    setuptools) from the build context."""
    root = tmp_path_factory.mktemp("image")
    context = build_context(root / "src")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    pip_install(python, "--require-hashes", "-r", str(context / "requirements" / "runtime.txt"), cwd=root)
    pip_install(python, "--require-hashes", "-r", str(context / "requirements" / "build.txt"), cwd=root)
    pip_install(python, "--no-deps", "--no-build-isolation", str(context), str(context / "client"), cwd=root)
    return env_dir


def test_lock_pins_every_runtime_dependency_with_hashes() -> None:
    """requirements/runtime.txt (make lock) covers pyproject's dependencies, each `==` with sha256 hashes."""
    with (REPO / "pyproject.toml").open("rb") as fh:
        wanted = {
            re.split(r"[\[<>=~!; ]", dep, maxsplit=1)[0].lower() for dep in tomllib.load(fh)["project"]["dependencies"]
        }
    for name in ("runtime.txt", "test.txt", "build.txt"):
        text = (REPO / "requirements" / name).read_text()
        pins = dict(re.findall(r"^([a-z0-9][a-z0-9._-]*)==(\S+)", text, re.M))
        blocks = re.split(r"^(?=[a-z0-9])", text, flags=re.M)[1:]
        assert pins and all("--hash=sha256:" in block for block in blocks), f"{name}: every pin needs its hashes"
        if name != "build.txt":
            assert wanted <= set(pins), f"{name} misses {sorted(wanted - set(pins))}: run make lock"


@pytest.fixture(params=["127.0.0.1", "127.0.0.3"])
def node_process(
    request: pytest.FixtureRequest, image_venv: Path, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int, Path, str]]:
    """The installed entrypoint, on loopback and on another loopback address (as a pod on its own IP)."""
    host = request.param
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("KVSTORE_")}
    env.update(
        KVSTORE_NODE_ID="n1", KVSTORE_LISTEN=f"{host}:{port}", PATH=f"{image_venv / 'bin'}:{env.get('PATH', '')}"
    )
    log = tmp_path / "node.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(image_venv / "bin" / "kvstore"), "node"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc, port, log, host
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT_S)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_installed_entrypoint_serves_health_and_stops_on_sigterm(
    image_venv: Path, node_process: tuple[subprocess.Popen[bytes], int, Path, str]
) -> None:
    proc, port, log, host = node_process
    # The installed package, not the source tree, is what runs.
    where = subprocess.run(
        [str(image_venv / "bin" / "python"), "-c", "import app; print(app.__file__)"],
        cwd=log.parent,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(image_venv), where
    wait_ready([f"http://{host}:{port}"], procs=[proc], path="/health", timeout=START_TIMEOUT_S, logs=[log])
    status, body = get(f"http://{host}:{port}/health")
    assert (status, body.strip()) == (200, "OK"), log.read_text()

    # The image's CLI client commands (the helm test pod's, the backup CronJob's) run on the
    # installed client library.
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [str(image_venv / "bin" / "kvstore"), *args, "--url", f"http://{host}:{port}"]
        return subprocess.run(command, cwd=log.parent, capture_output=True, text=True, timeout=30, check=False)

    put = cli("put", "image-key", "image-value")
    assert put.returncode == 0 and put.stdout.startswith("OK "), put.stderr
    got = cli("get", "image-key")
    assert (got.returncode, got.stdout.strip()) == (0, "image-value"), got.stderr

    # The HEALTHCHECK probes the address the node listens on (defect: it always probed 127.0.0.1),
    # and the loopback for a wildcard: a node on 0.0.0.0 answers on 127.0.0.1 too.
    python = image_venv / "bin" / "python"
    assert run_healthcheck(python, f"{host}:{port}").returncode == 0
    if host == "127.0.0.1":
        assert run_healthcheck(python, f"0.0.0.0:{port}").returncode == 0
    else:
        assert run_healthcheck(python, f"127.0.0.1:{port}").returncode != 0, (
            "nothing listens there: the probe must fail"
        )
    assert run_healthcheck(python, f"{host}:{free_port()}").returncode != 0, "a probe of a closed port must fail"
    # With an ops listener the probe asks it, not the data port (which may demand a client certificate).
    assert run_healthcheck(python, f"{host}:{port}", ops=f"{host}:{free_port()}").returncode != 0
    assert run_healthcheck(python, f"{host}:{free_port()}", ops=f"{host}:{port}").returncode == 0
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        code = proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"kvstore node ignored SIGTERM for {STOP_TIMEOUT_S}s:\n{log.read_text()}")
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal so the exit status
    # reports it (uvicorn >= 0.29): -SIGTERM is a clean stop too; anything else is a crash.
    assert code in (0, -signal.SIGTERM), f"kvstore node exited {code} on SIGTERM:\n{log.read_text()}"
