"""An unpack in a process of its own, fed the blob's bytes through a pipe as they download.

    job = Unpacker.start(store, source, blob, media_type, diff_id)   # source: a Follower
    ... the caller fetches the blob ...
    tmp, diff_id = job.result()       # or raises what the unpack raised

Why a process: applying a tar is Python work that holds the GIL, so layers unpacked in
threads of one process take turns on one CPU; each layer in a forked child uses them all.
The child runs `unpack.unpack_stream` on the bytes a pump thread of the parent copies from the
Follower into a pipe, writes the layer under `layers/.tmp-*` (synced, not published) and sends
back (temp dir, DiffID) or the exception.  The parent publishes it (or not) under its lock.
Nothing is left behind by the child: on any error — including a pipe closed early because
following broke, or the parent gone — it removes its temp dir before it exits.

The child's life (only its pipes kept, the result or the exception sent back, os._exit) is
`forked`'s; it runs only this module's code path (os calls, hashing, decompression, the tar
applier, logging).
Threads: `start` and `result` are called by one thread of the parent; the pump is its own.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Protocol

from . import forked
from .digest import Digest
from .errors import CorruptLayer
from .follow import FollowBroken
from .store import Store

PIPE_SIZE = 1 << 20  # the pipe's buffer: fewer wake-ups of the child per MiB
PUMP_CHUNK = 1 << 20


class _Source(Protocol):
    def read(self, n: int = ..., /) -> bytes: ...


class _PipeReader:
    """The child's end: the blob's bytes, b'' at the end (or when the parent stops)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read(self, n: int = -1, /) -> bytes:
        return os.read(self.fd, n if n > 0 else PUMP_CHUNK)


class Unpacker:
    def __init__(self, pid: int, results: int, data: int, source: _Source, name: str) -> None:
        self._pid = pid
        self._results = results
        # why following broke (the child was given only a prefix), once `result` returned
        self.broken: FollowBroken | None = None
        self._pump = threading.Thread(
            target=self._pump_to, args=(source, data), name=name, daemon=True
        )
        self._pump.start()

    @classmethod
    def start(
        cls, store: Store, source: _Source, blob: Digest, media_type: str, diff_id: Digest
    ) -> Unpacker:
        # OSError where the pipe or the fork is refused: the caller unpacks in turn instead
        pid, data_w, res_r = forked.spawn(
            lambda fd: _work(store, fd, blob, media_type, diff_id), PIPE_SIZE
        )
        return cls(pid, res_r, data_w, source, f"pump-{blob.short}")

    def _pump_to(self, source: _Source, fd: int) -> None:
        """Copy the followed blob into the child's pipe; close it at the end or when
        following breaks (the child then sees a short stream and fails its digest check)."""
        try:
            while data := source.read(PUMP_CHUNK):
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
        except FollowBroken as exc:
            self.broken = exc
        except OSError:
            # EPIPE: the child stopped reading (it failed); anything else cuts its stream
            # short: either way the child's result says what went wrong
            pass
        finally:
            os.close(fd)

    def result(self) -> tuple[Path, Digest]:
        """Wait for the child; its (temp dir, DiffID), or the exception it raised."""
        self._pump.join()
        tmp, got = forked.collect(self._results, self._pid, _lost)
        return Path(tmp), Digest.parse(got)


def _lost(status: int) -> Exception:
    return CorruptLayer(f"the unpacking process ended without a result ({status:#x})")


def _work(
    store: Store, data_fd: int, blob: Digest, media_type: str, diff_id: Digest
) -> tuple[str, str]:
    """The child's work: the layer unpacked from the pipe; (temp dir, DiffID)."""
    from .unpack import unpack_stream  # imported by the parent already

    tmp, got = unpack_stream(store, _PipeReader(data_fd), blob, media_type, diff_id)
    return str(tmp), str(got)
