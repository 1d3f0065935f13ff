"""Following a blob while it is written: what lets `pull` unpack a layer as it downloads.

    follower = store.follow(digest)     # before the blob is fetched
    ... one thread fetches (any Source: its Ingest reports every write to the follower),
    ... another reads follower.read(n) from byte 0, waiting for bytes not yet written
    follower.writer_done()              # the fetching thread, always, when fetch_blob ends

The reader sees exactly the bytes the Ingest wrote, from its file (a dup of the Ingest's fd,
read with pread, so the file's own position and its rename into blobs/ do not matter).  The
follower trusts nothing: the reader hashes what it reads and checks the blob digest itself.
When the bytes read so far may not be the blob's — the Ingest started over (a server that
ignored a Range request, a resumed partial file that failed to verify), a second Ingest
attached, the blob was already present so nothing was written, or the writer failed — `read`
raises `FollowBroken`: the caller throws away what it built and unpacks the committed blob
the ordinary way, if the fetch succeeded.

Threads: one writer thread (the Ingest's) and one reader thread; a Condition guards the
state.  A reader that gave up (`cancel`) never slows the writer down.
"""

from __future__ import annotations

import os
import threading

from .digest import Digest


class FollowBroken(Exception):
    """The bytes read so far are not known to be the blob's; start again from the blob."""


_WAITING, _WRITING, _COMMITTED, _BROKEN = "waiting", "writing", "committed", "broken"


class Follower:
    def __init__(self, digest: Digest) -> None:
        self.digest = digest
        self._cond = threading.Condition()
        self._state = _WAITING
        self._why = ""
        self._fd: int | None = None
        self._written = 0  # bytes of the file that are written and visible to pread
        self._offset = 0  # the reader's position

    # ----- the writer's side (store.Ingest) -----------------------------------------------
    def attach(self, fd: int, offset: int) -> None:
        """An Ingest of the blob opened its file, which holds `offset` bytes already."""
        with self._cond:
            if self._state != _WAITING:  # a second writer, or the reader gave up
                self._break("a second writer of the blob")
                return
            self._fd = os.dup(fd)
            self._written = offset
            self._state = _WRITING
            self._cond.notify_all()

    def wrote(self, offset: int) -> None:
        with self._cond:
            if self._state == _WRITING:
                self._written = offset
                self._cond.notify_all()

    def restarted(self) -> None:
        with self._cond:
            self._break("the download started over")

    def committed(self) -> None:
        with self._cond:
            if self._state == _WRITING:
                self._state = _COMMITTED
                self._cond.notify_all()

    def writer_done(self) -> None:
        """The fetch returned or raised: a follower not committed by then never will be."""
        with self._cond:
            if self._state != _COMMITTED:
                self._break(
                    "the blob was not written here"
                    if self._state == _WAITING
                    else "the download failed"
                )

    def _break(self, why: str) -> None:
        if self._state != _BROKEN:
            self._state, self._why = _BROKEN, why
            self._cond.notify_all()

    # ----- the reader's side --------------------------------------------------------------
    def read(self, n: int = -1, /) -> bytes:
        """Up to `n` bytes (n < 0: all that is written so far, at least one byte) from the
        reader's position; b'' once the committed blob is read to its end."""
        with self._cond:
            while True:
                if self._state == _BROKEN:
                    raise FollowBroken(self._why)
                if self._offset < self._written:
                    break
                if self._state == _COMMITTED:
                    return b""
                self._cond.wait()
            fd, avail = self._fd, self._written - self._offset
        assert fd is not None
        data = os.pread(fd, avail if n < 0 else min(n, avail), self._offset)
        self._offset += len(data)
        return data

    def cancel(self) -> None:
        """The reader gives up; the writer goes on as if nobody followed."""
        with self._cond:
            self._break("cancelled")

    def close(self) -> None:
        """The reader is done; the caller calls it after the writer is done, too."""
        with self._cond:
            fd, self._fd = self._fd, None
            if self._state != _COMMITTED:
                self._break("closed")
        if fd is not None:
            os.close(fd)
