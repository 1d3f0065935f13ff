"""The daemon's control socket: freeze and thaw the mount for a consistent snapshot.

`layer commit` of a live mount asks the daemon to hold every mutating request while it reads
the upper directory (as `docker commit` pauses the container), then to resume.  The socket
lives in the work dir (`WORKDIR/layerfs/control`, mode 0600, root's when the daemon is root).
Line protocol:
  - `freeze` (or `freeze:SECONDS`) → the daemon
    - syncs the mount itself (syncfs on the mountpoint, from a worker thread while the
      mount is still served: with the writeback cache, data written through the mount may
      sit dirty in the kernel's page cache, not yet in the upper);
    - admits no new file that writes past the gate and waits, the gate still open, until
      those left are closed (FUSE passthrough of created files, gate.py), at most SECONDS
      (gate.BYPASS_WAIT by default; a wait that is not a number of seconds >= 0 is an
      `error`);
    - stops admitting mutating requests, waits for those in flight to finish;
    - syncs the upper's filesystem (that one only: a sync of every filesystem would also
      write back the mount's own dirty pages, WRITE requests the frozen gate holds — a
      deadlock);
    - answers `frozen`, or `error ...` and stays thawed when the mount cannot be synced or
      files created through it stay open for writing past the gate (named).
  - `thaw` (or closing the connection, so a crashed client never leaves the mount frozen)
    → `thawed`.
Reads are never held.  Several freezers may overlap; the mount thaws when the last one lets
go.

What a freeze guarantees: everything written through the mount before `freeze` was sent is
in the upper, unchanged until `thaw`.  With the writeback cache, writes that race with the
freeze may stay in the kernel's page cache (and a frozen mount's page cache can still take
writes until the kernel's dirty limit), so while frozen the upper — not the merged view — is
the snapshot: a freezer must not read files through the mount, since closing one flushes
its dirty pages with WRITE requests the gate holds.

Concurrency: the daemon's trio thread; the gate itself is `gate.Gate`.  The daemon keeps
watching a client's connection while its freeze waits: a client that hangs up (or dies)
then gives the freeze up.  `Freeze` / `frozen()` are the synchronous
client for the CLI; `Freeze.thaw` fails unless the daemon confirms, so a caller learns that
the daemon died while the mount was frozen.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .fsutil import syncfs
from .gate import BYPASS_WAIT, Bypassed, Gate
from .writer import WORK_SUBDIR

if TYPE_CHECKING:
    import trio

SOCKET_NAME = "control"
log = logging.getLogger(__name__)


def listen(path: bytes) -> socket.socket:
    """The control socket at `path` (a stale one replaced), mode 0600, listening.  The daemon
    makes it before it answers any request, without trio (fuse/run.py): a client that has
    seen the mount answer finds it, and one that connects before trio is loaded waits in
    the backlog for its answer."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with _reachable(path) as short:
            sock.bind(short)
        os.chmod(path, 0o600)
        sock.listen(8)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve(
    listener: socket.socket,
    gate: Gate,
    sync_dir: bytes | int,
    mountpoint: bytes | None = None,
    describe: Callable[[int], str] = str,
    task_status: Any = None,  # trio's nursery.start passes its own
) -> None:
    """Serve `listener` (from `listen`) until cancelled.  `describe` names an inode (its
    path in the mount) in an error."""
    import trio

    # closed as soon as the serving task is cancelled (the mount went away): a bound socket
    # pins the work dir's filesystem, which a user may unmount right after the mount
    with trio.socket.from_stdlib_socket(listener) as sock:
        if task_status is not None:
            task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await sock.accept()
                session = _Session(trio.SocketStream(conn), gate, sync_dir, mountpoint, describe)
                nursery.start_soon(session.run)


