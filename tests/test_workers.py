"""unionfs.workers: blocking calls in worker threads, as trio.to_thread.run_sync does them."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from unionfs import workers


def test_a_call_runs_in_another_thread_and_returns_or_raises():
    async def main() -> None:
        assert await workers.run(threading.get_ident) != threading.get_ident()
        assert await workers.run(divmod, 7, 2) == (3, 1)
        with pytest.raises(ZeroDivisionError):
            await workers.run(divmod, 1, 0)
        assert await workers.run(len, "again") == 5  # the worker that raised serves on

    trio.run(main)


def test_calls_run_at_once_and_the_loop_goes_on_while_they_wait():
    """Three calls that wait for each other can only end if they run at the same time, and
    only once a trio task lets them go: the trio thread goes on serving while they wait."""
    barrier = threading.Barrier(3, timeout=10)
    go = threading.Event()

    def call() -> bool:
        barrier.wait()
        return go.wait(timeout=10)

    async def main() -> None:
        results = []

        async def one() -> None:
            results.append(await workers.run(call))

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(one)
            await trio.sleep(0.05)
            go.set()
        assert results == [True, True, True]

    trio.run(main)


def test_at_most_max_busy_calls_run_and_the_others_wait_their_turn(monkeypatch):
    monkeypatch.setattr(workers, "MAX_BUSY", 2)
    running, most = [0], [0]
    lock = threading.Lock()

    def job() -> None:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(workers.run, job)

    trio.run(main)
    assert most[0] == 2


def test_a_cancelled_caller_still_waits_for_its_call_to_end():
    """As trio.to_thread.run_sync by default: the call is not abandoned (a copy-up's thread
    may still be writing the file its caller would otherwise clean up)."""
    done = threading.Event()

    def slow() -> str:
        time.sleep(0.2)
        done.set()
        return "finished"

    async def main() -> None:
        with trio.move_on_after(0.01):
            assert await workers.run(slow) == "finished"
        assert done.is_set()

    trio.run(main)
