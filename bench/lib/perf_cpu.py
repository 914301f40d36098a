"""perf for bench/put_profile.py: where the server core's CPU goes in native
terms, kernel included, which py-spy cannot see. `perf record -C CORE -g`
samples only what is on that core (cpu-clock), so unlike py-spy it never
counts a thread that waits for the CPU; Python 3.11 gives perf no Python
frames, so this names native places only: the syscall a kernel sample is
under, the shared object of a user sample.

| sample | category |
|---|---|
| kernel, under a syscall whose entry function (the callee of do_syscall_64) names... | |
| ... epoll | sys: epoll |
| ... pwrite | sys: LMDB page writes |
| ... fsync, fdatasync, msync | sys: fsync |
| ... futex | sys: futex (GIL, locks) |
| ... write, sendto, sendmsg | sys: socket send (loopback: the receiver's TCP path runs here too) |
| ... read, recv | sys: socket receive |
| ... anything else | sys: other syscalls |
| kernel, no syscall (page faults, interrupts, softirq) | sys: faults, irq |
| user, lmdb's extension | LMDB (C) |
| user, _blake2 | blake2b (C) |
| user, httptools | httptools (C) |
| user, uvloop (libuv inside) | uvloop/libuv (C) |
| user, orjson | orjson (C) |
| user, libpython / the python binary | interpreter |
| user, libc | libc (malloc, memcpy, ...) |
| user, anything else | other native |
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

from bench.lib.common import LOAD_CORE, SERVER_CORE

PERF_RATE_HZ = 999  # ~10k samples of node1 in 10 s; not a multiple of the kernel's tick rates
SYSCALLS = {
    "socket send": ("write", "writev", "sendto", "sendmsg"),
    "socket receive": ("read", "readv", "recvfrom", "recvmsg"),
    "epoll": ("epoll_wait", "epoll_pwait", "epoll_pwait2"),
    "LMDB page writes": ("pwrite64", "pwritev", "pwritev2"),
    "fsync": ("fdatasync", "fsync", "msync"),
    "futex (GIL, locks)": ("futex",),
}
_BY_SYSCALL = {name: category for category, names in SYSCALLS.items() for name in names}
LIBRARIES = (  # (substring of the shared object's path, category); first match wins
    ("/lmdb/", "LMDB (C)"),
    ("_blake2", "blake2b (C)"),
    ("/httptools/", "httptools (C)"),
    ("/uvloop/", "uvloop/libuv (C)"),
    ("/orjson/", "orjson (C)"),
    ("/libc.so", "libc (malloc, memcpy, ...)"),
    ("/libc-", "libc (malloc, memcpy, ...)"),
    ("python", "interpreter"),
)
CATEGORIES = (
    *(f"sys: {c}" for c in SYSCALLS),
    "sys: other syscalls",
    "sys: faults, irq",
    *dict.fromkeys(c for _, c in LIBRARIES),
    "other native",
)


def perf_path() -> str | None:
    return shutil.which("perf")


def start(perf: str, out: Path) -> subprocess.Popen[bytes]:
    """perf sampling the server core (on the load core itself) until stop()."""
    command = ["taskset", "-c", LOAD_CORE, perf, "record", "-C", SERVER_CORE, "-g", "-F", str(PERF_RATE_HZ)]
    return subprocess.Popen([*command, "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode not in (0, -signal.SIGINT, 130):
        raise RuntimeError(f"bench: perf record exited {proc.returncode}: {err.decode(errors='replace')[-300:]}")


def _syscall(name: str) -> str:
    """A category from the kernel function a syscall entered (this kernel
    inlines the __x64_sys_* wrappers: ksys_write, do_epoll_wait, ...)."""
    for needles, category in (
        (("epoll",), "epoll"),
        (("pwrite",), "LMDB page writes"),
        (("fsync", "fdatasync", "msync", "sync_file_range"), "fsync"),
        (("futex",), "futex (GIL, locks)"),
        (("write", "sendto", "sendmsg"), "socket send"),
        (("read", "recv"), "socket receive"),
    ):
        if any(needle in name for needle in needles):
            return category
    return "other syscalls"


def _category(frames: list[tuple[str, str]]) -> str:
    """frames: (symbol, shared object), innermost first."""
    if not frames:
        return "other native"
    dso = frames[0][1]
    if dso == "[kernel.kallsyms]":
        kernel = [symbol for symbol, where in frames if where == "[kernel.kallsyms]"]
        if "do_syscall_64" in kernel:
            entered = [name for name in kernel[: kernel.index("do_syscall_64")] if name != "x64_sys_call"]
            return "sys: " + (_syscall(entered[-1]) if entered else "other syscalls")
        return "sys: faults, irq"
    for needle, category in LIBRARIES:
        if needle in dso:
            return category
    return "other native"


def samples_by_thread(perf: str, data: Path) -> dict[int, Counter[str]]:
    """tid -> category -> samples."""
    out = subprocess.run(
        [perf, "script", "-i", str(data), "-F", "tid,ip,sym,dso"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    ).stdout
    found: dict[int, Counter[str]] = defaultdict(Counter)
    tid: int | None = None
    frames: list[tuple[str, str]] = []

    def flush() -> None:
        if tid is not None:
            found[tid][_category(frames)] += 1

    for line in out.splitlines():
        if not line.strip():
            continue
        if not line.startswith("\t"):  # a sample's header: its tid (right-aligned: maybe spaces first)
            flush()
            tid, frames = int(line.split()[0]), []
            continue
        parts = line.split(None, 1)  # 'ffffffff81... symbol (dso)'
        if len(parts) < 2:
            continue
        symbol, _, dso = parts[1].rpartition(" (")
        frames.append((symbol.split("+", 1)[0], dso.rstrip(")")))
    flush()
    return found
