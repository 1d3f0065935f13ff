"""The cost of one FUSE request on this machine, measured rather than guessed.

Most targets of issue 6 are ratios against kernel overlayfs, which never leaves the kernel; a
FUSE engine pays a round trip (kernel → daemon → kernel, two context switches and a wake-up)
for every request the kernel's caches cannot answer.  To tell that floor apart from layerfs's
own work, this module has:
  - `NullOps`, a pyfuse3 + trio filesystem that does nothing (one file, every getxattr is
    ENODATA, open/read answer at once): what pyfuse3 + trio cost with zero work;
  - `per_request`, which times, on a mounted engine, a loop of lgetxattr (one synchronous
    request each, never cached by the kernel) and of open+close (OPEN and FLUSH synchronous,
    RELEASE asynchronous).
`python -m benchmarks.floor MNT` serves NullOps on MNT in the foreground; `null_fs(mnt)` runs
it for the length of a with-block.  Single-threaded trio, like layerfs.
`pinned` puts the caller and every thread of the daemon on one CPU, as issue 11's R1 target
asks: a round trip then costs the two processes' own work and two switches on that CPU,
without the wake-up of another vCPU (about 30 µs each way on the VM this was written on).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import umount

NULL_FILE = "f"


def serve(mountpoint: str) -> int:
    import pyfuse3
    import trio

    def _attrs(inode: int) -> Any:
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode
        is_root = inode == pyfuse3.ROOT_INODE
        e.st_mode = (stat.S_IFDIR | 0o755) if is_root else (stat.S_IFREG | 0o644)
        e.st_nlink = 1
        e.attr_timeout = e.entry_timeout = 86400.0
        return e

    class NullOps(pyfuse3.Operations):
        async def getattr(self, inode: int, ctx: Any = None) -> Any:
            return _attrs(inode)

        async def lookup(self, parent: int, name: bytes, ctx: Any = None) -> Any:
            if name == NULL_FILE.encode():
                return _attrs(2)
            raise pyfuse3.FUSEError(errno.ENOENT)

        async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
            raise pyfuse3.FUSEError(errno.ENODATA)

        async def open(self, inode: int, flags: int, ctx: Any) -> Any:
            return pyfuse3.FileInfo(fh=inode, keep_cache=True)

        async def read(self, fh: int, off: int, size: int) -> bytes:
            return b""

    pyfuse3.init(NullOps(), mountpoint, {"fsname=nullfs", "default_permissions"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close()
    return 0


@contextlib.contextmanager
def null_fs(mnt: Path) -> Iterator[Path]:
    """NullOps served on `mnt` while the block runs; yields its one file.  Unmounted (and the
    server waited for, or killed) whatever happens."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.floor", str(mnt)],
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        deadline = time.monotonic() + 10
        while not (mnt / NULL_FILE).exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the null pyfuse3 filesystem did not come up")
            time.sleep(0.05)
        yield mnt / NULL_FILE
    finally:
        umount(mnt)  # the server exits once unmounted
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def daemon_pids(mnt: Path) -> list[int]:
    """The processes whose command line has `mnt` as an argument: the FUSE daemon serving it
    (every engine here is started with its mountpoint as an argument), never this one."""
    want = os.fsencode(str(mnt))
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if want in args:
            pids.append(int(entry))
    return pids


@contextlib.contextmanager
def pinned(pids: list[int], cpu: int) -> Iterator[None]:
    """This process and every thread of `pids` on `cpu` while the block runs; their own
    affinities again after it (threads started meanwhile inherit the pinned one and end with
    the daemon)."""
    mine = os.sched_getaffinity(0)
    before: dict[int, set[int]] = {}
    try:
        for pid in pids:
            for tid in map(int, os.listdir(f"/proc/{pid}/task")):
                before[tid] = os.sched_getaffinity(tid)
                os.sched_setaffinity(tid, {cpu})
        os.sched_setaffinity(0, {cpu})
        yield
    finally:
        os.sched_setaffinity(0, mine)
        for tid, cpus in before.items():
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:  # the thread has ended
                pass


def per_request(path: Path, n: int) -> dict[str, float]:
    """Seconds per lgetxattr and per open+close of `path` (median of 3 loops of n)."""

    def getxattr() -> None:
        try:
            os.getxattr(path, "security.selinux", follow_symlinks=False)
        except OSError:
            pass

    def open_close() -> None:
        os.close(os.open(path, os.O_RDONLY))

    out = {}
    for name, fn in (("getxattr", getxattr), ("open+close", open_close)):
        fn()
        loops = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            loops.append((time.perf_counter() - t0) / n)
        out[name] = sorted(loops)[1]
    return out


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1]))
