"""The FUSE wire format: header and argument structs, constants, bounds-checked parsing.

Layouts are those of the kernel's `include/uapi/linux/fuse.h` (protocol 7.31 and newer; the
connection negotiates the minor in INIT).  Pure and stateless: nothing here does I/O, so every
function is unit-tested on byte strings.  Parsing never trusts the request: a short or
inconsistent one raises `Malformed` carrying the errno to answer with, never IndexError or
struct.error.  Concurrency: none (immutable module-level structs).
"""

from __future__ import annotations

import errno
import functools
import os
import struct

KERNEL_VERSION = 7
MIN_MINOR = 31  # map_alignment in init_out, 64-byte init_in; FOPEN_CACHE_DIR, max_pages
OUR_MINOR = 45

# ---- INIT flags (flags | flags2 << 32) -------------------------------------------------
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
WRITEBACK_CACHE = 1 << 16
NO_OPEN_SUPPORT = 1 << 17
PARALLEL_DIROPS = 1 << 18
POSIX_ACL = 1 << 20
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
HANDLE_KILLPRIV_V2 = 1 << 28
SETXATTR_EXT = 1 << 29
INIT_EXT = 1 << 30
PASSTHROUGH = 1 << 37

INIT_FLAG_NAMES = {
    ASYNC_READ: "ASYNC_READ",
    ATOMIC_O_TRUNC: "ATOMIC_O_TRUNC",
    EXPORT_SUPPORT: "EXPORT_SUPPORT",
    BIG_WRITES: "BIG_WRITES",
    DONT_MASK: "DONT_MASK",
    AUTO_INVAL_DATA: "AUTO_INVAL_DATA",
    DO_READDIRPLUS: "DO_READDIRPLUS",
    READDIRPLUS_AUTO: "READDIRPLUS_AUTO",
    WRITEBACK_CACHE: "WRITEBACK_CACHE",
    NO_OPEN_SUPPORT: "NO_OPEN_SUPPORT",
    PARALLEL_DIROPS: "PARALLEL_DIROPS",
    POSIX_ACL: "POSIX_ACL",
    MAX_PAGES: "MAX_PAGES",
    CACHE_SYMLINKS: "CACHE_SYMLINKS",
    NO_OPENDIR_SUPPORT: "NO_OPENDIR_SUPPORT",
    HANDLE_KILLPRIV_V2: "HANDLE_KILLPRIV_V2",
    SETXATTR_EXT: "SETXATTR_EXT",
    INIT_EXT: "INIT_EXT",
    PASSTHROUGH: "PASSTHROUGH",
}

# ---- OPEN/OPENDIR reply flags -----------------------------------------------------------
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_NOFLUSH = 1 << 5  # protocol 7.35
FOPEN_PASSTHROUGH = 1 << 7  # protocol 7.40; open_out.backing_id names the backing file

# ---- SETATTR valid bits -----------------------------------------------------------------
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_CTIME = 1 << 10

FATTR_KILL_SUIDGID = 1 << 11  # HANDLE_KILLPRIV_V2: a truncate by a caller without CAP_FSETID

FSYNC_FDATASYNC = 1 << 0
WRITE_KILL_SUIDGID = 1 << 2  # fuse_write_in.write_flags (HANDLE_KILLPRIV_V2)
OPEN_KILL_SUIDGID = 1 << 0  # fuse_open_in/fuse_create_in.open_flags (HANDLE_KILLPRIV_V2)

# ---- structs ----------------------------------------------------------------------------
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
_ATTR = "QQQQQQIIIIIIIIII"  # fuse_attr, 88 bytes
U64 = (1 << 64) - 1
ENTRY_OUT = struct.Struct("<QQQQII" + _ATTR)  # 128
ATTR_OUT = struct.Struct("<QII" + _ATTR)  # 104
INIT_IN = struct.Struct("<IIIII")  # major minor max_readahead flags flags2 (then unused[11])
INIT_IN_COMPAT = struct.Struct("<IIII")
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")  # 64 bytes (.., flags2, max_stack_depth)
OPEN_OUT = struct.Struct("<QIi")  # fh open_flags backing_id/padding
WRITE_OUT = struct.Struct("<II")
GETXATTR_OUT = struct.Struct("<II")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")  # fuse_kstatfs, 80 bytes
DIRENT = struct.Struct("<QQII")  # ino off namelen type, then the name padded to 8

