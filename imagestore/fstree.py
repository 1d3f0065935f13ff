"""Removing directory trees of any depth: iterative, relative to directory fds, few fds.

shutil.rmtree (Python 3.11) recurses once per level and keeps one fd per level open, so a
2,000-deep tree (a hostile layer, a user's upper) raises RecursionError or EMFILE, and the
debris it leaves then breaks every later `gc`.  Here:
  - `remove_at(dir_fd, name)` removes `name` (a tree, a file, a symlink: never followed)
    under the directory `dir_fd`.  It walks down with openat and back up with `..`, holding
    two fds at most; each `..` is checked against the device and inode seen on the way
    down, so a directory moved meanwhile stops the walk (OSError ESTALE) instead of sending
    it elsewhere.  Memory: the names still to visit, one list per level.
  - Directories without owner rwx (a non-root layer's read-only dirs) are made 0700 first,
    when we may (as the owner or root); otherwise removing their entries fails as usual.
  - `remove_tree(path)` is `remove_at` on the path's parent; `quietly=True` logs a failure
    instead of raising (the clean-up of debris).
Errors: OSError, naming the path below the start where it happened.  Not atomic: a failure
leaves part of the tree (callers only remove trees no reader uses).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree(path: str | os.PathLike[str], quietly: bool = False) -> None:
    """Remove the file or tree at `path`, whatever its depth; nothing there is fine."""
    p = Path(os.path.abspath(path))
    try:
        parent = os.open(p.parent, _DIR)
    except FileNotFoundError:
        return
    try:
        remove_at(parent, os.fsencode(p.name))
    except OSError as exc:
        if not quietly:
            raise
        log.error("could not remove %s: %s", p, exc)
    finally:
        os.close(parent)


def remove_at(dir_fd: int, name: bytes | str) -> None:
    """Remove `name` under `dir_fd`: a non-directory is unlinked, a tree emptied then removed."""
    name = os.fsencode(name)
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    _Remover(dir_fd).run(name, st)


class _Remover:
    def __init__(self, top_fd: int) -> None:
        self.top_fd = top_fd
        self.names: list[bytes] = []  # the path from top_fd to the current directory
        self.ids: list[tuple[int, int]] = []  # (st_dev, st_ino) of each of them
        self.pending: list[list[bytes]] = []  # subdirectories still to remove, per level

    def run(self, name: bytes, st: os.stat_result) -> None:
        fd = self._enter(self.top_fd, name, st)
        try:
            while True:
                if self.pending[-1]:
                    sub = self.pending[-1].pop()
                    try:
                        sub_st = os.stat(sub, dir_fd=fd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if not stat.S_ISDIR(sub_st.st_mode):
                        self._unlink(fd, sub)
                        continue
                    child = self._enter(fd, sub, sub_st)
                    os.close(fd)
                    fd = child
                    continue
                # this directory is empty: go up and remove it
                gone = self.names.pop()
                self.ids.pop()
                self.pending.pop()
                up = self._up(fd)
                os.close(fd)
                fd = up
                self._rmdir(fd, gone)
                if not self.names:
                    return
        finally:
            if fd != self.top_fd:
                os.close(fd)

    def _enter(self, parent: int, name: bytes, st: os.stat_result) -> int:
        """Open a directory (made 0700 when it lacks owner rwx), unlink its non-directories,
        and push it, with its subdirectories as pending."""
        if st.st_mode & 0o700 != 0o700 and os.geteuid() in (0, st.st_uid):
            try:  # a directory by lstat; the fd opened next is checked to be the same one
                os.chmod(name, 0o700, dir_fd=parent)
            except OSError:
                pass
        try:
            fd = os.open(name, _DIR, dir_fd=parent)
        except OSError as exc:
            raise self._error(exc, name) from None
        where = name
        try:
            got = os.fstat(fd)
            if (got.st_dev, got.st_ino) != (st.st_dev, st.st_ino):
                raise OSError(errno.ESTALE, "the directory changed while it was removed")
            subdirs: list[bytes] = []
            with os.scandir(fd) as it:
                entries = [(os.fsencode(e.name), e.is_dir(follow_symlinks=False)) for e in it]
            for n, is_dir in entries:
                if is_dir:
                    subdirs.append(n)
                    continue
                where = name + b"/" + n
                try:
                    os.unlink(n, dir_fd=fd)
                except FileNotFoundError:
                    pass
        except OSError as exc:
            os.close(fd)
            raise self._error(exc, where) from None
        except BaseException:
            os.close(fd)
            raise
        self.names.append(name)
        self.ids.append((got.st_dev, got.st_ino))
        self.pending.append(subdirs)
        return fd

    def _up(self, fd: int) -> int:
        """The parent of the directory open as `fd`, checked against what we walked down."""
        if not self.ids:
            return self.top_fd
        up = os.open(b"..", _DIR, dir_fd=fd)
        got = os.fstat(up)
        if (got.st_dev, got.st_ino) != self.ids[-1]:
            os.close(up)
            raise self._error(OSError(errno.ESTALE, "a directory moved while it was removed"))
        return up

    def _unlink(self, fd: int, name: bytes) -> None:
        try:
            os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._error(exc, name) from None

    def _rmdir(self, fd: int, name: bytes) -> None:
        try:
            os.rmdir(name, dir_fd=fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._error(exc, name) from None

    def _error(self, exc: OSError, *more: bytes) -> OSError:
        where = b"/".join([*self.names, *more])
        if len(where) > 300:
            where = b"\xe2\x80\xa6" + where[-300:]
        return OSError(exc.errno, exc.strerror or str(exc), os.fsdecode(where))
