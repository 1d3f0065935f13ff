"""Worker threads for the calls that wait for the disk (a copy-up's data and its fsync, fsync,
fsyncdir), handed over for less than `trio.to_thread.run_sync` costs.

Why not trio's: a call through it took 84-87 µs on the test VM (2 vCPUs; `await
trio.to_thread.run_sync(int)`, medians of 2,000), against 44 µs here: trio takes a capacity
limiter token, names the thread twice (prctl), copies the context and comes back through
its wake-up socket and a scheduler pass.  Each of the 1,000 copy-ups of the W7 benchmark
waits for one such call (its fsync), so its requests wait for the hand-over too.

How: every worker has its own eventfd.  `run` gives the call to an idle worker (or starts
one), then waits for that worker's eventfd to become readable, shielded from cancellation
as `trio.to_thread.run_sync` is by default: the call always runs to its end, and its
result or exception comes back.  At most MAX_BUSY calls run at once (trio's default
limit too); further ones wait their turn.  Idle workers stay for the life of the daemon
(threads that wait cost no CPU; at most MAX_BUSY of them).
Concurrency: `run` is called from the trio thread only; `_idle`, `_busy` and `_turns` are
touched there only.  A worker touches its own `_job`/`_result` while its caller waits.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")
MAX_BUSY = 40


class _Worker:
    def __init__(self) -> None:
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]] = (
            queue.SimpleQueue()
        )
        self.result: tuple[bool, Any] | None = None
        threading.Thread(target=self._serve, name="layerfs worker", daemon=True).start()

    def give(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._jobs.put((fn, args))

    def _serve(self) -> None:
        while True:
            fn, args = self._jobs.get()
            try:
                self.result = (True, fn(*args))
            except BaseException as exc:  # handed back to the caller, which raises it
                self.result = (False, exc)
            os.eventfd_write(self.efd, 1)


_idle: list[_Worker] = []
_busy = 0
_turns = trio.lowlevel.ParkingLot()  # calls waiting for one of the MAX_BUSY to end


async def run(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a worker thread; returns its result or raises its exception."""
    global _busy
    with trio.CancelScope(shield=True):
        while _busy >= MAX_BUSY:
            await _turns.park()
        _busy += 1
        worker = _idle.pop() if _idle else _Worker()
        try:
            worker.give(fn, args)
            while True:
                await trio.lowlevel.wait_readable(worker.efd)
                try:
                    os.eventfd_read(worker.efd)
                    break
                except BlockingIOError:
                    continue
        finally:
            _busy -= 1
            _turns.unpark()
    result, worker.result = worker.result, None
    _idle.append(worker)
    assert result is not None
    ok, value = result
    if ok:
        return value  # type: ignore[no-any-return]
    raise value
