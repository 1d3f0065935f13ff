"""`imagestore.forked`: the life of the forked children a pull (unpacker) and a commit
(layerbuild) run — what comes back, what the child keeps, and a parent that ignores SIGCHLD."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from imagestore import forked


def _lost(status: int) -> Exception:
    return LookupError(f"lost ({status:#x})")


def _run(work, data: bytes = b""):
    pid, feed, results = forked.spawn(work, 1 << 16)
    try:
        os.write(feed, data)
    finally:
        os.close(feed)
    return forked.collect(results, pid, _lost)


def test_the_result_comes_back():
    assert _run(lambda fd: ("read", os.read(fd, 100), 42), b"hello") == ("read", b"hello", 42)


def test_the_exception_comes_back():
    def work(fd):
        raise FileNotFoundError(2, "gone", "/x")

    with pytest.raises(FileNotFoundError) as caught:
        _run(work)
    assert (caught.value.errno, caught.value.filename) == (2, "/x")


class _Picky(Exception):
    def __init__(self, a: int, b: int) -> None:  # pickles, but does not load back
        super().__init__(f"{a}+{b}")


def test_an_exception_that_does_not_load_back_comes_as_its_words():
    def work(fd):
        raise _Picky(1, 2)

    with pytest.raises(RuntimeError, match=r"_Picky: 1\+2"):
        _run(work)


def test_a_child_that_dies_is_lost():
    with pytest.raises(LookupError, match="lost"):
        _run(lambda fd: os.kill(os.getpid(), signal.SIGKILL))


def test_the_child_keeps_only_stdio_and_its_pipes(tmp_path):
    """An fd of the parent's (say, the store's lock file) is closed in the child."""

    def open_fds(fd: int) -> list[str]:
        out = []
        for n in os.listdir("/proc/self/fd"):
            try:
                out.append(os.readlink(f"/proc/self/fd/{n}"))
            except FileNotFoundError:  # the listing's own fd, closed by now
                pass
        return out

    inherited = os.open(tmp_path, os.O_RDONLY)
    try:
        seen = _run(open_fds)
    finally:
        os.close(inherited)
    assert str(tmp_path) not in seen
    assert len(seen) <= 5  # stdio, the pipe's end, the result's


def test_a_parent_that_ignores_sigchld():
    """SIGCHLD ignored (a disposition a parent passes on through exec): the kernel reaps the
    child itself and waitpid fails with ECHILD once it has exited; the result still comes
    back, and a killed child is still waited for.  In a process of its own: the test
    process's subprocess calls need SIGCHLD."""
    code = """
import os, signal
from imagestore import forked
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
pid, feed, results = forked.spawn(lambda fd: os.read(fd, 10), 1 << 16)
os.write(feed, b"hello")
os.close(feed)
assert forked.collect(results, pid, RuntimeError) == b"hello"
pid, feed, results = forked.spawn(lambda fd: os.read(fd, 10), 1 << 16)
os.kill(pid, signal.SIGKILL)
assert forked.reap(pid) == 0
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    got = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == "ok"
