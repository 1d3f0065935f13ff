"""INIT negotiation: what we ask for, gated on what the kernel offers and its minor.

`negotiate` is pure (request bytes in, reply bytes and a `Conn` out), so every branch is unit
tested.  No feature is assumed: each is asked for only when the kernel's INIT flags offer it
(and, for open-reply flags, when the minor defines it); the result is logged under -d.
Concurrency: none.
"""

from __future__ import annotations

import errno

from . import wire
from .wire import Malformed

PAGE = 4096
MAX_PAGES = 256  # 1 MiB WRITE/READ requests
# Background requests the kernel keeps in flight at once (RELEASE, RELEASEDIR, readahead and
# written-back pages); the rest wait in its own queue, and each one sent waits behind every
# synchronous request already queued.  With the usual 12-16, many processes opening and
# closing at once (99 `cp -r` of one directory: xfstests generic/273) close files faster
# than their RELEASEs can come: the daemon held 17,500 descriptors of closed files within
# 15 s and refused opens (ENFILE; fuse-overlayfs with libfuse's 12 reached its 20,000 and
# failed with EMFILE).  With 256 the same run held at most ~200.  The congestion threshold
# (above which the kernel skips asynchronous readahead) stays at libfuse's three quarters.
MAX_BACKGROUND = 256
CONGESTION_THRESHOLD = 192
PASSTHROUGH_STACK_DEPTH = 1  # init_out.max_stack_depth when passthrough is granted


class Wanted:
    """What the mount would like; `negotiate` grants the subset the kernel offers."""

    __slots__ = ("writeback", "read_only", "cache_symlinks", "passthrough", "killpriv",
                 "posix_acl", "opens")  # fmt: skip

    def __init__(self, writeback: bool = False, read_only: bool = False,
                 cache_symlinks: bool = True, passthrough: bool = False,
                 killpriv: bool = True, posix_acl: bool = True,
                 opens: bool = False) -> None:  # fmt: skip
        self.writeback = writeback  # FUSE_WRITEBACK_CACHE
        self.read_only = read_only  # a stack without an upper: no-open / no-opendir
        # every open must reach the daemon, also read-only (no no-open): one whose data is
        # in a data-only layer fails there when that data is missing, as on the kernel
        self.opens = opens
        self.cache_symlinks = cache_symlinks
        self.passthrough = passthrough  # FUSE_PASSTHROUGH (then never the writeback cache)
        # FUSE_HANDLE_KILLPRIV_V2: the daemon clears setuid/setgid (the real file system
        # clears security.capability on our write/truncate/chown), so the kernel stops
        # asking for security.capability before every write(2)
        self.killpriv = killpriv
        # FUSE_POSIX_ACL: the kernel checks permissions with the ACLs (as kernel overlayfs
        # does through the real inode's ACLs) and caches them, so `ls -l` over a cached
        # listing asks nothing (without it every getxattr of system.posix_acl_* is a
        # request: 3,761 of W2 warm's 5,542).  SETXATTR_EXT with it, so an ACL set by a
        # caller outside the file's group clears setgid (FUSE_SETXATTR_ACL_KILL_SGID).
        self.posix_acl = posix_acl


class Conn:
    """The negotiated connection (plain slots: a dataclass costs ~1 ms of start-up)."""

    __slots__ = ("minor", "kernel_flags", "flags", "max_write", "max_readahead", "no_open",
                 "no_opendir", "cache_dir", "noflush")  # fmt: skip

    def __init__(self, *, minor: int, kernel_flags: int, flags: int, max_write: int,
                 max_readahead: int, no_open: bool, no_opendir: bool, cache_dir: bool,
                 noflush: bool) -> None:  # fmt: skip
        self.minor = minor
        self.kernel_flags = kernel_flags
        self.flags = flags
        self.max_write = max_write
        self.max_readahead = max_readahead
        self.no_open = no_open  # answer OPEN/FLUSH with ENOSYS (kernel: fh 0, KEEP_CACHE)
        self.no_opendir = no_opendir  # answer OPENDIR with ENOSYS (KEEP_CACHE|CACHE_DIR)
        self.cache_dir = cache_dir  # FOPEN_CACHE_DIR known to the kernel (7.28)
        self.noflush = noflush  # FOPEN_NOFLUSH known to the kernel (7.35)

    @property
    def killpriv(self) -> bool:
        """FUSE_HANDLE_KILLPRIV_V2 granted: WRITE/SETATTR/OPEN say when to clear setuid."""
        return bool(self.flags & wire.HANDLE_KILLPRIV_V2)

    @property
    def setxattr_ext(self) -> bool:
        """FUSE_SETXATTR_EXT granted: SETXATTR carries setxattr_flags (a 16-byte header)."""
        return bool(self.flags & wire.SETXATTR_EXT)

    @property
    def passthrough(self) -> bool:
        """FUSE_PASSTHROUGH granted: OPEN/CREATE may hand the kernel a backing file."""
        return bool(self.flags & wire.PASSTHROUGH)

    @property
    def bufsize(self) -> int:
        """A read buffer for any request: the largest WRITE plus headers."""
        return self.max_write + PAGE

    def describe(self) -> str:
        return (
            f"protocol 7.{self.minor}; kernel offers {wire.flag_names(self.kernel_flags)}; "
            f"negotiated {wire.flag_names(self.flags)}; max_write {self.max_write}; "
            f"no_open={self.no_open} no_opendir={self.no_opendir} cache_dir={self.cache_dir} "
            f"noflush={self.noflush}"
        )


