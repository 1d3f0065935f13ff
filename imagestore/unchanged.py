"""Unchanged: is an object of the upper the same as the lower object it covers?

    same = Unchanged(lowers, fingerprint_files)     one fingerprints file (or None) per lower
    same(upper_path, upper_st, lower_path, lower_st) -> bool

A copied-up file that was written back with the bytes and metadata it had (`apt-get
install --reinstall`, `dpkg-deb -x` of the installed version, a `cp -a` over itself) is not a
change of the merged tree, and commit leaves it out of the layer, as umoci's mtree comparison
does: the image's tree is the same, the layer smaller.  "The same" is strict: type and
permission bits, owner, size, mtime to the nanosecond, one link on both sides (an upper copy
never shares its inode; a lower file that does keeps its group), the user-visible xattrs
(`changeset.user_xattrs`: names and values), and

  - a symlink: the same target;
  - a regular file: the same bytes.  When the lower file's layer has a fingerprints file (every
    layer of the store: `imagestore.fingerprints`), the upper file's xxh3-128 is compared with
    the one recorded for the lower file — which is only trusted when the recorded size, mode
    and mtime are the lower file's now — so the lower file is not read; otherwise the two
    files are compared byte by byte.  An upper file with holes (≥ `sparse.MIN_HOLES`) is kept:
    hashing would read its holes.

Directories are not decided here (commit keeps every upper directory: its entry carries the
metadata its children's directory gets when the layer is unpacked).  xxhash only detects
changes (DESIGN.md): a digest match is what lets a file be left out, never what names it.
Concurrency: single-threaded; reads only; a layer's fingerprints are read once, at the first
file that needs them, and kept (path → entry of its regular files).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from unionfs.fsat import PLAIN

from . import fingerprints, sparse
from .changeset import user_xattrs

READ_CHUNK = 1 << 20


class Unchanged:
    def __init__(self, lowers: list[Path], fingerprint_files: list[Path | None]) -> None:
        self._roots = [
            (os.fsencode(os.path.abspath(p)) + b"/", f)
            for p, f in zip(lowers, fingerprint_files, strict=True)
        ]
        self._known: dict[bytes, dict[bytes, fingerprints.Entry] | None] = {}
        self.left_out = 0  # objects found unchanged (a count for the caller's log)

    def __call__(
        self, path: bytes, st: os.stat_result, lower: bytes, lower_st: os.stat_result
    ) -> bool:
        same = self._same(path, st, lower, lower_st)
        self.left_out += same
        return same

    def _same(self, path: bytes, st: os.stat_result, lower: bytes, lst: os.stat_result) -> bool:
        if (
            st.st_mode != lst.st_mode
            or st.st_uid != lst.st_uid
            or st.st_gid != lst.st_gid
            or st.st_size != lst.st_size
            or st.st_mtime_ns != lst.st_mtime_ns
            or st.st_nlink != 1
            or lst.st_nlink != 1
        ):
            return False
        if stat.S_ISLNK(st.st_mode):
            content_same = PLAIN.readlink(path) == PLAIN.readlink(lower)
        elif stat.S_ISREG(st.st_mode):
            if st.st_blocks * 512 + sparse.MIN_HOLES <= st.st_size:
                return False
            content_same = self._same_bytes(path, lower, lst)
        else:
            return False
        return content_same and user_xattrs(path) == user_xattrs(lower)

    def _same_bytes(self, path: bytes, lower: bytes, lst: os.stat_result) -> bool:
        recorded = self._recorded(lower)
        if recorded is not None and (
            recorded.size == lst.st_size
            and recorded.mode == lst.st_mode
            and recorded.mtime_ns == lst.st_mtime_ns
        ):
            return _xxh3(path) == recorded.digest
        return _equal_files(path, lower)

    def _recorded(self, lower: bytes) -> fingerprints.Entry | None:
        """The fingerprints entry of the regular file `lower`, when its layer has them."""
        root, file = next(((r, f) for r, f in self._roots if lower.startswith(r)), (b"", None))
        if file is None:
            return None
        if root not in self._known:
            try:
                self._known[root] = {
                    e.path: e for e in fingerprints.read(file) if stat.S_ISREG(e.mode)
                }
            except (OSError, fingerprints.FingerprintsDamaged):
                self._known[root] = None  # compare the bytes instead
        known = self._known[root]
        return known.get(lower[len(root) :]) if known is not None else None


def _xxh3(path: bytes) -> bytes:
    fd = PLAIN.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return fingerprints.hash_fd(fd)
    finally:
        os.close(fd)


def _equal_files(a: bytes, b: bytes) -> bool:
    fa = PLAIN.open(a, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fb = PLAIN.open(b, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            while True:
                ca, cb = os.read(fa, READ_CHUNK), os.read(fb, READ_CHUNK)
                if ca != cb:
                    return False
                if not ca:
                    return True
        finally:
            os.close(fb)
    finally:
        os.close(fa)
