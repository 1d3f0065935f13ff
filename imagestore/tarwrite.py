"""tarwrite: the writing side of `tarstream` — the PAX tar that
`tarfile.open(mode="w", format=PAX_FORMAT, encoding="utf-8", errors="surrogateescape")` writes,
byte for byte, at a fraction of its cost per member.

    out = TarWriter(sink)          sink: anything with write(bytes)
    out.add(info)                  a member without data (directory, symlink, link, marker)
    out.add(info, read)            a member and info.size bytes from read(n)
    out.close()                    the two zero blocks and the record padding, as tarfile ends

Why: commit writes one member per changed file, and tarfile spends most of a small member's
time on the way to its 512 header bytes (`TarFile.addfile` copies the TarInfo, builds a dict
of its fields, tests every field for a PAX header, packs each number through `itn`, sums the
checksum field by field).  `header` builds the common member — ASCII names that fit, no PAX
records, numbers that fit their octal fields, no device numbers — in one format operation,
and hands every other member to tarfile's own `TarInfo.tobuf`, so the bytes never differ
(tested against tarfile member by member, and whole archives).  Keeping tarfile's bytes keeps
commit's digests what they were.
Concurrency: none; one writer per tar, used by one thread.
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Callable
from typing import Any

BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
CHUNK = 1 << 20  # data is copied in pieces of at most this many bytes
_FAST_TYPES = frozenset(
    (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.DIRTYPE,
     tarfile.FIFOTYPE, tarfile.CONTTYPE)
)  # fmt: skip
_SMALL = 8**7  # uid, gid: 7 octal digits and a NUL
_LARGE = 8**11  # size, mtime: 11 octal digits and a NUL
# name, mode, uid, gid, size, mtime, checksum (spaces while summed), type, linkname, magic,
# uname, gname, devmajor and devminor (empty), prefix (empty); 500 bytes, then the block's rest
_HEADER = b"%s%07o\0%07o\0%07o\0%011o\0%011o\0        %s%s" + tarfile.POSIX_MAGIC
_TAIL = b"%s%s" + b"\0" * (16 + 155 + 12)


def header(info: tarfile.TarInfo) -> bytes:
    """The header block(s) tarfile writes for `info` in PAX format (utf-8, surrogateescape)."""
    name, link, kind = info.name, info.linkname, info.type
    if kind == tarfile.DIRTYPE and not name.endswith("/"):
        name += "/"
    uid, gid, size, mtime = info.uid, info.gid, info.size, info.mtime
    if (
        info.pax_headers
        or kind not in _FAST_TYPES
        or len(name) > 100
        or len(link) > 100
        or len(info.uname) > 32
        or len(info.gname) > 32
        or not (name.isascii() and link.isascii() and info.uname.isascii() and info.gname.isascii())
        or type(uid) is not int
        or type(gid) is not int
        or type(size) is not int
        or type(mtime) is not int
        or not (0 <= uid < _SMALL and 0 <= gid < _SMALL)
        or not (0 <= size < _LARGE and 0 <= mtime < _LARGE)
        or "\0" in name
    ):
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    # text fields are NUL-padded to their width, as tarfile's `stn` does
    head = _HEADER % (
        name.encode().ljust(100, b"\0"),
        info.mode & 0o7777,
        uid,
        gid,
        size,
        mtime,
        kind,
        link.encode().ljust(100, b"\0"),
    ) + _TAIL % (info.uname.encode().ljust(32, b"\0"), info.gname.encode().ljust(32, b"\0"))
    # The byte sum, with the checksum field as eight spaces (as it is now).  adler32's low
    # half is the byte sum modulo 65521, and the sum here is at most 36,931 (ASCII text
    # fields, octal digits, the magic): exact, and 5× faster than sum(head)
    chksum = zlib.adler32(head, 0) & 0xFFFF
    return b"%s%06o\0%s" % (head[:148], chksum, head[155:])


class TarWriter:
    """Members in order, then the end of the archive; `offset` is the bytes written so far."""

    def __init__(self, out: Any) -> None:
        self._write: Callable[[bytes], Any] = out.write
        self.offset = 0

    def add(self, info: tarfile.TarInfo, read: Callable[[int], bytes] | None = None) -> None:
        """One member; with `read`, its info.size bytes of data (short data is an error, as
        with tarfile: the archive would be corrupt).  The header goes out with the first
        piece of data and the padding with the last: a small file is one write."""
        head = header(info)
        if read is None:
            self._put(head)
            return
        left = info.size
        while left:
            data = read(min(left, CHUNK))
            if not data:
                raise OSError("unexpected end of data")  # tarfile's words
            left -= len(data)
            if head:
                data, head = head + data, b""
            if not left:
                data += b"\0" * (-info.size % BLOCK)
            self._put(data)
        if head:  # an empty file
            self._put(head)

    def _put(self, data: bytes) -> None:
        self._write(data)
        self.offset += len(data)

    def close(self) -> None:
        """Two zero blocks, then zeros to the next record: tarfile's end."""
        end = 2 * BLOCK
        self._put(b"\0" * (end + -(self.offset + end) % RECORD))
