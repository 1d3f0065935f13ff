"""Mounting and unmounting a FUSE connection without libfuse.

As root: open /dev/fuse and call mount(2) with the options libfuse would pass (what the
pyfuse3 transport gets from `daemon.fuse_options`): `fd=N,rootmode=40000,user_id,group_id`,
`default_permissions`, `allow_other`, `max_read`; fsname is the source, the type is
`fuse.<subtype>`.  Generic flags (ro, nosuid, nodev, noexec, ...) become MS_* flags; like
libfuse, nosuid and nodev are on unless `suid` / `dev` are given.
As non-root (or with auto_unmount): run `fusermount3`, which mounts and passes the fd back over
a socketpair (`_FUSE_COMMFD`); with auto_unmount it stays alive and unmounts when our end of
the socket closes (the process dies), so the socket is kept open for the mount's life.
Unmounting mirrors libfuse: umount2(MNT_DETACH) as root, `fusermount3 -u -q -z` otherwise.
Concurrency: plain blocking calls, made before the session starts and after it ends.
"""

from __future__ import annotations

import ctypes
import errno
import os

TYPE_CHECKING = False  # typing's own constant, without importing typing before INIT (../logs.py)
if TYPE_CHECKING:
    from typing import Any


MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_SYNCHRONOUS, MS_DIRSYNC, MS_NOATIME, MS_NODIRATIME = 16, 128, 1024, 2048
MNT_DETACH = 2
_SET = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
        "sync": MS_SYNCHRONOUS, "dirsync": MS_DIRSYNC, "noatime": MS_NOATIME,
        "nodiratime": MS_NODIRATIME}  # fmt: skip
_CLEAR = {"rw": MS_RDONLY, "suid": MS_NOSUID, "dev": MS_NODEV, "exec": MS_NOEXEC,
          "async": MS_SYNCHRONOUS}  # fmt: skip
_KERNEL_OPTS = ("default_permissions", "allow_other", "max_read")  # passed in mount data


class Mounted:
    """A live connection: the device fd, and how to take the mount down."""

    def __init__(self, fd: int, mountpoint: str, via_fusermount: bool,
                 keepalive: Any = None) -> None:  # fmt: skip
        self.fd = fd
        self.mountpoint = mountpoint
        self.via_fusermount = via_fusermount
        self.keepalive = keepalive

    def connected(self) -> bool:
        """False once the kernel has let go of the connection (unmounted from outside):
        poll reports POLLERR on the device (libfuse's fuse_kern_unmount checks the same)."""
        if self.fd < 0:
            return False
        import select

        poller = select.poll()
        poller.register(self.fd, 0)
        return not any(ev & select.POLLERR for _, ev in poller.poll(0))

    def unmount(self) -> None:
        """Lazily unmount, unless the connection is already gone — then the mountpoint may
        hold somebody else's new mount, which must not be touched.  Closes the fd."""
        try:
            if not self.connected():
                return
            if self.via_fusermount or os.geteuid() != 0:
                import subprocess

                subprocess.run(["fusermount3", "-u", "-q", "-z", "--", self.mountpoint],
                               capture_output=True, timeout=30)  # fmt: skip
            else:
                _umount2(self.mountpoint, MNT_DETACH)
        finally:
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.keepalive is not None:
            self.keepalive.close()
            self.keepalive = None


def split_options(options: set[str]) -> tuple[int, list[str], str, str]:
    """(MS_* flags, kernel data options, fsname, subtype) from libfuse-style options."""
    flags = MS_NOSUID | MS_NODEV
    data: list[str] = []
    fsname, subtype = "layerfs", "layerfs"
    for opt in sorted(options):
        key, _, val = opt.partition("=")
        if key in _SET:
            flags |= _SET[key]
        elif key in _CLEAR:
            flags &= ~_CLEAR[key]
        elif key == "fsname":
            fsname = val
        elif key == "subtype":
            subtype = val
        elif key in _KERNEL_OPTS:
            data.append(opt)
    return flags, data, fsname, subtype


MS_REMOUNT, MS_RELATIME, MS_STRICTATIME = 32, 1 << 21, 1 << 24
# per-mount flags as /proc/self/mountinfo names them, which a remount must give again
_SHOWN = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
          "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME,
          "strictatime": MS_STRICTATIME}  # fmt: skip
