"""The daemon's control socket: freeze and thaw the mount for a consistent snapshot.

`layer commit` of a live mount asks the daemon to hold every mutating request while it reads
the upper directory (as `docker commit` pauses the container), then to resume.  The socket
lives in the work dir (`WORKDIR/layerfs/control`, mode 0600, root's when the daemon is root).
Line protocol: `freeze` → the daemon syncs the mount itself (syncfs on the mountpoint, from
a worker thread while the mount is still served: with the writeback cache, data written
through the mount may sit dirty in the kernel's page cache, not yet in the upper), then stops
admitting mutating requests, waits for those in flight to finish, syncs the upper's
filesystem (that one only: a sync of every filesystem would also write back the mount's own
dirty pages, WRITE requests the frozen gate holds — a deadlock), answers `frozen` (or
`error ...` when the mount cannot be synced, and stays thawed); `thaw` (or closing the
connection, so a crashed client never leaves the mount frozen) → `thawed`.  Reads are never
held.  Several freezers may overlap; the mount thaws when the last one lets go.

What a freeze guarantees: everything written through the mount before `freeze` was sent is
in the upper until `thaw`.  With the writeback cache, writes that race with the freeze may
stay in the kernel's page cache (and a frozen mount's page cache can still take writes until
the kernel's dirty limit), so while frozen the upper — not the merged view — is the snapshot:
a freezer must not read files through the mount, since closing one flushes its dirty pages
with WRITE requests the gate holds.

Concurrency: the Gate lives on the daemon's trio thread; `enter`/`leave` bracket each
mutating handler; no locks needed.  `frozen()` is the synchronous client for the CLI.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import trio

from .fsutil import syncfs

SOCKET_NAME = "control"


class Gate:
    def __init__(self) -> None:
        self._freezers = 0
        self._thawed: trio.Event | None = None
        self._inflight = 0
        self._drained: trio.Event | None = None

    @property
    def frozen(self) -> bool:
        return self._thawed is not None

    async def enter(self) -> None:
        while self._thawed is not None:
            await self._thawed.wait()
        self._inflight += 1

    def leave(self) -> None:
        self._inflight -= 1
        if self._inflight == 0 and self._drained is not None:
            self._drained.set()

    async def freeze(self) -> None:
        self._freezers += 1
        if self._thawed is None:
            self._thawed = trio.Event()
        while self._inflight:
            self._drained = trio.Event()
            await self._drained.wait()
        self._drained = None

    def thaw(self) -> None:
        self._freezers = max(0, self._freezers - 1)
        if self._freezers == 0 and self._thawed is not None:
            event, self._thawed = self._thawed, None
            event.set()


async def serve(
    path: bytes,
    gate: Gate,
    sync_dir: bytes | int,
    mountpoint: bytes | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with _reachable(path) as short:
        await sock.bind(short)
    os.chmod(path, 0o600)
    sock.listen(8)
    task_status.started()
    async with trio.open_nursery() as nursery:
        while True:
            conn, _ = await sock.accept()
            nursery.start_soon(_client, trio.SocketStream(conn), gate, sync_dir, mountpoint)


async def _client(
    stream: trio.SocketStream, gate: Gate, sync_dir: bytes | int, mountpoint: bytes | None
) -> None:
    frozen = False
    try:
        async for data in stream:
            for cmd in data.split():
                if cmd == b"freeze" and not frozen:
                    if mountpoint is not None:
                        try:  # before the gate closes: the WRITEs it causes must get through
                            await trio.to_thread.run_sync(syncfs, mountpoint)
                        except OSError as exc:
                            await stream.send_all(f"error syncing the mount: {exc}\n".encode())
                            continue
                    await gate.freeze()
                    frozen = True
                    await trio.to_thread.run_sync(syncfs, sync_dir)
                    await stream.send_all(b"frozen\n")
                elif cmd == b"thaw" and frozen:
                    gate.thaw()
                    frozen = False
                    await stream.send_all(b"thawed\n")
                elif cmd == b"ping":
                    await stream.send_all(b"pong\n")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        if frozen:
            gate.thaw()
        with contextlib.suppress(Exception):
            await stream.aclose()


def socket_path(workdir: str | os.PathLike[str]) -> str:
    return os.path.join(os.fspath(workdir), "layerfs", SOCKET_NAME)


_SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes, the last one a NUL


@contextlib.contextmanager
def _reachable(path: str | bytes) -> Iterator[bytes]:
    """`path`, or when it is too long for an AF_UNIX address (a deep work dir), the same
    place reached through /proc/self/fd/N/NAME of an O_PATH fd on its directory."""
    raw = os.fsencode(path)
    if len(raw) <= _SUN_PATH_MAX:
        yield raw
        return
    parent, _, name = raw.rpartition(b"/")
    fd = os.open(parent or b"/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield b"/proc/self/fd/%d/%s" % (fd, name)
    finally:
        os.close(fd)


@contextlib.contextmanager
def frozen(workdir: str | os.PathLike[str], timeout: float = 60.0) -> Iterator[None]:
    """Hold the live mount that uses `workdir` frozen for the duration of the block."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        with _reachable(socket_path(workdir)) as address:
            s.connect(address)
        s.sendall(b"freeze\n")
        reply = s.recv(4096)
        if not reply.startswith(b"frozen"):
            why = reply.decode(errors="replace").strip() or "no answer"
            raise OSError(f"the layerfs daemon did not freeze the mount: {why}")
        yield
        s.sendall(b"thaw\n")
        s.recv(64)
    finally:
        s.close()
