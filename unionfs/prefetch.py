"""Prefetch: a helper process lists the subdirectories of a directory the kernel is listing,
ahead of the daemon, so that a tree walk on a cold cache waits for the disk less.

Role: a tree walk (`find`, `ls -lR`, `du`, `tar c`, `rsync`, a build's COPY) lists a
directory and then each of its subdirectories.  For each of those the daemon makes a getdents
of every layer's copy and an lstat of every entry (the attributes READDIRPLUS carries); on a
cold cache each of these waits for the disk in turn, with the round trips to the kernel in
between, where the disk idles.  So when the daemon takes a fresh listing of a directory for
the kernel (`UnionOperations.readdir`), it hands the real paths of that directory's
subdirectories (every layer's copy) to a helper process, which lists each one and lstats each
entry, touching nothing.  The daemon's own calls then find them in the kernel's dentry and
inode caches.  Measured (README, Performance, "Prefetch"): `find -ls` of the benchmark's
15,000-file tree on a cold cache, 2.0 s → 1.6 s.

What it never does:
  - change anything, or read a file's data;
  - resolve a path through the mountpoint: directories under a layer root the mount shadows
    (fsat.Roots holds those roots as fds, since their paths lead into the mount) are never
    sent;
  - keep a layer's filesystem busy once the mount is gone: the helper is killed and reaped
    the moment the mount ends (`serving.at_unmount`, as the daemon lets go of its own files),
    and it stops by itself once the daemon is gone (the pipe's end, or a new parent);
  - make the daemon wait: see Concurrency.
It starts at the START_AFTER-th fresh listing with subdirectories in it, so a mount that
lists a few directories (a container that starts and runs) never pays for its start: a
Python interpreter without `site`, ~10 ms of CPU, on another CPU as a rule, and ~8 MB.
`prefetch=0` (options.py) turns it off.

Concurrency: `listed` and `close` are called from the session's thread (trio's, or the loop
before trio), between awaits.  The helper is a process and not a thread of the daemon: a
thread would take the GIL from the session at each of its syscalls (W1 cold by hand: 1.75 –
1.86 s with a thread, 1.57 – 1.62 s with the process).  Paths go through a pipe in messages of
at most PIPE_BUF bytes written without blocking: each such write is whole or fails, and when
the pipe is full (the helper is behind) the rest of the batch is dropped.  It is a hint.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import sys

from .stack import Entry, LayerStack

TYPE_CHECKING = False  # typing's own constant (logs.py)
if TYPE_CHECKING:
    from subprocess import Popen

log = logging.getLogger("layerfs")

START_AFTER = 4  # fresh listings with subdirectories before the helper is started
WAITING_MAX = 4096  # paths kept until then
MESSAGE_MAX = select.PIPE_BUF  # one atomic write
# The helper, run as `python -I -S -c HELPER FD`: reads NUL-ended paths from FD and lists
# each (scandir + lstat of every entry).  It stops at the pipe's end, and when its parent
# (the daemon) is gone; a path seen lately is not listed again.
HELPER = """
import os, sys
fd, parent = int(sys.argv[1]), os.getppid()
seen, rest, batches = set(), b"", []
while os.getppid() == parent:
    os.set_blocking(fd, not batches)
    try:
        data = os.read(fd, 65536)
    except BlockingIOError:
        data = None
    if data == b"":
        break
    if data:
        *paths, rest = (rest + data).split(b"\\0")
        if paths:
            paths.reverse()
            batches.append(paths)
    if not batches:
        continue
    batch = batches[-1]
    path = batch.pop()
    if not batch:
        batches.pop()
    if path in seen:
        continue
    if len(seen) >= 65536:
        seen.clear()
    seen.add(path)
    try:
        try:  # O_NOATIME: warming the cache must not mark a layer's atime
            dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOATIME)
        except PermissionError:
            dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with os.scandir(dfd) as entries:
                for entry in entries:
                    try:
                        entry.stat(follow_symlinks=False)
                    except OSError:
                        pass
        finally:
            os.close(dfd)
    except OSError:
        pass
"""


def messages(paths: list[bytes]) -> list[bytes]:
    """`paths` as NUL-ended messages of at most MESSAGE_MAX bytes each; a path too long for
    one message is left out."""
    out: list[bytes] = []
    batch: list[bytes] = []
    size = 0
    for path in paths:
        n = len(path) + 1
        if n > MESSAGE_MAX:
            continue
        if size + n > MESSAGE_MAX:
            out.append(b"\0".join(batch) + b"\0")
            batch, size = [], 0
        batch.append(path)
        size += n
    if batch:
        out.append(b"\0".join(batch) + b"\0")
    return out


class Prefetcher:
    """Sends the subdirectories of fresh listings to the helper (started on demand)."""

    def __init__(self, stack: LayerStack, enabled: bool = True) -> None:
        self.enabled = enabled
        self.listings = 0  # fresh listings with subdirectories, until the helper starts
        self.proc: Popen[bytes] | None = None  # the helper, once started
        self._fd = -1  # the pipe's writing end
        self._waiting: list[bytes] = []  # paths listed before the helper started
        # layers whose root the mount shadows, or that fsat.Roots does not know: never sent
        self._skip: set[int] = set()
        for i, root in enumerate(stack.layers):
            try:
                if not isinstance(stack.fs.handle(root), bytes):
                    self._skip.add(i)
            except KeyError:
                self._skip.add(i)

    def listed(self, listing: dict[bytes, Entry]) -> None:
        """A fresh listing of a directory was taken for the kernel."""
        if not self.enabled:
            return
        skip = self._skip
        paths = [
            d.path
            for e in listing.values()
            if e.dirs is not None
            for d in e.dirs
            if d.layer not in skip
        ]
        if not paths:
            return
        if self._fd < 0:
            # until the helper starts, the paths wait here: the first listings of a walk
            # are its widest (sending only from the 8th listing on lost a third of the gain)
            self.listings += 1
            self._waiting.extend(paths[: WAITING_MAX - len(self._waiting)])
            if self.listings < START_AFTER or not self._start():
                return
            paths, self._waiting = self._waiting, []
        for message in messages(paths):
            try:
                os.write(self._fd, message)
            except BlockingIOError:
                return  # the helper is behind: the rest is dropped
            except OSError as exc:  # the helper is gone (EPIPE)
                log.debug("prefetch: stopped (%s)", exc)
                self.close()
                return

    def _start(self) -> bool:
        import subprocess  # here: it costs a mount that never lists much ~5 ms

        rfd, wfd = os.pipe()  # both close-on-exec; the helper gets `rfd` by pass_fds
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", HELPER, str(rfd)],
                pass_fds=(rfd,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # never the caller's output (daemon.py)
                stderr=subprocess.DEVNULL,
            )
        except OSError as exc:
            log.warning("prefetch: cannot start its helper: %s", exc)
            os.close(wfd)
            self.enabled = False
            return False
        finally:
            os.close(rfd)
        os.set_blocking(wfd, False)
        self._fd = wfd
        from .serving import at_unmount

        at_unmount(self.close)
        return True

    def close(self) -> None:
        """Stop the helper and wait for it, for good: a listing after this (the mount is
        gone) starts no new one (idempotent)."""
        self.enabled = False
        self._waiting = []
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                proc.kill()
                proc.wait()
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    log.warning("prefetch: stopping its helper: %s", exc)