_ATIME = MS_NOATIME | MS_RELATIME | MS_STRICTATIME


def remount(mountpoint: str, options: list[str]) -> None:
    """`mount -o remount[,ro|rw,...] MNT` of a live layerfs mount: mount(2) with MS_REMOUNT
    on it, the flags not given kept as they are (read from /proc/self/mountinfo), as
    mount(8) does for a kernel filesystem.  The kernel makes a read-only mount refuse every
    change itself (EROFS) and lets them through again after `remount,rw`; the daemon is not
    involved.  `options` apply in their order (`rw,...,ro` is read-only).  OSError with the
    reason (EINVAL: not a FUSE mount; EPERM: not root)."""
    target = os.path.realpath(mountpoint)
    flags = MS_REMOUNT | _mount_flags(target)
    for opt in options:
        if opt in _SET:
            flags = flags & ~_ATIME if _SET[opt] & _ATIME else flags
            flags |= _SET[opt]
        elif opt in _CLEAR:
            flags &= ~_CLEAR[opt]
        elif opt in ("relatime", "strictatime"):
            flags = flags & ~_ATIME | (MS_RELATIME if opt == "relatime" else MS_STRICTATIME)
        elif opt in ("atime", "norelatime", "nostrictatime"):
            flags &= ~_ATIME
        elif opt == "diratime":
            flags &= ~MS_NODIRATIME
    if _libc().mount(b"layerfs", os.fsencode(target), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def _mount_flags(target: str) -> int:
    """The per-mount flags of the topmost FUSE mount on `target` (EINVAL: none there)."""
    from ..mounttable import entries, read

    found = None
    for _, where, opts, fstype, _ in entries(read()):
        if where == os.fsencode(target):
            found = (opts, fstype)
    if found is None or not found[1].startswith(b"fuse"):
        raise OSError(errno.EINVAL, "not a layerfs mount", target)
    flags = 0
    for opt in found[0].decode().split(","):
        flags |= _SHOWN.get(opt, 0)
    return flags


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL("libc.so.6", use_errno=True)


def _umount2(target: str, flags: int) -> None:
    if _libc().umount2(os.fsencode(target), flags) != 0:
        err = ctypes.get_errno()
        if err not in (22, 2):  # EINVAL: not mounted (any more); ENOENT
            raise OSError(err, f"umount {target}: {os.strerror(err)}")


def mount(mountpoint: str, options: set[str]) -> Mounted:
    """Mount a FUSE connection on `mountpoint`; raises OSError with the reason."""
    if os.geteuid() != 0 or "auto_unmount" in options:
        return _fusermount(mountpoint, options)
    flags, data, fsname, subtype = split_options(options)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    st = os.stat(mountpoint)
    opts = [f"fd={fd}", f"rootmode={st.st_mode & 0o170000:o}", f"user_id={os.getuid()}",
            f"group_id={os.getgid()}", *data]  # fmt: skip
    rc = _libc().mount(fsname.encode(), os.fsencode(mountpoint), f"fuse.{subtype}".encode(),
                       ctypes.c_ulong(flags), ",".join(opts).encode())  # fmt: skip
    if rc != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, f"mount: {os.strerror(err)}")
    return Mounted(fd, mountpoint, via_fusermount=False)


def _fusermount(mountpoint: str, options: set[str]) -> Mounted:
    import socket  # here, not at the top: a mount as root needs neither (start-up time)
    import subprocess

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
    opts = ",".join(sorted(options))
    try:
        proc = subprocess.Popen(
            ["fusermount3", "-o", opts, "--", mountpoint],
            env=env,
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    except OSError:
        ours.close()
        theirs.close()
        raise
    theirs.close()
    try:
        _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
    except OSError:
        fds = []
    auto_unmount = "auto_unmount" in options
    if not fds:
        err = proc.communicate(timeout=30)[1].decode(errors="replace").strip()
        ours.close()
        raise OSError(f"fusermount3 failed: {err or 'no fd received'}")
    if not auto_unmount:
        proc.wait(timeout=30)
        ours.close()
        return Mounted(fds[0], mountpoint, via_fusermount=True)
    os.set_inheritable(fds[0], False)
    return Mounted(fds[0], mountpoint, via_fusermount=True, keepalive=ours)