def base_flags(want: Wanted) -> int:
    """What every mount asks for (libfuse's defaults that pyfuse3 uses, plus the caches)."""
    flags = (
        wire.ASYNC_READ
        | wire.ATOMIC_O_TRUNC
        | wire.EXPORT_SUPPORT
        | wire.BIG_WRITES
        | wire.AUTO_INVAL_DATA
        | wire.DO_READDIRPLUS
        | wire.PARALLEL_DIROPS
        | wire.MAX_PAGES
        | wire.INIT_EXT
    )
    if want.passthrough and not want.read_only:
        # The kernel refuses passthrough together with the writeback cache (a file's data
        # would have two caches); passthrough is asked for first, writeback only without it.
        flags |= wire.PASSTHROUGH
    elif want.writeback and not want.read_only:
        flags |= wire.WRITEBACK_CACHE
    if want.cache_symlinks:
        flags |= wire.CACHE_SYMLINKS
    if want.killpriv and not want.read_only:
        flags |= wire.HANDLE_KILLPRIV_V2
    if want.posix_acl:
        # DONT_MASK: CREATE/MKDIR/MKNOD bring the mode without the umask, so a default ACL
        # decides the mode instead of it (the handlers apply the umask otherwise: acl.py)
        flags |= wire.POSIX_ACL | wire.SETXATTR_EXT | wire.DONT_MASK
    return flags


def parse_init(body: memoryview) -> tuple[int, int, int, int]:
    """(major, minor, max_readahead, flags incl. flags2 << 32) of a fuse_init_in."""
    if len(body) < wire.INIT_IN_COMPAT.size:
        raise Malformed(f"init_in: {len(body)} bytes", errno.EIO)
    major, minor, max_ra, flags = wire.INIT_IN_COMPAT.unpack_from(body, 0)
    if flags & wire.INIT_EXT and len(body) >= wire.INIT_IN.size:
        flags |= wire.INIT_IN.unpack_from(body, 0)[4] << 32
    return major, minor, max_ra, flags


def negotiate(body: memoryview, want: Wanted) -> tuple[bytes, Conn | None, int]:
    """The INIT reply payload, the connection (None when refused) and the errno (0 = ok)."""
    major, minor, max_ra, kflags = parse_init(body)
    if major != wire.KERNEL_VERSION or minor < wire.MIN_MINOR:
        # A newer major: answer with ours and the kernel retries (protocol rule); an older
        # minor than we support: refuse.
        if major > wire.KERNEL_VERSION:
            return wire.INIT_OUT.pack(wire.KERNEL_VERSION, wire.OUR_MINOR, *(0,) * 10), None, 0
        return b"", None, errno.EPROTO
    granted = base_flags(want) & kflags
    if want.writeback and not want.read_only and not granted & wire.PASSTHROUGH:
        granted |= wire.WRITEBACK_CACHE & kflags  # passthrough asked for but not offered
    if granted & wire.WRITEBACK_CACHE:
        # No ATOMIC_O_TRUNC with the writeback cache: with both, the kernel truncates at OPEN
        # without waiting for the dirty pages it is writing back, so data written before an
        # open(O_TRUNC) could reach the file after it was emptied (a stress run of two
        # openers: the kernel's size 1,228 bytes, the file's 2,635).  Without it the kernel
        # truncates with a SETATTR, after its writes in flight, as for truncate(2).  Cost: a
        # lower file opened O_TRUNC is copied up with its data, which the SETATTR then drops.
        granted &= ~wire.ATOMIC_O_TRUNC
    no_open = want.read_only and not want.opens and bool(kflags & wire.NO_OPEN_SUPPORT)
    # No OPENDIR/RELEASEDIR on any stack: opening a directory copies nothing up, so the
    # kernel may skip it (two requests per directory listed) and keep every listing
    # (KEEP_CACHE|CACHE_DIR), dropping it itself when a request through it changes the
    # directory; the handlers keep one listing handle per directory (DirHandle).  No-open
    # stays for stacks without an upper: an open for writing copies up.
    no_opendir = bool(kflags & wire.NO_OPENDIR_SUPPORT)
    max_write = MAX_PAGES * PAGE if granted & wire.MAX_PAGES else 32 * PAGE
    conn = Conn(
        minor=min(minor, wire.OUR_MINOR),
        kernel_flags=kflags,
        flags=granted,
        max_write=max_write,
        max_readahead=max_ra,
        no_open=no_open,
        no_opendir=no_opendir,
        cache_dir=minor >= 28,
        noflush=minor >= 35,
    )
    payload = wire.INIT_OUT.pack(
        wire.KERNEL_VERSION,
        conn.minor,
        max_ra,
        granted & 0xFFFFFFFF,
        MAX_BACKGROUND,
        CONGESTION_THRESHOLD,
        max_write,
        1,  # time_gran: nanoseconds
        MAX_PAGES if granted & wire.MAX_PAGES else 0,
        0,  # map_alignment
        granted >> 32,
        # backing files must live on a filesystem that is not itself stacked (depth 0)
        PASSTHROUGH_STACK_DEPTH if granted & wire.PASSTHROUGH else 0,
    )
    return payload, conn, 0
