"""filepool: small regular files created by worker threads while a tar applier goes on.

Why: on a disk where each file creation waits for the journal (hundreds of µs on the test
VM), creations in parallel overlap those waits; a layer of small files unpacks up to twice as
fast.  Pending creations are keyed by path; the applier (tarapply.LayerWriter) keeps the
tar's order by draining before anything looks at a pending path (`drain_under`) or could look
anywhere (`drain`).  A worker's failure is raised by the next drain.

Threads: used by the applier's thread only; the workers run what it submits.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class FilePool:
    """At most MAX_PENDING creations in flight (their data is held in memory: the applier
    sends only files of at most tarapply.POOL_FILE_BYTES); the workers touch nothing but
    their own file and the writer's digests/warnings (stores and appends, atomic under the
    GIL)."""

    MAX_PENDING = 64

    def __init__(self, workers: int) -> None:
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="tarapply")
        self.pending: dict[bytes, Future[None]] = {}  # path -> its creation, in order
        self._above: set[bytes] = set()  # the parent paths of pending files (until a drain)

    def submit(self, parts: list[bytes], fn: Callable[..., None], *args: Any) -> None:
        while len(self.pending) >= self.MAX_PENDING:  # wait for the oldest
            key = next(iter(self.pending))
            self.pending.pop(key).result()
        self.pending[b"/".join(parts)] = self._executor.submit(fn, *args)
        self._above.update(b"/".join(parts[:i]) for i in range(1, len(parts)))

    def drain_under(self, parts: list[bytes]) -> None:
        """Drain if `parts` is a pending file, a parent of one (an entry there may remove
        the directory) or below one."""
        key = b"/".join(parts)
        if key in self.pending or key in self._above:
            return self.drain()
        for i in range(1, len(parts)):
            if b"/".join(parts[:i]) in self.pending:
                return self.drain()
        return None

    def drain(self) -> None:
        pending, self.pending = self.pending, {}
        self._above.clear()
        error: BaseException | None = None
        for future in pending.values():  # wait for all, raise the first failure in order
            try:
                future.result()
            except BaseException as exc:  # noqa: BLE001 - the first is raised below
                error = error or exc
        if error is not None:
            raise error

    def shutdown(self) -> None:
        pending, self.pending = self.pending, {}
        self._above.clear()
        for future in pending.values():
            future.exception()  # wait; a failure was or will be reported by the caller
        self._executor.shutdown(wait=True)