GETATTR_IN = struct.Struct("<IIQ")
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")  # 88
MKNOD_IN = struct.Struct("<IIII")
MKDIR_IN = struct.Struct("<II")
RENAME_IN = struct.Struct("<Q")
RENAME2_IN = struct.Struct("<QII")
LINK_IN = struct.Struct("<Q")
OPEN_IN = struct.Struct("<II")
CREATE_IN = struct.Struct("<IIII")
RELEASE_IN = struct.Struct("<QIIQ")
FLUSH_IN = struct.Struct("<QIIQ")
READ_IN = struct.Struct("<QQIIQII")  # 40
WRITE_IN = struct.Struct("<QQIIQII")  # 40
FSYNC_IN = struct.Struct("<QII")
FALLOCATE_IN = struct.Struct("<QQQII")  # fh offset length mode padding (7.19)
LSEEK_IN = struct.Struct("<QqII")  # fh offset whence padding (7.24)
LSEEK_OUT = struct.Struct("<Q")
# fh_in off_in nodeid_out fh_out off_out len flags (7.28); the reply is WRITE_OUT, or for
# COPY_FILE_RANGE_64 (7.45) the bytes copied as a u64
COPY_FILE_RANGE_IN = struct.Struct("<QQQQQQQ")
COPY_FILE_RANGE_64_OUT = struct.Struct("<Q")
STATX_IN = struct.Struct("<IIQII")  # getattr_flags reserved fh sx_flags sx_mask (7.39)
IOCTL_IN = struct.Struct("<QIIQII")  # fh flags cmd arg in_size out_size, then in_size bytes
IOCTL_OUT = struct.Struct("<iIII")  # result flags in_iovs out_iovs, then the out bytes
# The ioctls served (the kernel's FUSE client sends them for lsattr/chattr: fuse_fileattr_get
# and _set, and for a caller's own ioctl(2)); the value: the struct fsxattr form.  Any other
# is answered ENOTTY, as a file without such an ioctl answers.
IOCTL_GETTERS = {0x80086601: False, 0x80046601: False, 0x801C581F: True}  # (32)GETFLAGS, FSGET..
IOCTL_SETTERS = {0x40086602: False, 0x40046602: False, 0x401C5820: True}  # (32)SETFLAGS, FSSET..
IOCTL_UNRESTRICTED = 1 << 1  # FUSE_IOCTL_UNRESTRICTED: CUSE only
# fuse_statx_out: attr_valid attr_valid_nsec flags spare[2], then fuse_statx (256 bytes):
# mask blksize attributes nlink uid gid mode pad ino size blocks attributes_mask, four
# fuse_sx_time (sec nsec reserved: atime btime ctime mtime), rdev and dev major/minor, spare
STATX_OUT = struct.Struct("<QIIQQ" + "IIQIIIHHQQQQ" + "qIi" * 4 + "IIII" + "112x")
STATX_BASIC_STATS = 0x7FF
STATX_BTIME = 0x800
SETXATTR_IN = struct.Struct("<II")  # size, flags: without FUSE_SETXATTR_EXT
SETXATTR_IN_EXT = struct.Struct("<IIII")  # size, flags, setxattr_flags, padding (7.33)
SETXATTR_ACL_KILL_SGID = 1 << 0  # setxattr_flags: the caller may not keep setgid
GETXATTR_IN = struct.Struct("<II")
ACCESS_IN = struct.Struct("<II")
INTERRUPT_IN = struct.Struct("<Q")
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
BACKING_MAP = struct.Struct("<iIQ")  # fuse_backing_map: fd flags padding
NOTIFY_INVAL_INODE = struct.Struct("<Qqq")
NOTIFY_INVAL_ENTRY = struct.Struct("<QII")
NOTIFY_STORE = struct.Struct("<QQII")  # fuse_notify_store_out: nodeid offset size padding
NOTIFY_INVAL_INODE_CODE = 2
NOTIFY_INVAL_ENTRY_CODE = 3
NOTIFY_STORE_CODE = 4


