"""Whether reads through the mount may mark access times in the upper layer.

Kernel overlayfs applies its own mount's access-time flags (touch_atime on the overlay
mount: nothing on a read-only mount, nothing with `noatime`, no directory with
`nodiratime`) and reads the real files with O_NOATIME.  The kernel's FUSE client updates no
atime itself: the daemon's reads of upper files do, under the upper filesystem's own rule
(its relatime), so without this a read through `layerfs -o ro` or `-o noatime` still wrote
atimes into the upper.  `AtimePolicy.files` / `.dirs` say whether a read of an upper file, a
listing of an upper directory, may mark it; where not, the file is read with O_NOATIME and
the listing marks nothing (the daemon reads real directories with O_NOATIME always:
fsat.Roots.scandir; a listing marks its upper directory on purpose, UnionOperations.
_dir_accessed).  `strictatime` cannot be had this way (the upper filesystem's rule applies, and
setting the atime by hand would move the ctime); relatime is what the upper gives.

The flags are the mount's own as /proc/self/mountinfo shows them (per-mount and superblock
`ro`, `noatime`, `nodiratime`), read first at INIT (the mount is then the newest on its
mountpoint; from then on it is known by its device), so a `mount -o remount,ro` or a
`remount,bind,noatime` applies from the next open: mountinfo signals POLLPRI on a change of
the mount table, and one poll(0) (under a microsecond) per question tells whether to read
it again.  Until the mount is seen there (or where this process cannot see it), the options
it was mounted with decide.

Concurrency: the daemon's trio thread only (a plain object, no locks).
"""

from __future__ import annotations

import os
import select

from . import mounttable

_CHANGED = select.POLLPRI | select.POLLERR


def flags_of(options: set[str] | frozenset[str]) -> tuple[bool, bool]:
    """(files, dirs): may reads mark files' and directories' atimes under these options."""
    if options & {"ro", "noatime"}:
        return False, False
    return True, "nodiratime" not in options


class AtimePolicy:
    __slots__ = ("target", "files", "dirs", "_dev", "_fd", "_poll")

    def __init__(self, mountpoint: str | None, options: set[str] | frozenset[str]) -> None:
        """Made before the mount: resolving `mountpoint` once it is mounted would ask the
        daemon itself.  `mountpoint` None: the options alone decide (no mount)."""
        self.target = os.fsencode(os.path.realpath(mountpoint)) if mountpoint else b""
        self.files, self.dirs = flags_of(options)
        self._dev: bytes | None = None  # major:minor of our mount, once seen in mountinfo
        self._fd = -1  # /proc/self/mountinfo, kept open: its poll says the table changed
        self._poll: select.poll | None = None if mountpoint else select.poll()

    def current(self) -> AtimePolicy:
        """Itself, its flags re-read if the mount table changed since the last question."""
        if self._poll is None:
            try:
                self._fd = os.open(mounttable.MOUNTINFO, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._poll = select.poll()  # no /proc: the mount's options stay
                return self
            self._poll = select.poll()
            self._poll.register(self._fd, _CHANGED)
            self._read()
        elif self._fd >= 0 and self._poll.poll(0):
            self._read()
        return self

    def _read(self) -> None:
        try:
            text = mounttable.read()
        except OSError:
            return
        found = self.pick(text)
        if found is not None:
            self._dev, options = found
            self.files, self.dirs = flags_of(options)

    def pick(self, text: bytes) -> tuple[bytes, set[str]] | None:
        """Our mount's (major:minor, per-mount and superblock options) in mountinfo `text`:
        the last FUSE mount on our mountpoint (the one mounted last there is ours when first
        asked: the mount is live), then by its device, wherever it has moved."""
        best = None
        for dev, where, opts, fstype, super_opts in mounttable.entries(text):
            if not fstype.startswith(b"fuse"):
                continue
            if self._dev is not None and dev != self._dev:
                continue
            if where == self.target or (self._dev is not None and best is None):
                best = (dev, set(opts.decode().split(",")) | _ro_only(super_opts))
        return best


def _ro_only(super_opts: bytes) -> set[str]:
    """A read-only superblock (`remount,ro` of a FUSE mount) makes every mount of it so."""
    return {"ro"} if b"ro" in super_opts.split(b",") else set()
