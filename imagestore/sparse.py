"""Sparse files in layer tars: find a file's holes, write it as a PAX 1.0 sparse member.

A commit of an upper holding `truncate -s 2G f` must not write 2 GiB of zeros.  The format is
GNU tar's PAX "1.0" sparse member (the one GNU tar writes with --sparse --posix):
  - PAX records `GNU.sparse.major=1`, `GNU.sparse.minor=0`, `GNU.sparse.name=<real name>`,
    `GNU.sparse.realsize=<size>`; the ustar name is `<dir>/GNUSparseFile.0/<base>`, type '0';
  - the member's data starts with the map in decimal text — the count, then offset and length
    of each data region, one number a line — padded with NULs to 512 bytes, then the data
    regions back to back.
Readers: GNU tar, Go's archive/tar (hence containers-storage, podman, buildah, skopeo and
umoci, which unpack with it: holes come back as zeros or holes), Python's tarfile (hence our own
unpack, which keeps the holes: tarapply).  A reader that knows no sparse format would see a
file named GNUSparseFile.0/<base> holding the map: so only files with at least `MIN_HOLES`
bytes of holes are written sparse; every other file is a plain member, as before.

Holes are the filesystem's (SEEK_DATA / SEEK_HOLE), so the bytes of a layer follow how the
upper's filesystem stores the file; a filesystem without SEEK_HOLE reports none (dense).
"""

from __future__ import annotations

import errno
import os
import tarfile
from typing import Any

MIN_HOLES = 1 << 20  # write a file sparse only when this many bytes of it are holes
MAX_REGIONS = 1 << 16  # more data regions than this: write it dense (tarsafe's bound)

Regions = list[tuple[int, int]]


def data_regions(fd: int, size: int) -> Regions | None:
    """The (offset, length) data regions of an open file when it is worth writing sparse
    (holes ≥ MIN_HOLES, at most MAX_REGIONS regions); None otherwise."""
    if size < MIN_HOLES or os.fstat(fd).st_blocks * 512 >= size:
        return None  # small, or fully allocated: no holes worth the trouble
    regions: Regions = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole from pos to the end
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            regions.append((start, end - start))
            if len(regions) > MAX_REGIONS:
                return None
            pos = end
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise
    finally:
        os.lseek(fd, 0, os.SEEK_SET)
    if size - sum(n for _, n in regions) < MIN_HOLES:
        return None
    if not regions or sum(regions[-1]) < size:
        regions.append((size, 0))  # a trailing hole: GNU tar takes the size from the map
    return regions


def sparse_member(
    info: tarfile.TarInfo, fd: int, size: int, regions: Regions, content: Any = None
) -> _SparseData:
    """Turn `info` (a regular file's header, name set) into a PAX 1.0 sparse member and give
    the stream of its data (map, then regions) for `TarFile.addfile`.  With `content` (a
    hasher), the file's whole content passes through it as it is read, holes as zeros (see
    `_SparseData.content_digest`)."""
    head, _, base = info.name.rpartition("/")
    real = info.name
    info.name = f"{head}/GNUSparseFile.0/{base}" if head else f"GNUSparseFile.0/{base}"
    info.type = tarfile.REGTYPE
    lines = [str(len(regions))] + [str(x) for region in regions for x in region]
    table = ("\n".join(lines) + "\n").encode()
    table += b"\0" * (-len(table) % tarfile.BLOCKSIZE)
    info.pax_headers = {
        **info.pax_headers,
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": real,
        "GNU.sparse.realsize": str(size),
    }
    info.size = len(table) + sum(n for _, n in regions)
    return _SparseData(table, fd, regions, size, content)


class _SparseData:
    """read(n) over the map, then each data region (pread: the fd's offset is not used)."""

    def __init__(
        self, table: bytes, fd: int, regions: Regions, size: int = 0, content: Any = None
    ) -> None:
        self._pending = table
        self._fd = fd
        self._regions = list(reversed(regions))
        self._region = (0, 0)
        self._size = size
        self._content = content
        self._hashed = 0  # how much of the file `content` has seen

    def content_digest(self) -> bytes:
        """The digest of the whole file (`content`'s), once every region was read."""
        self._zeros_to(self._size)
        return bytes(self._content.digest())

    def _zeros_to(self, offset: int) -> None:
        """Feed the hole from what `content` has seen up to `offset`, as zeros."""
        if self._content is None or offset <= self._hashed:
            return
        zeros = bytes(min(offset - self._hashed, 1 << 20))
        while self._hashed < offset:
            n = min(offset - self._hashed, len(zeros))
            self._content.update(zeros[:n])
            self._hashed += n

    def read(self, n: int = -1) -> bytes:
        """Exactly `n` bytes unless the data ends first (tarfile's copy insists)."""
        if n < 0:
            n = 1 << 20
        parts: list[bytes] = []
        want = n
        while want:
            piece = self._piece(want)
            if not piece:
                break
            parts.append(piece)
            want -= len(piece)
        return b"".join(parts)

    def _piece(self, n: int) -> bytes:
        if self._pending:
            out, self._pending = self._pending[:n], self._pending[n:]
            return out
        while self._region[1] == 0:
            if not self._regions:
                return b""
            self._region = self._regions.pop()
        off, length = self._region
        data = os.pread(self._fd, min(n, length), off)
        if not data:
            raise OSError(errno.EIO, "the file shrank while it was committed")
        if self._content is not None:
            self._zeros_to(off)
            self._content.update(data)
            self._hashed = off + len(data)
        self._region = (off + len(data), length - len(data))
        return data
