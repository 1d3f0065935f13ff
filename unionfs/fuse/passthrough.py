"""FUSE passthrough: the kernel reads and writes a file's real object itself, without READ
and WRITE requests (FUSE_PASSTHROUGH: kernel 6.9 and newer, CAP_SYS_ADMIN).

The daemon registers an open real fd with the device (FUSE_DEV_IOC_BACKING_OPEN → a backing
id) and answers OPEN/CREATE with FOPEN_PASSTHROUGH and that id; the kernel then opens the
backing file's path itself, with the caller's flags, for every read, write and mmap of that
open file.  The id is closed (FUSE_DEV_IOC_BACKING_CLOSE) at the last RELEASE of the inode.

The kernel's rules (fs/fuse/iomode.c), which `Backings` keeps per inode:
  - an inode is either cached (open files use the page cache) or passthrough, never both
    at once: while one kind of open file exists, every new open must be of the same kind
    (otherwise the kernel fails the caller's open with EIO);
  - all passthrough opens of an inode use one backing file at a time (otherwise EBUSY→EIO);
  - FOPEN_PASSTHROUGH excludes FOPEN_KEEP_CACHE (EINVAL→EIO).
What passes through:
  - opens for reading of lower-layer files of MIN_SIZE bytes or more (decided per open, when
    no other open file of the inode decides it).  Smaller files stay cached: two ioctls per
    open cost more than they save, and a read of a passthrough file makes the kernel ask
    for attributes again on a writable mount.
  - a file CREATE makes, opened for writing only and not for appending (tar, cp, dd, a
    compiler's output: `created`), with every open of it while that one is open.  Its data
    then goes to the upper file without a WRITE request each (untar of 100 MB: 36,578 →
    16,180 requests, 3.5 → 2.4 s).  Those writes do not pass the freeze gate (gate.py): a
    `layer commit` of the live mount first waits for such files to be closed, and none are
    made while it waits or holds.  Appending and read-write creators (logs, databases) keep
    their files open for long, so they stay cached and a commit never waits for them.
Other opens of upper files, and every other open for writing, stay cached, so writes pass
the freeze gate (control.py): a write through passthrough would reach the upper while a live
`layer commit` reads it (measured: with every write passed through, tests/test_writeback.py's
commit during appends sees torn files).
What this costs in semantics: a big lower file opened for reading keeps reading the lower
file after another open copies it up (kernel overlayfs before 4.19 behaved the same way),
and so does a reader opened while such readers are open; opening it for writing while they
are open fails with ETXTBSY, since the kernel cannot switch the inode to the upper copy under
them.  Files under MIN_SIZE, and every file with passthrough=0, keep kernel-overlayfs
semantics exactly.
Concurrency: trio, one thread; called between awaits only.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct

from . import wire

TYPE_CHECKING = False  # typing's own constant (logs.py)
if TYPE_CHECKING:
    from ..gate import Gate

log = logging.getLogger("layerfs")

BACKING_OPEN = 0x4010E501  # _IOW(229, 1, struct fuse_backing_map)
BACKING_CLOSE = 0x4004E502  # _IOW(229, 2, uint32_t)
MIN_SIZE = 1 << 20  # opens for reading of smaller files stay cached (see README)


class Conflict(Exception):
    """The inode passes through to another real file than this open's (a copy-up since)."""

    errno = errno.ETXTBSY


class _Inode:
    __slots__ = ("backing_id", "handles", "upper")

    def __init__(self, backing_id: int, upper: bool = False) -> None:
        self.backing_id = backing_id  # 0: the inode's open files are cached
        self.handles: set[int] = set()
        self.upper = upper  # the backing file is the upper file (a created one)


class Backings:
    """Which open files pass through, and the backing ids they hold."""

    def __init__(self, devfd: int, enabled: bool, gate: Gate) -> None:
        self.devfd = devfd
        self.enabled = enabled
        self.gate = gate  # counts the handles whose writes pass it by
        self._inodes: dict[int, _Inode] = {}
        self._handle_inode: dict[int, int] = {}

    def needs_fd(self, ino: int, writable: bool, lower: bool, size: int) -> bool:
        """Would `open` of such a handle (not a created one) register its fd as a new
        backing file?  (Only then does the handle's real file have to be open now:
        operations.FileHandle.)"""
        return (self.enabled and ino not in self._inodes and not writable and lower
                and size >= MIN_SIZE)  # fmt: skip

    def open(self, ino: int, fh: int, fd: int, writable: bool, lower: bool, size: int,
             created: bool = False) -> int:  # fmt: skip
        """The backing id to answer handle `fh` of inode `ino` with (0: cached); `lower`:
        the handle's real file is in a lower layer, of `size` bytes; `fd` its real fd, read
        only when `needs_fd` or `created` (else it may be -1); `created`: the handle CREATE
        made, for writing only, the inode's only open file, while the gate admits handles
        that pass it by.  Raises Conflict for a handle opened for writing while the inode
        passes through to its lower file."""
        if not self.enabled:
            return 0
        node = self._inodes.get(ino)
        if node is None:
            if created:
                node = self._inodes[ino] = _Inode(self._register(fd), upper=True)
            elif writable or not lower or size < MIN_SIZE:
                # cached, and no later open of it can pass through while this one is open (a
                # lower file keeps its size, an upper one passes through only from its
                # CREATE on): nothing to keep
                return 0
            else:
                node = self._inodes[ino] = _Inode(self._register(fd))
        elif node.backing_id and writable and not node.upper:
            raise Conflict(os.strerror(errno.ETXTBSY))
        # (a reader opened after a copy-up joins the readers still on the lower file; any
        # open of a created file joins its creator on the upper file)
        node.handles.add(fh)
        self._handle_inode[fh] = ino
        if node.backing_id and writable:
            self.gate.bypass_open(fh, ino)
        return node.backing_id

    def passes_through(self, fh: int) -> bool:
        """Does open file `fh` pass through (the kernel reads and writes its backing file)?"""
        ino = self._handle_inode.get(fh)
        return ino is not None and self._inodes[ino].backing_id != 0

    def reads_lower(self, ino: int) -> bool:
        """Does inode `ino` pass through to a file in a lower layer (what its readers see
        even once the name has been copied up)?"""
        node = self._inodes.get(ino)
        return node is not None and node.backing_id != 0 and not node.upper

    def release(self, fh: int) -> None:
        self.gate.bypass_close(fh)
        ino = self._handle_inode.pop(fh, None)
        if ino is None:
            return
        node = self._inodes[ino]
        node.handles.discard(fh)
        if node.handles:
            return
        del self._inodes[ino]
        if node.backing_id:
            try:
                fcntl.ioctl(self.devfd, BACKING_CLOSE, struct.pack("<I", node.backing_id))
            except OSError as exc:
                log.warning("passthrough: closing backing id %d: %s", node.backing_id, exc)

    def _register(self, fd: int) -> int:
        arg = bytearray(wire.BACKING_MAP.pack(fd, 0, 0))
        try:
            return fcntl.ioctl(self.devfd, BACKING_OPEN, arg, True)
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.ENOTTY, errno.EOPNOTSUPP):
                log.warning("passthrough: off for this mount (%s)", exc)
                self.enabled = False
            else:  # this file only (a backing file on a stacked filesystem: ELOOP/EBUSY)
                log.debug("passthrough: not for this file (%s)", exc)
            return 0
