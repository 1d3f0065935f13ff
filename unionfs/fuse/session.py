"""The session: read requests from /dev/fuse, dispatch them through the opcode table, write
one reply each.  Like go-fuse's `fuse/server.go`, over trio.

Reading: the device fd is non-blocking; the loop reads until EAGAIN, reads on for `spin=`
microseconds (`_spin`), then waits for the next request in poll(2) on the device alone
when nothing else is due in trio (`may_block`: no request task alive, none runnable, no
deadline near), for at most POLL_MS, and otherwise
(or after that) in `trio.lowlevel.wait_readable`.  A request usually follows the last reply
within microseconds, and trio's scheduler round (epoll registration, wait, reschedule) cost
more than the request itself: unpinned getxattr round trips 59-61 → 37 µs, `ls -lR` warm
−26 %, `find -ls` warm −22 % (2-vCPU VM; no change pinned).  Measured against a dedicated
reader thread handing requests to trio: 90-120 µs with the thread (two more wake-ups).
Each request is parsed with bounds checks (`wire`, `opcodes`); a short,
malformed or unknown request is answered with an errno and the loop goes on.  A handler
returns its reply's payload, raises (`errno_of`), or returns an int: the errno of an answer
that is common and no failure (no such xattr), which skips an exception through the
handler layers (getxattr 6.2 → 4.6 µs in process).  INLINE handlers
are awaited by the loop itself (they never block), and so are GATED ones while the mount is
not frozen (past the gate they never block); TASK handlers run in the `tasks` nursery,
each in its own cancel scope, so INTERRUPT can cancel one (answered EINTR) and a request that
waits (a frozen mount, a copy-up in a thread, fsync) never stalls the rest.  FORGET and
BATCH_FORGET are applied in order on the loop, so lookup counts are exact.
RELEASE and RELEASEDIR, which the kernel sends in the background, are kept and answered
once the device is idle, so the request queued behind one (`cat`'s next OPEN) is answered
first; never after a request whose answer they could change (`_due`).
Before trio is loaded (fuse/run.py loads it only once something needs it), `serve_early`
answers the requests `_loop` would run inline, blocking, in a plain poll(2) loop; a
read-only container start never leaves it.
Shutdown: `terminate()` stops reading; requests in flight finish and are answered; DESTROY or
ENODEV (unmounted) ends the loop too.  The caller then unmounts and closes the fd.
Concurrency: one trio thread.  `_inflight` is touched only between awaits.  The INIT
handshake (`handshake`) runs before trio starts, blocking, so a mount is live before the
heavy imports.
"""

from __future__ import annotations

import errno
import os
import select
import time

from ..logs import debug_enabled, log
from . import opcodes, wire
from .init import Conn, Wanted, negotiate
from .opcodes import BACKGROUND, GATED, NOREPLY, TASK
from .wire import Header, Malformed

TYPE_CHECKING = False  # typing's own constant, without importing typing before INIT (../logs.py)
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any


POLL_MS = 10  # longest wait for the device outside trio (see `Session.may_block`)
YIELD_EVERY = 32  # inline requests between two scheduler checkpoints (lets tasks run)
# BACKGROUND requests (RELEASE, RELEASEDIR: the kernel waits for no answer) are kept and
# answered once the device is idle, after the requests queued behind them (`_keep`), but
# never after a request whose answer they could change (`_due`)
FORGETS = frozenset((2, 42))  # FORGET, BATCH_FORGET: may end a node a kept release names
MAX_DEFERRED = 32  # bounds the descriptors the releases keep open meanwhile
DEFER_MAX_NS = 1_000_000  # a freeze waits for the releases of writing files: never long


class InitFailed(Exception):
    pass


def write_reply(fd: int, unique: int, error: int, payload: bytes = b"") -> bool:
    """One reply; False when the connection is gone.  ENOENT means the request was
    interrupted and the kernel dropped it: not an error."""
    header = wire.OUT_HEADER.pack(wire.OUT_HEADER.size + len(payload), -error, unique)
    try:
        if payload:
            os.writev(fd, [header, payload])
        else:
            os.write(fd, header)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return True
        if exc.errno in (errno.ENODEV, errno.ECONNABORTED, errno.EBADF):
            return False
        raise
    return True


def handshake(fd: int, want: Wanted) -> Conn:
    """Blocking: read requests until INIT, answer it.  Anything else first gets EIO."""
    while True:
        try:
            raw = os.read(fd, 1 << 21)
        except InterruptedError:
            continue
        try:
            h = wire.parse_header(memoryview(raw))
        except Malformed as exc:
            raise InitFailed(f"bad first request: {exc}") from None
        if h.opcode != opcodes.INIT:
            write_reply(fd, h.unique, errno.EIO)
            continue
        try:
            payload, conn, err = negotiate(h.body, want)
        except Malformed as exc:
            write_reply(fd, h.unique, exc.errno)
            raise InitFailed(str(exc)) from None
        write_reply(fd, h.unique, err, payload)
        if conn is not None:
            return conn
        if err:
            raise InitFailed(f"kernel FUSE protocol too old (need 7.{wire.MIN_MINOR})")


