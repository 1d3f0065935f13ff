"""Fingerprints: what an unpacked layer tree holds, entry by entry, so `fsck` can prove that
`layers/<hex>/diff` still equals its blob.

    walk(root_fd, digest_of)      -> Iterator[Entry]   the tree as it is now, in canonical order
    write(path, entries)          -> (count, bytes)    the file, written atomically
    read(path)                    -> Iterator[Entry]   FingerprintsDamaged when it does not parse
    compare(expected, actual)     -> Iterator[Difference]

An Entry is one object of the tree: its path (relative, b"" for the root), st_mode (type and
permissions), uid, gid, size (regular files and symlinks), mtime in ns, rdev (devices and
0/0 whiteouts), every xattr name and value (the overlay markers included: they are part of
the layer), a symlink's target, its hard-link group (the path of the first entry that is the
same inode, b"" for a first or only name), and for a regular file the xxh3-128 of its content.
Not recorded: atime and ctime (reading or relinking changes them), st_ino, st_nlink (the
group says it) and directory sizes (filesystem-specific; a changed listing shows as entries).

Order: depth first, each directory's names sorted bytewise; `sort_key` gives the order, so two
walks merge in one pass (`compare`) without holding either in memory.

The file (`layers/<hex>/fingerprints`): MAGIC, a little-endian u32 VERSION, then one zstd
stream of records (see `_encode`).  It is written once, beside `diff`, by the unpack that made
the tree (the content digests come from the tar stream as it was written: nothing is read
back) or by `fsck --repair` from a fresh unpack of the verified blob; atomic like every store
file (temp name, fsync, rename).  xxhash values only detect changes: they never identify
anything and are never written into OCI metadata (DESIGN.md).

The walk holds two fds at most whatever the depth (down with openat, up with a checked `..`,
as fstree does), never follows a symlink, and is single-threaded; so is everything here.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

import xxhash
import zstandard

from unionfs.fsutil import kind_name

from .durable import AtomicFile
from .errors import StoreError

MAGIC = b"LAYERFP\n"
VERSION = 1
FILE_NAME = "fingerprints"
READ_CHUNK = 1 << 20
MAX_DECODED = 4 << 30  # a fingerprints file never decodes to more (10M entries of ~400 bytes)
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
# path length, mode, uid, gid, size, mtime_ns, rdev, link length, target length, xattr count
_FIXED = struct.Struct("<IIIIQqQIIH")
_XATTR = struct.Struct("<HI")
DIGEST_SIZE = 16


class FingerprintsDamaged(StoreError):
    """A fingerprints file that does not parse (or is of an unknown version)."""


class Entry(NamedTuple):
    """(A NamedTuple, not a frozen dataclass: a walk makes one per object, and a frozen
    dataclass's __init__ costs several times as much.)"""

    path: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    rdev: int = 0
    link: bytes = b""  # hard-link group: the first path of the same inode
    target: bytes = b""  # a symlink's target
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    digest: bytes = b""  # xxh3-128 of a regular file's content

    @property
    def kind(self) -> str:
        return kind_name(self.mode)


def sort_key(path: bytes) -> list[bytes]:
    """The walk's order: depth first, names sorted bytewise (`a`, `a/b`, `a-b`)."""
    return path.split(b"/") if path else []


def new_hasher() -> xxhash.xxh3_128:
    return xxhash.xxh3_128()


def hash_file(dir_fd: int, name: bytes, on_bytes: Callable[[int], None] | None = None) -> bytes:
    """The xxh3-128 of the regular file `name` in `dir_fd` (never followed)."""
    fd = os.open(name, _FILE, dir_fd=dir_fd)
    try:
        return hash_fd(fd, on_bytes)
    finally:
        os.close(fd)


def hash_fd(fd: int, on_bytes: Callable[[int], None] | None = None) -> bytes:
    """The xxh3-128 of what is left to read from the open file `fd`."""
    h = new_hasher()
    while chunk := os.read(fd, READ_CHUNK):
        h.update(chunk)
        if on_bytes is not None:
            on_bytes(len(chunk))
    return h.digest()


# ----- walking a tree ----------------------------------------------------------------------
DigestOf = Callable[[int, bytes, os.stat_result], bytes]


def walk(root_fd: int, digest_of: DigestOf) -> Iterator[Entry]:
    """Every object under the directory open as `root_fd`, the root first, in `sort_key`
    order.  `digest_of(dir_fd, name, st)` gives a regular file's content digest.
    OSError (ESTALE) when a directory moves during the walk."""
    root_st = os.fstat(root_fd)
    links: dict[tuple[int, int], bytes] = {}
    yield _entry(b"", root_st, _xattrs(b"/proc/self/fd/%d" % root_fd), b"", b"", b"")
    fd = os.dup(root_fd)
    path: list[bytes] = []
    ids = [(root_st.st_dev, root_st.st_ino)]
    pending = [_names(fd)]
    # the current directory's path with its slash, and its /proc name (for the xattr calls,
    # which take no dir fd): made when the walk enters or leaves a directory, not per entry
    prefix, proc = b"", b"/proc/self/fd/%d/" % fd
    try:
        while pending:
            if not pending[-1]:
                pending.pop()
                ids.pop()
                if not path:
                    break
                path.pop()
                up = os.open(b"..", _DIR, dir_fd=fd)
                os.close(fd)
                fd = up
                got = os.fstat(fd)
                if (got.st_dev, got.st_ino) != ids[-1]:
                    raise OSError(errno.ESTALE, "a directory moved during the walk")
                prefix = b"/".join(path) + b"/" if path else b""
                proc = b"/proc/self/fd/%d/" % fd
                continue
            name = pending[-1].pop()
            rel = prefix + name
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            xattrs = _xattrs(proc + name)
            if stat.S_ISDIR(st.st_mode):
                yield _entry(rel, st, xattrs, b"", b"", b"")
                sub = os.open(name, _DIR, dir_fd=fd)
                got = os.fstat(sub)
                if (got.st_dev, got.st_ino) != (st.st_dev, st.st_ino):
                    os.close(sub)
                    raise OSError(errno.ESTALE, "a directory moved during the walk")
                os.close(fd)
                fd = sub
                path.append(name)
                ids.append((st.st_dev, st.st_ino))
                pending.append(_names(fd))
                prefix, proc = rel + b"/", b"/proc/self/fd/%d/" % fd
                continue
            link = b""
            if st.st_nlink > 1:
                link = links.setdefault((st.st_dev, st.st_ino), rel)
                link = b"" if link == rel else link
            target = os.readlink(name, dir_fd=fd) if stat.S_ISLNK(st.st_mode) else b""
            digest = digest_of(fd, name, st) if stat.S_ISREG(st.st_mode) else b""
            yield _entry(rel, st, xattrs, link, target, digest)
    finally:
        os.close(fd)


def _names(fd: int) -> list[bytes]:
    """The directory's names, sorted so that pop() gives them in ascending order.  (Listed
    through /proc: a bytes path gives bytes names, where a listing of the fd gives text.)"""
    return sorted(os.listdir(b"/proc/self/fd/%d" % fd), reverse=True)


def _xattrs(path: bytes) -> tuple[tuple[bytes, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return ()
        raise
    if not names:
        return ()
    out = []
    for n in sorted(names):
        try:
            out.append((os.fsencode(n), os.getxattr(path, n, follow_symlinks=False)))
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
    return tuple(out)


def _entry(
    rel: bytes,
    st: os.stat_result,
    xattrs: tuple[tuple[bytes, bytes], ...],
    link: bytes,
    target: bytes,
    digest: bytes,
) -> Entry:
    kind = stat.S_IFMT(st.st_mode)
    sized = kind in (stat.S_IFREG, stat.S_IFLNK)
    dev = kind in (stat.S_IFCHR, stat.S_IFBLK)
    return Entry(
        rel,
        st.st_mode,
        st.st_uid,
        st.st_gid,
        st.st_size if sized else 0,
        st.st_mtime_ns,
        st.st_rdev if dev else 0,
        link,
        target,
        xattrs,
        digest,
    )


# ----- the file ----------------------------------------------------------------------------
def _encode(e: Entry) -> bytes:
    """One record: the fixed part, path, link, target, xattrs (u16 name length, u32 value
    length, name, value), then 16 digest bytes for a regular file."""
    path, mode, uid, gid, size, mtime_ns, rdev, link, target, xattrs, digest = e
    fixed = _FIXED.pack(
        len(path), mode, uid, gid, size, mtime_ns, rdev, len(link), len(target), len(xattrs)
    )
    if not stat.S_ISREG(mode):
        digest = b""
    if not xattrs:  # most entries: one concatenation
        return fixed + path + link + target + digest
    parts = [fixed, path, link, target]
    for name, value in xattrs:
        parts += [_XATTR.pack(len(name), len(value)), name, value]
    parts.append(digest)
    return b"".join(parts)


def write(path: Path, entries: Iterable[Entry], sync: bool = True) -> tuple[int, int]:
    """Write `entries` (in walk order) to `path` atomically (durable.AtomicFile); returns
    (entries, bytes of regular-file content they describe).  `sync=False` when the caller
    syncs the whole filesystem next anyway (an unpack's syncfs), so the file is not flushed
    twice."""
    count = content = 0
    with AtomicFile(path, sync=sync) as out:
        out.file.write(MAGIC + struct.pack("<I", VERSION))
        cctx = zstandard.ZstdCompressor(level=3)
        with cctx.stream_writer(out.file, closefd=False) as z:
            batch: list[bytes] = []
            for e in entries:
                batch.append(_encode(e))
                count += 1
                if stat.S_ISREG(e.mode):
                    content += e.size
                if len(batch) >= 1024:
                    z.write(b"".join(batch))
                    batch.clear()
            z.write(b"".join(batch))
    return count, content


def read(path: Path) -> Iterator[Entry]:
    """The entries of a fingerprints file, in walk order.  FileNotFoundError when there is
    none; FingerprintsDamaged when it does not parse."""
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + 4)
        if len(head) != len(MAGIC) + 4 or not head.startswith(MAGIC):
            raise FingerprintsDamaged(f"{path} is not a fingerprints file")
        (version,) = struct.unpack("<I", head[len(MAGIC) :])
        if version != VERSION:
            raise FingerprintsDamaged(f"{path}: fingerprints version {version} is not known")
        yield from _decode(f, path)


def _decode(f: BinaryIO, path: Path) -> Iterator[Entry]:
    reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
    buf = b""
    pos = 0
    total = 0

    def need(n: int) -> bytes:
        nonlocal buf, pos, total
        while len(buf) - pos < n:
            try:
                more = reader.read(READ_CHUNK)
            except zstandard.ZstdError as exc:
                raise FingerprintsDamaged(f"{path}: {exc}") from None
            if not more:
                raise FingerprintsDamaged(f"{path} is truncated")
            total += len(more)
            if total > MAX_DECODED:
                raise FingerprintsDamaged(f"{path} decodes to more than {MAX_DECODED} bytes")
            buf = buf[pos:] + more
            pos = 0
        out = buf[pos : pos + n]
        pos += n
        return out

    while True:
        if len(buf) - pos == 0:
            try:
                more = reader.read(READ_CHUNK)
            except zstandard.ZstdError as exc:
                raise FingerprintsDamaged(f"{path}: {exc}") from None
            if not more:
                return
            buf, pos = more, 0
        plen, mode, uid, gid, size, mtime, rdev, llen, tlen, nx = _FIXED.unpack(need(_FIXED.size))
        rel, link, target = need(plen), need(llen), need(tlen)
        xattrs = []
        for _ in range(nx):
            nlen, vlen = _XATTR.unpack(need(_XATTR.size))
            xattrs.append((need(nlen), need(vlen)))
        digest = need(DIGEST_SIZE) if stat.S_ISREG(mode) else b""
        yield Entry(rel, mode, uid, gid, size, mtime, rdev, link, target, tuple(xattrs), digest)


# ----- comparing ---------------------------------------------------------------------------
class Difference(NamedTuple):
    """`kind` is "missing", "extra" or "changed"; `what` lists the changed fields (with old
    and new values where they are short); `below` counts entries under a missing or extra
    directory that are not listed one by one."""

    kind: str
    path: bytes
    what: str = ""
    below: int = 0


def compare(expected: Iterable[Entry], actual: Iterable[Entry]) -> Iterator[Difference]:
    """Merge two walks (both in `sort_key` order) into their differences."""
    exp, act = iter(expected), iter(actual)
    e, a = next(exp, None), next(act, None)
    while e is not None or a is not None:
        if a is None or (e is not None and sort_key(e.path) < sort_key(a.path)):
            assert e is not None
            (path, kind, below), e = _skip_below(e, exp)
            yield Difference("missing", path, kind, below)
            continue
        if e is None or sort_key(a.path) < sort_key(e.path):
            (path, kind, below), a = _skip_below(a, act)
            yield Difference("extra", path, kind, below)
            continue
        what = changes(e, a)
        if what:
            yield Difference("changed", e.path, what)
        e, a = next(exp, None), next(act, None)


def _skip_below(first: Entry, rest: Iterator[Entry]) -> tuple[tuple[bytes, str, int], Entry | None]:
    """A missing or extra entry: its path, its kind and, for a directory, the count of the
    entries below it (skipped); with the entry that follows them."""
    prefix = first.path + b"/" if first.path else b""
    count = 0
    nxt = next(rest, None)
    if stat.S_ISDIR(first.mode):
        while nxt is not None and nxt.path.startswith(prefix):
            count += 1
            nxt = next(rest, None)
    return (first.path, first.kind, count), nxt


def changes(e: Entry, a: Entry) -> str:
    """What differs between the recorded entry `e` and the entry `a` found, as text."""
    out = []
    if stat.S_IFMT(e.mode) != stat.S_IFMT(a.mode):
        return f"was a {e.kind}, is a {a.kind}"
    if stat.S_IMODE(e.mode) != stat.S_IMODE(a.mode):
        out.append(f"mode {stat.S_IMODE(e.mode):04o} -> {stat.S_IMODE(a.mode):04o}")
    if (e.uid, e.gid) != (a.uid, a.gid):
        out.append(f"owner {e.uid}:{e.gid} -> {a.uid}:{a.gid}")
    if e.size != a.size:
        out.append(f"size {e.size} -> {a.size}")
    if e.digest != a.digest:
        out.append("content")
    if e.target != a.target:
        out.append(f"target {e.target!r} -> {a.target!r}")
    if e.rdev != a.rdev:
        out.append(
            f"device {os.major(e.rdev)}:{os.minor(e.rdev)} -> {os.major(a.rdev)}:{os.minor(a.rdev)}"
        )
    if e.link != a.link:
        out.append("hard links")
    if e.xattrs != a.xattrs:
        out.append("xattrs")
    if e.mtime_ns != a.mtime_ns:
        out.append("mtime")
    return ", ".join(out)