class _Session:
    """One client connection.  Never raises: a failure closes the connection and thaws."""

    def __init__(
        self,
        stream: trio.SocketStream,
        gate: Gate,
        sync_dir: bytes | int,
        mountpoint: bytes | None,
        describe: Callable[[int], str] = str,
    ) -> None:
        self.stream = stream
        self.describe = describe
        self.gate = gate
        self.sync_dir = sync_dir
        self.mountpoint = mountpoint
        self.frozen = False
        self.pending: collections.deque[bytes] = collections.deque()

    async def run(self) -> None:
        import trio

        try:
            while True:
                if not self.pending:
                    data = await self.stream.receive_some(4096)
                    if not data:
                        return
                    self.pending.extend(data.split())
                    continue
                if not await self._command(self.pending.popleft()):
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:  # noqa: BLE001 - a client must never take the daemon down
            log.exception("control client failed")
        finally:
            if self.frozen:
                self.frozen = False
                self.gate.thaw()
            with contextlib.suppress(Exception):
                await self.stream.aclose()

    async def _command(self, cmd: bytes) -> bool:
        """Run one command; False when the client went away."""
        verb, _, arg = cmd.partition(b":")
        if verb == b"freeze" and not self.frozen:
            try:
                wait = float(arg) if arg else BYPASS_WAIT
            except ValueError:
                wait = -1.0
            if not wait >= 0:  # (also NaN, which trio refuses as a timeout)
                await self.stream.send_all(b"error bad freeze wait: %s\n" % arg)
                return True
            return await self._freeze(wait)
        if cmd == b"thaw" and self.frozen:
            self.frozen = False
            self.gate.thaw()
            await self.stream.send_all(b"thawed\n")
        elif cmd == b"ping":
            await self.stream.send_all(b"pong\n")
        return True

    async def _freeze(self, wait: float) -> bool:
        import trio

        if self.mountpoint is not None:
            try:  # before the gate closes: the WRITEs it causes must get through
                await trio.to_thread.run_sync(syncfs, self.mountpoint)
            except OSError as exc:
                await self.stream.send_all(f"error syncing the mount: {exc}\n".encode())
                return True
        try:
            if not await self._freeze_while_connected(wait):
                return False
        except Bypassed as exc:
            names = ", ".join(self.describe(ino) for ino in exc.inos[:5])
            more = f" and {len(exc.inos) - 5} more" if len(exc.inos) > 5 else ""
            await self.stream.send_all(
                f"error {len(exc.inos)} file(s) created through the mount are still open for "
                f"writing after {wait:g} s: {names}{more}; their data goes to the upper "
                "directly (FUSE passthrough), so the mount cannot hold it; close them (or "
                "stop their writers) and retry (layerfs -o passthrough=0 keeps every write "
                "behind the gate)\n".encode()
            )
            return True
        self.frozen = True
        try:
            await trio.to_thread.run_sync(syncfs, self.sync_dir)
        except OSError as exc:
            self.frozen = False
            self.gate.thaw()
            await self.stream.send_all(f"error syncing the upper: {exc}\n".encode())
            return True
        await self.stream.send_all(b"frozen\n")
        return True

    async def _freeze_while_connected(self, wait: float) -> bool:
        """`gate.freeze()`, given up when the client hangs up while it waits for the drain.
        What the client sends meanwhile is kept for later.  True when frozen; raises
        gate.Bypassed (thawed again) when files writing past the gate stay open `wait` s."""
        import trio

        gone = froze = False
        bypassed: Bypassed | None = None
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal gone
                while True:
                    try:
                        data = await self.stream.receive_some(4096)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                    if not data:
                        gone = True
                        nursery.cancel_scope.cancel()
                        return
                    self.pending.extend(data.split())

            nursery.start_soon(watch)
            try:
                await self.gate.freeze(wait)
                froze = True
            except Bypassed as exc:  # (raised from here, not wrapped in the nursery's group)
                bypassed = exc
            nursery.cancel_scope.cancel()
        if bypassed is not None and not gone:
            raise bypassed
        if gone and froze:
            self.gate.thaw()
        return froze and not gone


def socket_path(workdir: str | os.PathLike[str]) -> str:
    """The one place the socket's path is built: the daemon binds it, clients connect."""
    return os.path.join(os.path.abspath(os.fspath(workdir)), WORK_SUBDIR, SOCKET_NAME)


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


class Freeze:
    """A client's hold on the live mount that uses `workdir`: `freeze()`, then `thaw()`.

    `thaw` raises OSError unless the daemon answers `thawed`: the daemon died (or hung) while
    the mount was frozen, so what was read meanwhile may not be what the mount holds.
    `close` without `thaw` lets the daemon thaw by itself (it sees the connection close)."""

    def __init__(self, workdir: str | os.PathLike[str], timeout: float = 60.0) -> None:
        self.workdir = workdir
        self.held = False
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)

    def freeze(self, wait: float | None = None) -> None:
        """Hold the mount; `wait`: how long the daemon may wait for files created through
        it and open for writing past its gate to be closed (gate.BYPASS_WAIT)."""
        with _reachable(socket_path(self.workdir)) as address:
            self._sock.connect(address)
        self._sock.sendall(b"freeze\n" if wait is None else b"freeze:%g\n" % wait)
        reply = self._sock.recv(4096)
        if not reply.startswith(b"frozen"):
            why = reply.decode(errors="replace").strip() or "no answer"
            raise OSError(f"the layerfs daemon did not freeze the mount: {why}")
        self.held = True

    def thaw(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            self._sock.sendall(b"thaw\n")
            reply = self._sock.recv(64)
        except OSError as exc:
            raise OSError(
                f"the layerfs daemon went away while the mount was frozen: {exc}"
            ) from None
        if not reply.startswith(b"thawed"):
            raise OSError("the layerfs daemon went away while the mount was frozen")

    def close(self) -> None:
        self._sock.close()


def ping(workdir: str | os.PathLike[str], timeout: float = 30.0) -> None:
    """Return once the daemon of the live mount that uses `workdir` serves its control
    socket, i.e. has finished starting (the socket is bound a few ms after `layerfs`
    returns, before the mount's first answer, and served once trio is loaded: fuse/run.py);
    a socket not bound yet, or a stale one, is tried again until `timeout`.  OSError when
    the daemon does not answer."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                with _reachable(socket_path(workdir)) as address:
                    sock.connect(address)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
                continue
            sock.sendall(b"ping\n")
            if not sock.recv(64).startswith(b"pong"):
                raise OSError("the layerfs daemon did not answer ping")
            return


@contextlib.contextmanager
def frozen(workdir: str | os.PathLike[str], timeout: float = 60.0) -> Iterator[Freeze]:
    """Hold the live mount that uses `workdir` frozen for the duration of the block (or until
    the block calls `thaw()` on what it gets); leaving normally checks the daemon thawed."""
    hold = Freeze(workdir, timeout)
    try:
        hold.freeze()
        yield hold
        hold.thaw()
    finally:
        hold.close()