class Malformed(Exception):
    """A request that cannot be parsed; answered with `errno`, never fatal."""

    def __init__(self, message: str, err: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = err


class Header:
    """The fixed part of one request.  `body` is the argument bytes (extensions cut off)."""

    __slots__ = ("opcode", "unique", "nodeid", "uid", "gid", "pid", "body")

    def __init__(self, opcode: int, unique: int, nodeid: int, uid: int, gid: int, pid: int,
                 body: memoryview) -> None:  # fmt: skip
        self.opcode = opcode
        self.unique = unique
        self.nodeid = nodeid
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.body = body


def parse_header(buf: memoryview) -> Header:
    """The header of one request read from /dev/fuse.  Raises Malformed when the buffer is
    shorter than a header (then nobody can be answered: `unique` is 0) or disagrees with the
    header's own length (EIO; `unique` is set on the exception so the request is answered)."""
    n = len(buf)
    if n < IN_HEADER.size:
        raise Malformed(f"short read: {n} bytes", errno.EIO)
    length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = IN_HEADER.unpack_from(buf, 0)
    end = length - extlen * 8
    if length != n or end < IN_HEADER.size:
        exc = Malformed(f"header says {length} bytes (ext {extlen * 8}), read {n}", errno.EIO)
        exc.unique = unique  # type: ignore[attr-defined]
        raise exc
    return Header(opcode, unique, nodeid, uid, gid, pid, buf[IN_HEADER.size : end])


def unpack(st: struct.Struct, body: memoryview, what: str) -> tuple:
    if len(body) < st.size:
        raise Malformed(f"{what}: {len(body)} bytes, need {st.size}")
    return st.unpack_from(body, 0)


def cstring(body: memoryview, offset: int) -> tuple[bytes, int]:
    """One NUL-terminated string at `offset`: it and the end offset.  (`cstrings` for one,
    0.36 → 0.19 µs: most requests carry one name.)"""
    name, nul, _ = bytes(body[offset:]).partition(b"\0")
    if not nul:
        raise Malformed("string without its NUL terminator")
    return name, offset + len(name) + 1


def cstrings(body: memoryview, offset: int, count: int) -> tuple[list[bytes], int]:
    """`count` NUL-terminated strings starting at `offset`; returns them and the end offset."""
    out: list[bytes] = []
    raw = bytes(body[offset:])
    pos = 0
    for _ in range(count):
        nul = raw.find(b"\0", pos)
        if nul < 0:
            raise Malformed("string without its NUL terminator")
        out.append(raw[pos:nul])
        pos = nul + 1
    return out, offset + pos


def pack_attr_fields(a, ino: int) -> tuple:  # type: ignore[no-untyped-def]
    """The 16 fields of fuse_attr from an object with pyfuse3 EntryAttributes' names; `ino`
    is the st_ino to show (the node id is `a.st_ino`, they differ for index=off links)."""
    at, mt, ct = a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns
    return (
        ino, a.st_size, a.st_blocks,
        # seconds are signed in the kernel (time64_t) but u64 on the wire: before 1970 they
        # go as two's complement; floor division keeps the nanoseconds in [0, 1e9)
        at // 1_000_000_000 & U64, mt // 1_000_000_000 & U64, ct // 1_000_000_000 & U64,
        at % 1_000_000_000, mt % 1_000_000_000, ct % 1_000_000_000,
        a.st_mode, a.st_nlink, a.st_uid, a.st_gid, a.st_rdev & 0xFFFFFFFF, a.st_blksize, 0,
    )  # fmt: skip


def signed64(value: int) -> int:
    """A u64 wire field the kernel means as signed (times: time64_t)."""
    return value - (1 << 64) if value >= 1 << 63 else value


@functools.lru_cache(maxsize=16)  # a mount uses a handful of timeouts, for every reply
def _split_timeout(t: float) -> tuple[int, int]:
    sec = int(t)
    return sec, int((t - sec) * 1e9)


def pack_entry(a, ino: int) -> bytes:  # type: ignore[no-untyped-def]
    """fuse_entry_out for node `a.st_ino` showing st_ino `ino`; `a.st_ino` 0 is a negative
    entry (nodeid 0, cached for entry_timeout)."""
    es, ens = _split_timeout(a.entry_timeout)
    if a.st_ino == 0:
        return ENTRY_OUT.pack(0, 0, es, 0, ens, 0, *((0,) * 16))
    ats, atn = _split_timeout(a.attr_timeout)
    return ENTRY_OUT.pack(a.st_ino, a.generation, es, ats, ens, atn, *pack_attr_fields(a, ino))


def pack_attr_out(a, ino: int) -> bytes:  # type: ignore[no-untyped-def]
    ats, atn = _split_timeout(a.attr_timeout)
    return ATTR_OUT.pack(ats, atn, 0, *pack_attr_fields(a, ino))


def pack_statx_out(a, ino: int, btime: tuple[int, int] | None) -> bytes:  # type: ignore[no-untyped-def]
    """fuse_statx_out: a GETATTR reply's attributes (node `a.st_ino` showing st_ino `ino`),
    and the birth time (seconds, nanoseconds) where the real file has one."""
    ats, atn = _split_timeout(a.attr_timeout)
    mask = STATX_BASIC_STATS | (STATX_BTIME if btime is not None else 0)
    bs, bn = btime or (0, 0)
    at, mt, ct = a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns
    rdev = a.st_rdev
    return STATX_OUT.pack(
        ats, atn, 0, 0, 0,
        mask, a.st_blksize, 0, a.st_nlink, a.st_uid, a.st_gid, a.st_mode & 0xFFFF, 0,
        ino, a.st_size, a.st_blocks, 0,
        at // 1_000_000_000, at % 1_000_000_000, 0,
        bs, bn, 0,
        ct // 1_000_000_000, ct % 1_000_000_000, 0,
        mt // 1_000_000_000, mt % 1_000_000_000, 0,
        os.major(rdev), os.minor(rdev), 0, 0,
    )  # fmt: skip


def dirent_size(name: bytes, plus: bool) -> int:
    base = (DIRENT.size + len(name) + 7) & ~7
    return base + ENTRY_OUT.size if plus else base


def pack_dirent(ino: int, off: int, mode: int, name: bytes, entry: bytes | None) -> bytes:
    """One fuse_dirent (entry None) or fuse_direntplus (entry = a packed fuse_entry_out)."""
    pad = b"\0" * ((8 - (len(name) & 7)) & 7)
    head = DIRENT.pack(ino, off, len(name), (mode >> 12) & 0xF)
    return (entry or b"") + head + name + pad


def pack_reply(unique: int, error: int, payload: bytes = b"") -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), -error, unique) + payload


def pack_notify(code: int, payload: bytes) -> bytes:
    """A notification: a reply to no request (unique 0) whose error field is its code."""
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), code, 0) + payload


def pack_request(opcode: int, unique: int, nodeid: int, body: bytes, uid: int = 0,
                 gid: int = 0, pid: int = 0) -> bytes:  # fmt: skip
    """A request as the kernel writes it (for tests and tools)."""
    return IN_HEADER.pack(IN_HEADER.size + len(body), opcode, unique, nodeid, uid, gid, pid,
                          0, 0) + body  # fmt: skip


def flag_names(flags: int) -> str:
    names = [n for bit, n in sorted(INIT_FLAG_NAMES.items()) if flags & bit]
    rest = flags & ~sum(INIT_FLAG_NAMES)
    if rest:
        names.append(f"{rest:#x}")
    return "|".join(names) or "0"
