#!/usr/bin/env python3
"""Build the kvstore image with podman, on a machine with no registry and no
Docker engine (ours and CI's): installs podman, buildah, runc and debootstrap
with apt-get where missing, makes a Debian bookworm base with debootstrap
(python3, pip, venv), then builds the project's Dockerfile on it.

    python scripts/image.py tools      install the container tools where missing
    python scripts/image.py base       make the base image (once; cached)
    python scripts/image.py build      tools + base + `podman build`; prints the image id
    python scripts/image.py sizes      the image's layers and their sizes

Everything podman keeps (its image store, the base) lives under CACHE_DIR, a
stable path outside the repo, so a second build reuses both (~5 s instead of
~2 min). tests/k8s/test_image.py drives the built image (tests/k8s/pods.py loads
PODMAN, IMAGE and build_image from here); `make image-test` runs it, and so does
`make test`. Standard library only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Outside the repo (a fresh clone reuses it), stable (a second run is cached),
# overridable for a cold measurement or a second cache.
CACHE_DIR = Path(os.environ.get("KVSTORE_IMAGE_CACHE", "/var/cache/kvstore-image"))
BASE_IMAGE = "localhost/kvstore-base:bookworm-python3.11"
IMAGE = "localhost/kvstore:test"
SUITE = "bookworm"  # the Debian release CI runs on; its python3 is 3.11, the Python the lock is compiled for
BASE_PACKAGES = "python3,python3-pip,python3-venv,python-is-python3,ca-certificates"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
APT_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # HTTPS from a RUN step passes a TLS-inspecting proxy here
TOOLS = {
    "podman": "podman",
    "buildah": "buildah",
    "runc": "runc",
    "debootstrap": "debootstrap",
}  # command -> Debian package
APT_TIMEOUT_S = 900  # apt-get update + install of podman's ~60 packages on a slow mirror
DEBOOTSTRAP_TIMEOUT_S = 900  # usually ~50 s
BUILD_TIMEOUT_S = 1200  # cold: ~2 min; the pip step downloads ~40 MB
PRUNE_AFTER = "24h"  # untagged images older than this go: superseded builds, not today's cache


def podman_command() -> list[str]:
    """podman with the storage and runtime flags every call must share: root on
    this machine, no systemd (cgroupfs, file events), runc."""
    return [
        "podman",
        "--storage-driver",
        "overlay",
        "--root",
        str(CACHE_DIR / "storage"),
        "--runroot",
        str(CACHE_DIR / "run"),
        "--cgroup-manager",
        "cgroupfs",
        "--events-backend",
        "file",
        "--runtime",
        "runc",
    ]


PODMAN = podman_command()


def log(message: str) -> None:
    print(f"image: {message}", file=sys.stderr, flush=True)


def missing_tools() -> list[str]:
    return [package for command, package in TOOLS.items() if shutil.which(command) is None]


def install_tools() -> None:
    """apt-get install what is missing (CI starts from a machine where only what the repo installs counts)."""
    missing = missing_tools()
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(
            f"image: {', '.join(missing)} missing and not root: run `sudo apt-get install {' '.join(missing)}`"
        )
    log(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=APT_TIMEOUT_S)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env, timeout=APT_TIMEOUT_S)
    still = missing_tools()
    if still:
        raise SystemExit(f"image: apt-get did not provide {', '.join(still)}")


def mirror() -> str:
    """The Debian mirror this machine's apt uses (the only one reachable here)."""
    if APT_SOURCES.is_file():
        for line in APT_SOURCES.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "URIs" and value.split():
                uri = value.split()[0]
                if "security" not in uri:
                    return uri
    return DEFAULT_MIRROR


def image_exists(name: str) -> bool:
    return subprocess.run([*PODMAN, "image", "exists", name], check=False).returncode == 0


def build_base() -> None:
    """debootstrap a minimal bookworm with Python, import it as BASE_IMAGE (once)."""
    if image_exists(BASE_IMAGE):
        return
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=CACHE_DIR, prefix="rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        log(f"debootstrap {SUITE} from {mirror()} (once; ~1 min)")
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", SUITE, str(rootfs), mirror()],
            check=True,
            timeout=DEBOOTSTRAP_TIMEOUT_S,
            stdout=subprocess.DEVNULL,
        )
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):  # package downloads: not part of the base
            for entry in (rootfs / cache).glob("*"):
                if entry.is_file():
                    entry.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            [*PODMAN, "import", "--change", "ENV PIP_BREAK_SYSTEM_PACKAGES=1", "-", BASE_IMAGE],
            stdin=tar.stdout,
            check=True,
            timeout=DEBOOTSTRAP_TIMEOUT_S,
            stdout=subprocess.DEVNULL,
        )
        assert tar.stdout is not None
        tar.stdout.close()
        if tar.wait() != 0:
            raise SystemExit("image: tar of the debootstrap root failed")
    log(f"base image {BASE_IMAGE} made in {time.monotonic() - started:.0f} s")


def build_image(*, tag: str = IMAGE) -> str:
    """`podman build` of the project's Dockerfile on the local base; returns the image id.
    --format docker keeps HEALTHCHECK (the OCI format has no such field)."""
    install_tools()
    build_base()
    started = time.monotonic()
    subprocess.run(
        [
            *PODMAN,
            "build",
            "--isolation",
            "chroot",
            "--pull=never",
            "--format",
            "docker",
            "--build-arg",
            f"PYTHON_IMAGE={BASE_IMAGE}",
            "--volume",
            f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro",
            "--layers",
            "--tag",
            tag,
            "--file",
            str(REPO / "Dockerfile"),
            str(REPO),
        ],
        check=True,
        timeout=BUILD_TIMEOUT_S,
        stdout=sys.stderr,
    )
    # Images this tag no longer names pile up at each change of the code; a day's worth stays as cache.
    subprocess.run(
        [*PODMAN, "image", "prune", "--force", "--filter", f"until={PRUNE_AFTER}"],
        check=False,
        timeout=BUILD_TIMEOUT_S,
        stdout=subprocess.DEVNULL,
    )
    image_id = subprocess.run(
        [*PODMAN, "image", "inspect", "--format", "{{.Id}}", tag],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    log(f"built {tag} ({image_id[:12]}) in {time.monotonic() - started:.1f} s")
    return image_id


def sizes(tag: str = IMAGE) -> str:
    return subprocess.run(
        [*PODMAN, "history", "--format", "{{.Size}}\t{{.CreatedBy}}", tag],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("tools", "base", "build", "sizes"))
    args = parser.parse_args(argv)
    if args.action == "tools":
        install_tools()
    elif args.action == "base":
        install_tools()
        build_base()
    elif args.action == "build":
        print(build_image())
    else:
        print(sizes(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
