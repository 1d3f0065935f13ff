"""Work in a forked child: how `unpacker` (a pull's layer) and `layerbuild` (a commit's new
layer directory) run theirs, so that Python work holding the GIL uses a second CPU.

    pid = os.fork()
    if pid == 0:
        forked.run_child(work, result_fd, keep=(data_fd,))    # never returns
    ...
    result = forked.collect(result_fd, pid, lost)            # what work() returned

The child keeps only stdio and the fds it is told to keep (so it holds none of the parent's
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

import marshal
import os
from collections.abc import Callable
from typing import Any

MAX_RESULT = 1 << 20  # a result larger than this is not ours
_PLAIN, _RAISED = b"m", b"p"


def run_child(work: Callable[[], Any], result_fd: int, keep: tuple[int, ...] = ()) -> None:
    """The child's whole life: close what it inherited, run `work`, send its outcome."""
    code = 0
    try:
        low = 3  # keep stdio, `result_fd` and `keep`, close the rest (close_range: cheap)
        for fd in sorted({result_fd, *keep}):
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
        _, status = os.waitpid(pid, 0)
    kind, body = bytes(data[:1]), bytes(data[1:])
    if kind == _PLAIN:
        return marshal.loads(body)
    if kind == _RAISED:
        import pickle

        raise pickle.loads(body)  # noqa: S301 - our own child's bytes
    raise lost(status)
