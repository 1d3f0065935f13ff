"""Reading the files of an image source safely: a directory (oci:) or a tar (oci-archive:,
docker-archive:), behind one small interface.

  - `DirFiles(root)` opens only regular files: a FIFO, a device or a directory in the layout
    is refused at once (opened O_NONBLOCK, then checked with fstat), never waited on.
  - `TarFiles(path)` reads the tar's headers once (bounded by `tarsafe.SafeTarInfo` and
    MAX_MEMBERS) and then streams the members asked for, nothing else: nothing is extracted
    to disk, an unreferenced member costs nothing.  Only regular members are served; a
    symlink, a hard link or a device is "not a regular file" (so no link is ever followed and a
    link loop cannot happen).  Names are normalised (`./x` is `x`).
  - `read(name, limit)` reads a whole small document (index.json, a manifest, a config),
    refusing one larger than `limit`; `open(name)` is a context manager giving a binary stream.
Errors: `BadArchive` (naming the archive and the member) for anything a hostile or broken
file can cause — not a tar, truncated, bad compression, oversized headers; `None`/`missing`
is the caller's to report.  Threads: TarFiles serialises member reads with a lock (one shared
file position); DirFiles is stateless.
"""

from __future__ import annotations

import contextlib
import lzma
import os
import stat
import tarfile
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from . import tarsafe
from .errors import BadArchive, StoreError

MAX_MEMBERS = 100_000  # members of one archive (an image has a few dozen)
# what a broken or hostile tar makes tarfile (or its decompressors) raise
TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError, ValueError)


class Missing(StoreError):
    """No such file in the source (the caller says which kind of thing is missing)."""


class DirFiles:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.where = str(root)

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[BinaryIO]:
        path = self.root / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise Missing(f"{path}: no such file") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise BadArchive(f"{path} is not a regular file")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        with os.fdopen(fd, "rb") as f:
            yield f

    def read(self, name: str, limit: int) -> bytes:
        with self.open(name) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise BadArchive(f"{self.root / name} is larger than {limit} bytes")
        return data


class TarFiles:
    def __init__(self, path: Path, kind: str) -> None:
        self.where = f"{kind} {path}"
        self._lock = threading.Lock()
        try:
            self.tar = tarfile.open(path, "r:*", tarinfo=tarsafe.SafeTarInfo)
        except FileNotFoundError:
            raise Missing(f"{path}: no such file") from None
        except tarfile.ReadError:
            raise BadArchive(f"{self.where} is not a tar archive (plain or compressed)") from None
        except (*TAR_ERRORS, StoreError) as exc:
            raise BadArchive(f"{self.where} is not a tar archive: {_why(exc)}") from None
        try:
            self.members = self._index()
        except BaseException:
            self.tar.close()
            raise

    def _index(self) -> dict[str, tarfile.TarInfo]:
        members: dict[str, tarfile.TarInfo] = {}
        count = 0
        try:
            while (m := self.tar.next()) is not None:
                count += 1
                if count > MAX_MEMBERS:
                    raise BadArchive(f"{self.where} has more than {MAX_MEMBERS} members")
                members[_normal(m.name)] = m
                self.tar.members = []  # type: ignore[attr-defined]  # one table: ours
        except StoreError as exc:
            if isinstance(exc, BadArchive):
                raise
            raise BadArchive(f"{self.where}: {exc}") from None
        except TAR_ERRORS as exc:
            raise BadArchive(f"{self.where} is damaged: {_why(exc)}") from None
        return members

    def _member(self, name: str) -> tarfile.TarInfo:
        m = self.members.get(_normal(name))
        if m is None:
            raise Missing(f"{self.where} lacks {name}")
        if not m.isreg():
            raise BadArchive(f"{self.where}: {name} is not a regular file")
        return m

    def size(self, name: str) -> int:
        return self._member(name).size

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[BinaryIO]:
        m = self._member(name)
        with self._lock:
            try:
                f = self.tar.extractfile(m)
                assert f is not None  # a regular member
                yield _Guarded(f, f"{self.where}: {name}")  # type: ignore[arg-type,misc]
            except TAR_ERRORS as exc:
                raise BadArchive(f"{self.where}: {name}: {_why(exc)}") from None

    def read(self, name: str, limit: int) -> bytes:
        if self._member(name).size > limit:
            raise BadArchive(f"{self.where}: {name} is larger than {limit} bytes")
        with self.open(name) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise BadArchive(f"{self.where}: {name} is larger than {limit} bytes")
        return data

    def close(self) -> None:
        self.tar.close()


class _Guarded:
    """A member's stream whose read errors (truncation, bad compression) are BadArchive."""

    def __init__(self, f: BinaryIO, where: str) -> None:
        self._f = f
        self._where = where

    def read(self, n: int = -1) -> bytes:
        try:
            data = self._f.read(n)
        except TAR_ERRORS as exc:
            raise BadArchive(f"{self._where}: {_why(exc)}") from None
        return data


def _normal(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return "/".join(parts)


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "…"
