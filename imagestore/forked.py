"""Work in a forked child: how `unpacker` (a pull's layer) and `layerbuild` (a commit's new
layer directory) run theirs, so that Python work holding the GIL uses a second CPU.

    pid, data_fd, result_fd = forked.spawn(work, pipe_size)  # work(fd of the pipe's far end)
    ... write to data_fd, close it ...
    result = forked.collect(result_fd, pid, lost)            # what work() returned

The child keeps only stdio and its two pipe ends (so it holds none of the parent's
flocks or sockets), runs `work`, sends back what it returned or the exception it raised, and
leaves with os._exit, never returning into the parent's stack.  A plain result (tuples, str,
bytes, numbers) goes by `marshal`, which every Python has loaded; an exception by `pickle`,
loaded only then.  Fork safety is the callers' to keep: the child runs only their code path
(os calls, hashing, decompression, the tar applier, logging — which reinitialises its locks
after fork).  CPython takes the import lock around fork, so no half-imported module is
inherited.
Concurrency: `collect` blocks the calling thread until the child has exited.
"""

from __future__ import annotations

import contextlib
import fcntl
import marshal
import os
from collections.abc import Callable
from typing import Any

MAX_RESULT = 1 << 20  # a result larger than this is not ours
_PLAIN, _RAISED = b"m", b"p"


def spawn(work: Callable[[int], Any], pipe_size: int) -> tuple[int, int, int]:
    """Fork a child that runs `work(fd)` on the read end of a new pipe (its buffer set to
    `pipe_size` where allowed) and sends back its outcome; returns (pid, the pipe's write
    end, the fd its result comes on).  OSError, with nothing left open, where a pipe or the
    fork is refused."""
    data_r, data_w = os.pipe2(os.O_CLOEXEC)
    try:
        res_r, res_w = os.pipe2(os.O_CLOEXEC)
    except OSError:
        os.close(data_r)
        os.close(data_w)
        raise
    with contextlib.suppress(OSError):  # a smaller pipe only means more wake-ups
        fcntl.fcntl(data_w, fcntl.F_SETPIPE_SZ, pipe_size)
    try:
        pid = os.fork()
    except OSError:
        for fd in (data_r, data_w, res_r, res_w):
            os.close(fd)
        raise
    if pid == 0:  # the child: never returns
        _run_child(lambda: work(data_r), res_w, data_r)
    os.close(data_r)
    os.close(res_w)
    return pid, data_w, res_r


def _run_child(work: Callable[[], Any], result_fd: int, data_fd: int) -> None:
    """The child's whole life: close what it inherited, run `work`, send its outcome."""
    code = 0
    try:
        low = 3  # keep stdio and the two pipe ends, close the rest (close_range: cheap)
        for fd in sorted((result_fd, data_fd)):
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, os.sysconf("SC_OPEN_MAX"))
        try:
            payload = _PLAIN + marshal.dumps(work())
        except BaseException as exc:  # noqa: BLE001 - handed to the parent, which raises it
            payload = _RAISED + _pickled(exc)
        view = memoryview(payload)
        while view:
            view = view[os.write(result_fd, view) :]
    except BaseException:  # noqa: BLE001 - nothing may escape into the parent's stack
        code = 1
    finally:
        os._exit(code)


def _pickled(exc: BaseException) -> bytes:
    import pickle

    try:
        data = pickle.dumps(exc)
        pickle.loads(data)  # noqa: S301 - some exceptions pickle but do not load back
        return data
    except Exception:  # noqa: BLE001 - an exception that does not travel: its words
        return pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))


def collect(result_fd: int, pid: int, lost: Callable[[int], Exception]) -> Any:
    """Wait for the child (closing `result_fd`): what its work returned, or the exception it
    raised, raised here; `lost(wait status)` is raised when it ended without a result."""
    data = bytearray()
    try:
        while chunk := os.read(result_fd, 1 << 16):
            data += chunk
            if len(data) > MAX_RESULT:
                break
    finally:
        os.close(result_fd)
        status = reap(pid)
    kind, body = bytes(data[:1]), bytes(data[1:])
    if kind == _PLAIN:
        return marshal.loads(body)
    if kind == _RAISED:
        import pickle

        raise pickle.loads(body)  # noqa: S301 - our own child's bytes
    raise lost(status)


def reap(pid: int) -> int:
    """Wait for the child to exit; its wait status.  0 where SIGCHLD is ignored (a parent can
    pass that on through exec): the kernel then reaps the child itself, and waitpid waits
    for it and fails with ECHILD."""
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return 0
