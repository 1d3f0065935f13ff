"""Running `layerfs` and `fusermount3`, and reading the mount table: shared by the commands.

`mount` returns once the mount is live (layerfs daemonizes and reports readiness) and raises
`ToolFailed` with layerfs's own exit code otherwise; layerfs writes its message to our stderr.
It refuses a mountpoint that already has a mount on it (layerfs itself would stack one).
`unmount` is `fusermount3 -u`, idempotent only through `unmount_quietly`, which also falls
back to a lazy unmount.  Whether a path is mounted is read from /proc/self/mountinfo, never by
stat-ing it: a hung FUSE mountpoint would hang the stat.  `daemon_of` finds the layerfs
process serving a mountpoint (its pid and start time, from /proc), and `state` says whether
an image mount's record is live (in the mount table and its daemon alive), dead (still in the
mount table, its daemon gone: `layer umount` it) or stopped.  Nothing here prints.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from unionfs.mounttable import fstype, mount_table  # noqa: F401 (re-exported)
from unionfs.options import split_escaped

from .errors import AlreadyMounted, BadInput, NotMounted, ToolFailed, status_of

MOUNT_TIMEOUT = 60.0
UNMOUNT_TIMEOUT = 30.0


def layerfs_executable() -> str:
    """The `layerfs` of this installation (beside our python), else the one on PATH."""
    beside = Path(sys.executable).parent / "layerfs"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("layerfs")
    if found is None:
        raise ToolFailed("cannot find the layerfs executable (run scripts/setup.sh)")
    return found


def escape_path(path: str) -> str:
    """Escape a path for a `-o` value: `\\`, `:` and `,` get a backslash (overlayfs rules)."""
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def mount_options(lowers: Sequence[str], upper: str | None, work: str | None) -> str:
    """`lowerdir=TOP:...:BOTTOM[,upperdir=U,workdir=W]` from top-first lower directories."""
    if not lowers:
        raise BadInput("at least one lower directory is needed")
    if (upper is None) != (work is None):
        raise BadInput("--upper and --work must be given together")
    opts = "lowerdir=" + ":".join(escape_path(os.path.abspath(d)) for d in lowers)
    if upper is not None and work is not None:
        opts += f",upperdir={escape_path(os.path.abspath(upper))}"
        opts += f",workdir={escape_path(os.path.abspath(work))}"
    return opts


# given by `layer mount`'s own options, or refused: its mounts are nosuid,nodev
_MANAGED = {"lowerdir": "--lower", "upperdir": "--upper", "workdir": "--work"}
_REFUSED = ("suid", "dev")


def extra_options(given: Sequence[str]) -> list[str]:
    """The layerfs options of `layer mount -o` (each a comma-separated list), checked for the
    ones `layer mount` sets itself; layerfs checks the rest (an unknown option or a bad value
    is its error, with its message)."""
    out = []
    for arg in given:
        for item in split_escaped(arg, ","):  # as layerfs splits its -o
            item = item.strip()
            if not item:
                continue
            key = item.split("=", 1)[0]
            if key in _MANAGED:
                raise BadInput(f"-o {key}=: give the layers with {_MANAGED[key]} (or an IMAGE)")
            if key in _REFUSED:
                raise BadInput(
                    f"-o {key}: layer's mounts are nosuid,nodev (run layerfs itself to mount "
                    "a container's root with setuid files and devices)"
                )
            out.append(item)
    return out


def mount(
    lowers: Sequence[str],
    mountpoint: str,
    upper: str | None = None,
    work: str | None = None,
    extra: Sequence[str] = (),
) -> None:
    """Mount the union on `mountpoint`, `nosuid,nodev` (only the raw `layerfs` mounts suid
    and dev as root, for containers: README "setuid and devices"); returns once it is live.
    `extra`: more layerfs options (`extra_options`)."""
    target = canonical_mountpoint(mountpoint)
    opts = ",".join([mount_options(lowers, upper, work), "nosuid", "nodev", *extra])
    cmd = [layerfs_executable(), "-o", opts, target]
    typ = fstype(target)
    if typ is not None:
        raise AlreadyMounted(f"{mountpoint} is already mounted ({typ}); unmount it first")
    # stdio is inherited: layerfs's errors reach the user as it wrote them.
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, timeout=MOUNT_TIMEOUT, check=False)
    if proc.returncode != 0:
        raise ToolFailed(exit_code=status_of(proc.returncode))


def is_live(mountpoint: str) -> bool:
    """A layerfs daemon serves `mountpoint` now (read from the mount table)."""
    return fstype(canonical_mountpoint(mountpoint)) == "fuse.layerfs"


LIVE, DEAD, STOPPED = "live", "dead", "stopped"


_PF_EXITING = 0x4  # include/linux/sched.h: set when a task starts to exit


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks after boot): with the pid, names one process.
    None when there is no such process, or only one on its way out: exiting (a killed
    daemon closes its sockets, so a commit sees it gone, before it becomes a zombie) or a
    zombie its new parent has not reaped yet."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    try:  # the command name may hold spaces and parentheses: split after the last ')'
        fields = stat[stat.rindex(b")") + 2 :].split()
        if fields[0] in (b"Z", b"X") or int(fields[6]) & _PF_EXITING:
            return None
        return int(fields[19])
    except (ValueError, IndexError):
        return None


def daemon_of(mountpoint: str) -> dict[str, int] | None:
    """{"pid", "start"} of the layerfs daemon started on `mountpoint` by `mount`, or None.

    `mount` gives layerfs the canonical mountpoint as its last argument, and the daemon is
    the only layerfs process left with that command line once `mount` returned."""
    target = os.fsencode(canonical_mountpoint(mountpoint))
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")[:-1]
        except OSError:
            continue
        if not argv or argv[-1] != target:
            continue
        if not any(os.path.basename(a) == b"layerfs" for a in argv[:2]):
            continue
        start = _start_time(int(entry))
        if start is not None:
            return {"pid": int(entry), "start": start}
    return None


def daemon_alive(daemon: dict[str, int]) -> bool:
    return _start_time(daemon["pid"]) == daemon["start"]


def state(mountpoint: str, daemon: dict[str, int] | None) -> str:
    """LIVE, DEAD or STOPPED (see the module docstring).  The daemon recorded at mount time,
    else any layerfs process serving the mountpoint (one started by hand on the same upper)
    counts; with neither known, the mount table alone decides."""
    if not is_live(mountpoint):
        return STOPPED
    if daemon is not None and daemon_alive(daemon):
        return LIVE
    found = daemon_of(mountpoint)
    if found is not None or daemon is None:
        return LIVE
    return DEAD


def canonical_mountpoint(path: str) -> str:
    """Absolute path with the parent's symlinks resolved; the path itself is never stat-ed."""
    full = os.path.abspath(path)
    parent, name = os.path.split(full)
    return os.path.join(os.path.realpath(parent), name) if name else full


def unmount(mountpoint: str) -> None:
    """`fusermount3 -u` a FUSE mount; NotMounted / ToolFailed with fusermount3's message."""
    target = canonical_mountpoint(mountpoint)
    typ = fstype(target)
    if typ is None:
        raise NotMounted(f"{mountpoint} is not mounted")
    if not typ.startswith("fuse"):
        raise ToolFailed(f"{mountpoint} is not a FUSE mount (it is {typ}): use umount(8)")
    proc = _fusermount(["-u", target])
    if proc.returncode != 0:
        detail = proc.stderr.strip() or f"exit status {proc.returncode}"
        raise ToolFailed(f"unmounting {mountpoint} failed: {detail}")


def unmount_quietly(mountpoint: str) -> bool:
    """Best effort for cleanup paths: `-u`, then `-u -z`.  True when nothing is left mounted."""
    target = canonical_mountpoint(mountpoint)
    for flags in (["-u"], ["-u", "-z"]):
        if fstype(target) is None:
            return True
        try:
            _fusermount([*flags, target])
        except (OSError, subprocess.TimeoutExpired):
            continue
    return fstype(target) is None


def _fusermount(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["fusermount3", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=UNMOUNT_TIMEOUT,
        check=False,
    )
