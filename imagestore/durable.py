"""Durable writes: the one primitive behind every file the store (or a push) publishes.

The sequence (DESIGN.md, "Data safety"): write under a temp name on the same filesystem,
hash while writing, fsync the file, verify digest and size, rename into place, fsync the
directory that now names it.  A crash at any point leaves the old file (or none) plus temp
debris, never a short or wrong file under the final name.

  - `AtomicFile(dest, expected=, size=)`: the whole sequence for a file written beside
    `dest` (`.NAME.RANDOM.tmp`); a context manager that publishes on a clean exit and removes
    the temp file on any failure.  Its `write` hashes when there is something to verify.
  - `sync_file(f)`, `publish(src, dest)`, `check(...)` and `fsync_dir(path)` are its steps,
    for writers whose temp file lives elsewhere (store.Ingest: a locked, resumable file under
    ingest/, renamed into blobs/) or whose tree is not a file (unpack's layer directories).
One object per writer; no shared state.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from .digest import Digest
from .errors import DigestMismatch


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the directory's entries (a rename into it, a new name) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_file(f: IO[bytes]) -> None:
    """Everything written to `f` is on disk (Python's buffer, then the kernel's)."""
    f.flush()
    os.fsync(f.fileno())


def publish(src: Path, dest: Path, *, replace: bool = True, sync: bool = True) -> None:
    """Rename a synced file to `dest` and make the rename durable.  `replace=False` keeps a
    `dest` that is already there (content-addressed: it is the same bytes) and drops `src`."""
    if not replace and dest.exists():
        src.unlink()
        return
    os.replace(src, dest)
    if sync:
        fsync_dir(dest.parent)


def check(
    what: str, got: Digest | None, size: int, expected: Digest | None, want: int | None
) -> None:
    """Raise DigestMismatch naming `what` unless the written bytes are what was expected."""
    if want is not None and size != want:
        raise DigestMismatch(f"{what}: got {size} bytes, expected {want}")
    if expected is not None and got is not None and got != expected:
        raise DigestMismatch(f"{what}: digest mismatch: expected {expected}, got {got}")


class AtomicFile:
    """A file written under a temp name beside `dest`, published by the `with` block's clean
    exit: synced, verified against `expected`/`size` when given, renamed, directory synced."""

    def __init__(
        self,
        dest: Path,
        *,
        expected: Digest | None = None,
        size: int | None = None,
        sync: bool = True,
    ) -> None:
        self.dest = dest
        # False only when the caller syncs the whole filesystem next anyway (an unpack's
        # syncfs), so the file is not flushed twice; the rename is still atomic
        self.sync = sync
        self.expected = expected
        self.size = size
        self.tmp = dest.with_name(f".{dest.name}.{os.urandom(4).hex()}.tmp")
        self.written = 0
        # hashing costs CPU: only when there is a digest to check
        self._hash: Any = expected.hasher() if expected is not None else None
        self._file: IO[bytes] | None = None

    def __enter__(self) -> AtomicFile:
        self._file = open(self.tmp, "wb")  # noqa: SIM115 (closed in __exit__)
        return self

    def write(self, data: bytes) -> int:
        assert self._file is not None
        if self._hash is not None:
            self._hash.update(data)
        self.written += len(data)
        return self._file.write(data)

    @property
    def file(self) -> IO[bytes]:
        """The temp file itself, for a writer that wants a real file (tarfile); what goes
        through it directly is neither hashed nor counted, so use it without expected/size."""
        assert self._file is not None and self._hash is None and self.size is None
        return self._file

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._file is not None
        try:
            if exc_type is None:
                if self.sync:
                    sync_file(self._file)
                self._file.close()
                got = Digest.from_hash(self._hash) if self._hash is not None else None
                check(str(self.dest), got, self.written, self.expected, self.size)
                publish(self.tmp, self.dest, sync=self.sync)
        finally:
            self._file.close()
            with contextlib.suppress(FileNotFoundError):
                self.tmp.unlink()


def write_atomic(path: Path, data: bytes) -> None:
    """`data` as the whole new content of `path`, durably (a small document: index.json, a
    mount record, a marker)."""
    with AtomicFile(path) as f:
        f.write(data)
