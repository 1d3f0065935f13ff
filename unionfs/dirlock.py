"""One mount per upper and work dir: the lock a writable mount holds on each for its life.

A second mount of the same upper or work dir is refused, as the kernel refuses it, instead of
two daemons corrupting each other's view.  The lock is an flock on a file named by the
directory's identity (st_dev:st_ino) under the runtime dir, not an fd on the directory itself:
an fd there would keep the upper's filesystem busy until the daemon is gone, and `umount MNT;
umount UPPERFS` (which the kernel's overlay allows at once) would fail.

Unmounting a FUSE mount does not wait for its daemon: `fusermount3 -u` returns once the kernel
has let the mount go, and the daemon notices afterwards, finishes what it was doing (right
after a mount that can be its start-up imports, 100-200 ms) and exits, which drops its lock.
The kernel's overlay frees its dirs when umount returns, so `umount; mount` of the same dirs
works at once there; here the new mount would find the lock still held.  So the holder writes
its mountpoint (and mount namespace) into the lock file, and a new mount that finds the lock
held waits for it, for at most RELEASE_WAIT, only while that mountpoint is no longer mounted
(the holder is on its way out); a holder whose mount is still there, or one it cannot check
(another mount namespace, no mountpoint recorded), gets EBUSY at once.

Concurrency: called once per directory at mount start, before the session; blocking.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time

from .errors import UnionError
from .mounttable import fstype

RELEASE_WAIT = 5.0  # seconds a new mount waits for an unmounted holder to exit
_POLL = 0.005


def lock_dir(path: str, what: str, mountpoint: str | None = None) -> int:
    """Lock directory `path` (named `what` in the error) for the mount at `mountpoint`;
    returns the lock's fd, to be kept open for the life of the mount."""
    st = os.stat(path)
    locks = os.path.join(_runtime_dir(), f"layerfs-locks-{os.geteuid()}")
    os.makedirs(locks, mode=0o700, exist_ok=True)
    name = os.path.join(locks, f"{st.st_dev}:{st.st_ino}")
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        _acquire(fd, path, what)
        record = f"{os.getpid()} {_mount_ns()} {os.path.realpath(mountpoint) if mountpoint else ''}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(errors="surrogateescape") + b"\n", 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _acquire(fd: int, path: str, what: str) -> None:
    deadline: float | None = None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if not _holder_leaving(fd):
            raise UnionError(f"{what} {path} is in use by another mount", errno.EBUSY)
        now = time.monotonic()
        if deadline is None:
            deadline = now + RELEASE_WAIT
        elif now > deadline:
            raise UnionError(
                f"{what} {path} is still held by a layerfs whose mount is gone "
                f"(it did not exit within {RELEASE_WAIT:g} s)",
                errno.EBUSY,
            )
        time.sleep(_POLL)


def _holder_leaving(fd: int) -> bool:
    """Is the lock's holder a mount that is no longer mounted (so it is exiting)?"""
    try:
        fields = os.pread(fd, 4096, 0).decode(errors="surrogateescape").rstrip("\n").split(" ", 2)
    except OSError:
        return False
    if len(fields) != 3 or not fields[2] or fields[1] != _mount_ns():
        return False  # no mountpoint recorded (yet), or one this namespace cannot see
    try:
        return fstype(fields[2]) is None
    except (OSError, ValueError):  # no mount table to read: it cannot tell
        return False


def _mount_ns() -> str:
    try:
        return str(os.stat("/proc/self/ns/mnt").st_ino)
    except OSError:
        return "?"


def _runtime_dir() -> str:
    """/run as root; the user's XDG_RUNTIME_DIR (else /tmp) otherwise."""
    if os.geteuid() == 0 and os.access("/run", os.W_OK):
        return "/run"
    return os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
