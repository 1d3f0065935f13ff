"""Real mounts for tests: layerfs in a subprocess, and kernel overlayfs, always torn down.

Never stats a mountpoint that may be hung: whether something is mounted is read from
/proc/self/mountinfo.  Teardown is `fusermount3 -u`, then on any failure a lazy unmount,
terminate and kill; a deadline bounds every wait, so one hung daemon cannot hang the suite.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from unionfs.mounttable import mount_table

LAYERFS = str(Path(sys.executable).parent / "layerfs")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
MOUNT_DEADLINE = 20.0


def need(condition: bool, why: str) -> None:
    """Skip locally when the machine cannot mount; under CI=true that is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI requires this test to run: {why}")
    pytest.skip(why)


def require_fuse() -> None:
    need(os.path.exists("/dev/fuse"), "/dev/fuse is missing")
    need(shutil.which("fusermount3") is not None, "fusermount3 is missing (apt: fuse3)")
    need(os.path.exists(LAYERFS), f"{LAYERFS} is not installed")


def require_root() -> None:
    need(os.geteuid() == 0, "needs root (kernel overlayfs, trusted xattrs, mknod)")


def open_path_to(path: str | os.PathLike[str]) -> None:
    """Let every user traverse down to `path`: read and search for all on it, search on its
    parents, the rest of each mode kept.  pytest makes its temp dirs, /tmp/pytest-of-root
    among them, 0700, and tests that switch users must reach their mounts.  (It used to set
    0755 on every parent below /tmp: a temp dir under /var/tmp (`--basetemp`) cost /var/tmp
    its sticky, world-writable mode, and rootless podman its temp files there.)"""
    target = Path(path)
    for parent in [target, *target.parents]:
        mode = stat.S_IMODE(os.stat(parent).st_mode)
        want = mode | (0o755 if parent == target else 0o111)
        if want != mode:
            os.chmod(parent, want)


def mounts() -> list[tuple[str, str]]:
    """(mountpoint, fstype) of every mount, from /proc/self/mountinfo."""
    return mount_table()


def is_mounted(path: str | os.PathLike[str]) -> bool:
    target = os.path.abspath(path)
    return any(mp == target for mp, _ in mounts())


def fstype(path: str | os.PathLike[str]) -> str | None:
    target = os.path.abspath(path)
    found = None
    for mp, typ in mounts():
        if mp == target:
            found = typ
    return found


def open_files(pid: int) -> dict[str, os.stat_result]:
    """What each open fd of process `pid` names, with its stat: {target: stat}. A daemon opens
    and closes fds while we look (a copy-up, a log rotation, the kernel's RELEASE arriving), so
    an fd gone between listing /proc/PID/fd and reading it is skipped, not an error."""
    found = {}
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            found[os.readlink(entry)] = os.stat(entry)
        except FileNotFoundError:
            continue
    return found


def lazy_unmount(path: str) -> None:
    for cmd in (["fusermount3", "-u", "-z", path], ["umount", "-l", path]):
        if (
            shutil.which(cmd[0])
            and subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0
        ):
            return


def escape(path: str | os.PathLike[str]) -> str:
    return str(path).replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def overlay_options(lowers, upper=None, work=None, data=()) -> str:
    """`lowerdir=` (with the data-only layers `data` after `::`), `upperdir=`, `workdir=`."""
    opts = (
        "lowerdir=" + ":".join(escape(p) for p in lowers) + "".join(f"::{escape(p)}" for p in data)
    )
    if upper is not None:
        opts += f",upperdir={escape(upper)},workdir={escape(work)}"
    return opts


class LayerfsMount:
    """`layerfs -f` in a subprocess; use as a context manager."""

    def __init__(
        self,
        mnt,
        lowers,
        upper=None,
        work=None,
        extra_opts: str = "",
        log_path: str | os.PathLike[str] | None = None,
        prefix: Sequence[str] = (),
        data: Sequence[str | os.PathLike[str]] = (),
    ) -> None:
        self.mnt = str(mnt)
        self.prefix = list(prefix)  # a wrapper command (prlimit, setpriv, ...)
        self.opts = overlay_options(lowers, upper, work, data) + (
            f",{extra_opts}" if extra_opts else ""
        )
        self.log_path = str(log_path or (Path(self.mnt).parent / (Path(self.mnt).name + ".log")))
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LayerfsMount:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        require_fuse()
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [*self.prefix, LAYERFS, "-f", "-o", self.opts, self.mnt],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + MOUNT_DEADLINE
        try:
            while not is_mounted(self.mnt):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"layerfs exited {self.proc.returncode}: {self.log()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"layerfs did not mount in {MOUNT_DEADLINE}s: {self.log()}")
                time.sleep(0.02)
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        try:
            if is_mounted(self.mnt):
                r = subprocess.run(["fusermount3", "-u", self.mnt], capture_output=True, timeout=15)
                if r.returncode != 0:
                    lazy_unmount(self.mnt)
        except Exception:
            lazy_unmount(self.mnt)
        finally:
            if proc is not None:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.terminate()
                    try:
                        proc.wait(timeout=2)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(timeout=5)


class KernelOverlay:
    """`mount -t overlay` on the same kind of directories; the oracle."""

    def __init__(self, mnt, lowers, upper=None, work=None, extra_opts: str = "", data=()) -> None:
        self.mnt = str(mnt)
        self.opts = overlay_options(lowers, upper, work, data) + (
            f",{extra_opts}" if extra_opts else ""
        )

    def __enter__(self) -> KernelOverlay:
        require_root()
        r = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", self.opts, self.mnt],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if r.returncode != 0:
            pytest.fail(f"mount -t overlay failed: {r.stderr.strip()}")
        return self

    def __exit__(self, *exc) -> None:
        if is_mounted(self.mnt):
            r = subprocess.run(["umount", self.mnt], capture_output=True, timeout=30)
            if r.returncode != 0:
                lazy_unmount(self.mnt)


def on_both(
    root: Path,
    layers: Callable[[Path], tuple[Path, Path, Path, Path]],
    steps: Callable[[Path], Any],
    extra: str = "",
) -> dict[str, Any]:
    """`steps(mnt)` on kernel overlayfs, then on layerfs (with the options `extra`), each over
    its own copy of what `layers(root / ENGINE)` makes: (lower, upper, work, mountpoint).
    What each returned, by engine."""
    results = {}
    for engine in ("kernel", "layerfs"):
        lo, up, wk, mnt = layers(root / engine)
        mount: KernelOverlay | LayerfsMount
        if engine == "kernel":
            mount = KernelOverlay(mnt, [lo], up, wk)
        else:
            mount = LayerfsMount(mnt, [lo], up, wk, extra_opts=extra)
        with mount:
            results[engine] = steps(mnt)
    return results


def sweep(under: str) -> list[str]:
    """Lazily unmount every mount below `under` (a leftover of a crashed test)."""
    left = [mp for mp, _ in mounts() if mp.startswith(under.rstrip("/") + "/")]
    for mp in sorted(left, key=len, reverse=True):
        lazy_unmount(mp)
    return left