def errno_of(exc: BaseException) -> int:
    """The one place an exception becomes an errno: anything carrying a positive errno
    (OSError, pyfuse3.FUSEError, UnionError, wire.Malformed) answers with it; anything else
    is a bug — logged with its traceback, EIO."""
    err = getattr(exc, "errno", None)
    if isinstance(err, int) and err > 0:
        return err
    log.error("request failed", exc_info=exc)
    return errno.EIO


class Session:
    def __init__(self, fd: int, conn: Conn, bridge: Any, spin_us: int = 0) -> None:
        self.fd = fd
        self.spin_ns = spin_us * 1000  # busy-poll before sleeping (see `_spin`)
        self.conn = conn
        self.bridge = bridge
        self.debug = debug_enabled()
        self.counts: dict[int, int] = {}
        self._inflight: dict[int, Any] = {}  # unique → CancelScope of a TASK request
        self._alive = 0  # TASK requests started and not finished (running or waiting to)
        self._loop_scope: Any = None
        self._stopping = False
        self._deferred: list[tuple[Header, tuple[Any, ...]]] = []  # BACKGROUND, kept
        self._deferred_at = 0  # perf_counter_ns of the oldest
        self._deferred_nodes: set[int] = set()  # the nodes they release files of
        self.unmounted_early = False  # `serve_early` met the unmount: trio is not needed
        self.opcodes = opcodes.table(conn.setxattr_ext)
        self._handlers = {code: getattr(bridge, op.method) for code, op in self.opcodes.items()}

    def terminate(self) -> None:
        self._stopping = True
        if self._loop_scope is not None:
            self._loop_scope.cancel()

    async def serve(self, first: bytes | None = None) -> None:
        """Serve until terminated or unmounted; `first`: a request read before (`serve_early`)."""
        import trio

        os.set_blocking(self.fd, False)
        async with trio.open_nursery() as tasks:
            with trio.CancelScope() as self._loop_scope:
                if first is not None and not self._stopping:
                    await self.dispatch(memoryview(first), tasks)
                if not self._stopping:
                    await self._loop(trio, tasks)

    async def _loop(self, trio: Any, tasks: Any) -> None:
        buf = bytearray(self.conn.bufsize)
        view = memoryview(buf)
        readv, fd = os.readv, self.fd
        since_yield = 0
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not self._stopping:
            try:
                n = readv(fd, [buf])
            except BlockingIOError:
                # no spin while a request task is alive: what it waits for (a thread's result,
                # a thaw) comes through trio's scheduler, and its caller sends nothing meanwhile
                n = self._spin(buf) if self.spin_ns and not self._alive else 0
                if not n and self._deferred:  # idle: now the releases
                    await self._answer_kept()
                    continue
                if not n and self.may_block(trio) and poller.poll(POLL_MS):
                    continue  # readable: read it without a trip through trio's scheduler
                if not n:
                    await trio.lowlevel.wait_readable(fd)
                    since_yield = 0
                    continue
            except OSError as exc:
                if _gone(exc):
                    return
                continue
            spawned = await self.dispatch(view[:n], tasks)
            since_yield += 1
            if spawned or since_yield >= YIELD_EVERY:
                await trio.lowlevel.checkpoint()
                since_yield = 0

    def serve_early(self, wake_fds: Sequence[int]) -> bytes | None:
        """Before trio is loaded (fuse/run.py loads it only once it is needed): answer the
        requests `_loop` would run inline, blocking, until one of `wake_fds` turns readable
        (a control client connecting, a signal) or a request comes that would be a task (a
        copy-up in a thread, a rename, an fsync): that one is left unanswered and its bytes
        returned, for `serve` to dispatch first.  Nothing can be frozen or interrupted here
        (that takes the control socket's service, or a task in flight).  Handlers are
        coroutines; inline ones finish without suspending, so one `send` drives each to its
        end.  An unmount sets `unmounted_early`."""
        os.set_blocking(self.fd, False)
        buf = bytearray(self.conn.bufsize)
        view = memoryview(buf)
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        for fd in wake_fds:
            poller.register(fd, select.POLLIN)
        served, pending = 0, None
        while not self._stopping:
            try:
                n = os.readv(self.fd, [buf])
            except BlockingIOError:
                n = self._spin(buf) if self.spin_ns else 0
                if not n and self._deferred:  # idle: now the releases
                    self._answer_kept_early()
                    continue
                if not n:
                    if any(fd != self.fd for fd, _ in poller.poll()):
                        break
                    continue
            except OSError as exc:
                if _gone(exc):
                    self._stopping = self.unmounted_early = True
                    break
                continue
            if not self._early(view[:n]):
                pending = bytes(view[:n])
                break
            served += 1
        self._answer_kept_early()  # before trio takes over, or before the end
        if self.debug:
            log.debug("answered %d requests before trio was loaded", served)
        return pending

    def _early(self, raw: memoryview) -> bool:
        """Serve one request before trio; False when it must wait for trio."""
        parsed = self._parse(raw)  # short, malformed and unknown requests are answered here
        if parsed is None:
            return True
        op, h, args = parsed
        if op.mode == BACKGROUND:
            if self._keep(h, args):
                self._answer_kept_early()
            return True
        if self._deferred and self._due(h):
            self._answer_kept_early()
        if op.mode == NOREPLY:
            if op.code == opcodes.INTERRUPT:
                return True  # nothing is in flight before trio: nothing to interrupt
            self._drive(self._noreply(op, h, args), op.name, None)
        elif op.code == opcodes.DESTROY or self._as_task(op, h, args):
            self.counts[h.opcode] -= 1  # counted again when `serve` dispatches it
            return False
        else:
            self._drive(self._answer(h, args), op.name, h.unique)
        return True

    def _drive(self, coro: Any, name: str, unique: int | None) -> None:
        """Run an inline handler's coroutine to its end without trio (one `send`)."""
        try:
            coro.send(None)
        except StopIteration:
            return
        coro.close()  # a handler that suspended, which is a bug: its caller must not hang
        log.error("%s suspended before trio was loaded: answered EIO", name)
        if unique is not None:
            self.reply(unique, errno.EIO)

    def _answer_kept_early(self) -> None:
        for h, args in self._take_deferred():
            self._drive(self._answer(h, args), self.opcodes[h.opcode].name, h.unique)

    async def _answer_kept(self) -> None:
        for h, args in self._take_deferred():
            await self._answer(h, args)

    def _keep(self, h: Header, args: tuple[Any, ...]) -> bool:
        """Keep a BACKGROUND request (RELEASE, RELEASEDIR) to answer later; True when the
        kept ones are due now (MAX_DEFERRED of them, or the oldest DEFER_MAX_NS old).  The
        process that closed the file goes on without waiting for the answer, and the request
        it sends next (`cat`'s next OPEN, a create's LOOKUP) is often queued behind it: that
        one is answered first.  The loops answer what they keep when the device is idle
        (after the spin), or when `_due`."""
        if not self._deferred:
            self._deferred_at = time.perf_counter_ns()
        h.body = memoryview(b"")  # its arguments are decoded; the loop reuses its buffer
        self._deferred.append((h, args))
        self._deferred_nodes.add(h.nodeid)
        return self._full()

    def _due(self, h: Header) -> bool:
        """Must the kept releases be answered before `h`?  Before any request for a node one
        of them names: whether a file of it is open decides some answers (a passthrough
        reader makes an open for writing fail with ETXTBSY, an unlinked file's times, a
        created file passing through); before FORGET and DESTROY; and when `_full`: a
        steady stream of requests never leaves the device idle, and a freeze waits for the
        releases of files that write past its gate."""
        return (
            h.nodeid in self._deferred_nodes
            or h.opcode == opcodes.DESTROY
            or h.opcode in FORGETS
            or self._full()
        )

    def _full(self) -> bool:
        return (
            len(self._deferred) >= MAX_DEFERRED
            or time.perf_counter_ns() - self._deferred_at > DEFER_MAX_NS
        )

    def _take_deferred(self) -> list[tuple[Header, tuple[Any, ...]]]:
        taken, self._deferred = self._deferred, []
        self._deferred_nodes.clear()
        return taken

    def may_block(self, trio: Any) -> bool:
        """May the loop wait for the device in poll(2), holding trio's thread, instead of in
        trio's scheduler?  Only while nothing else is due: no request task alive (started,
        even if it has not run yet, or waiting for a thread or the freeze gate), no task
        runnable, no deadline within POLL_MS.  Whatever becomes due meanwhile (a control
        connection, a signal) waits at most POLL_MS, or until the next checkpoint."""
        if self._alive:
            return False
        st = trio.lowlevel.current_statistics()
        return st.tasks_runnable == 0 and st.seconds_to_next_deadline > POLL_MS / 1000

    def _spin(self, buf: bytearray) -> int:
        """Poll the device for `spin_ns` before sleeping (`spin=`, default 20 µs): the next
        request often comes within microseconds (`rm -rf`'s next unlink, `cat`'s next
        open), and going to sleep and being woken costs more than that, with every cache
        cold after it.  Burns at most `spin_ns` of CPU per answer when nothing comes; 0
        when nothing came."""
        deadline = time.perf_counter_ns() + self.spin_ns
        while time.perf_counter_ns() < deadline:
            try:
                return os.readv(self.fd, [buf])
            except BlockingIOError:
                continue
            except OSError:
                break  # the loop's own read meets it again and handles it
        return 0

    def _parse(self, raw: memoryview) -> tuple[opcodes.Op, Header, tuple[Any, ...]] | None:
        """One request's row, header and arguments; None when it was answered here (short,
        malformed or unknown)."""
        try:
            h = wire.parse_header(raw)
        except Malformed as exc:
            log.warning("malformed request: %s", exc)
            unique = getattr(exc, "unique", 0)
            if unique:
                self.reply(unique, exc.errno)
            return None
        self.counts[h.opcode] = self.counts.get(h.opcode, 0) + 1
        op = self.opcodes.get(h.opcode)
        if op is None:
            if self.debug:
                log.debug("unsupported opcode %d: ENOSYS", h.opcode)
            self.reply(h.unique, opcodes.UNSUPPORTED_ERRNO)
            return None
        try:
            args = op.decode(h)
        except Malformed as exc:
            log.warning("%s: malformed: %s", op.name, exc)
            if op.mode != NOREPLY:
                self.reply(h.unique, exc.errno)
            return None
        if self.debug:
            log.debug("%s #%d node %d %r", op.name, h.unique, h.nodeid, _short(args))
        return op, h, args

    async def dispatch(self, raw: memoryview, tasks: Any) -> bool:
        """Parse and serve one request.  True when it was started as a task."""
        parsed = self._parse(raw)
        if parsed is None:
            return False
        op, h, args = parsed
        if op.mode == BACKGROUND:
            if self._keep(h, args):
                await self._answer_kept()
            return False
        if self._deferred and self._due(h):
            await self._answer_kept()
        if op.mode == NOREPLY:
            await self._noreply(op, h, args)
        elif self._as_task(op, h, args):
            # The loop reuses its buffer: a task keeps copies (WRITE's data is a view of it).
            h.body = memoryview(b"")
            args = tuple(bytes(a) if isinstance(a, memoryview) else a for a in args)
            self._alive += 1
            tasks.start_soon(self._task, h, args)
            return True
        else:
            await self._answer(h, args)
        return False

    def _as_task(self, op: opcodes.Op, h: Header, args: tuple[Any, ...]) -> bool:
        if op.inline_if is not None and op.inline_if(args):
            return False
        if op.mode == GATED:
            return bool(self.bridge.may_wait(op.name, h.nodeid))  # else it runs through
        return op.mode == TASK

    async def _noreply(self, op: opcodes.Op, h: Header, args: tuple[Any, ...]) -> None:
        if op.code == opcodes.INTERRUPT:
            scope = self._inflight.get(args[0])
            if scope is not None:
                scope.cancel()
            return
        try:
            await self._handlers[op.code](h, *args)
        except Exception:  # forget never fails the loop
            log.exception("%s failed", op.name)

    async def _answer(self, h: Header, args: tuple[Any, ...]) -> None:
        try:
            payload = await self._handlers[h.opcode](h, *args)
        except Exception as exc:
            self.reply(h.unique, errno_of(exc))
            return
        if payload.__class__ is int:  # an errno returned rather than raised: a common answer
            self.reply(h.unique, payload)  # (no such xattr) costs 1.7 µs less without an
            return  # exception through the handler layers
        self.reply(h.unique, 0, payload)
        if h.opcode == opcodes.DESTROY:  # answered; the session ends
            self.terminate()

    async def _task(self, h: Header, args: tuple[Any, ...]) -> None:
        import trio

        try:
            with trio.CancelScope() as scope:
                self._inflight[h.unique] = scope
                try:
                    await self._answer(h, args)
                finally:
                    del self._inflight[h.unique]
            if scope.cancelled_caught:
                self.reply(h.unique, errno.EINTR)
        finally:
            self._alive -= 1

    def reply(self, unique: int, error: int, payload: bytes = b"") -> None:
        if not write_reply(self.fd, unique, error, payload):
            self.terminate()


def _gone(exc: OSError) -> bool:
    """A failed read of the device: True when the connection is gone (unmounted), False for
    what to read past (a request interrupted before it was read, a signal); else raises."""
    if exc.errno in (errno.ENOENT, errno.EINTR):
        return False
    if exc.errno in (errno.ENODEV, errno.ECONNABORTED):
        log.debug("connection closed: unmounted")
        return True
    raise exc


def _short(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(
        f"<{len(a)} bytes>" if isinstance(a, (bytes, memoryview)) and len(a) > 64 else a
        for a in args
    )
