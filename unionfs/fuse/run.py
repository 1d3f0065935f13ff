"""The native transport's `serve`: open the layers, mount, answer INIT, then import the rest.

Order matters for start-up time: the kernel queues requests until INIT is answered, so the
mount goes live (and the waiting `layerfs` parent is told "OK") before trio and the handlers
are imported (pyfuse3 never is: the handlers use fuseapi's stand-ins).  Then trio is
imported in a thread while the session already answers, without it, every request that
would not become a task (`Session.serve_early`); the first that would waits for trio.  The
layers are opened first, so a mount that cannot work is refused with its reason, not mounted.
Shutdown: SIGTERM/SIGINT/SIGHUP sync a writable mount (its dirty pages), stop the session,
let requests in flight finish, then unmount lazily and close the device; an unmount from
outside (ENODEV) or DESTROY takes the same path.
Concurrency: blocking until INIT is answered; blocking, beside the thread that imports trio,
until trio is there; then one trio thread (see session.py).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys

from ..logs import log
from . import wire
from .init import Wanted
from .mount import mount
from .session import InitFailed, handshake

TYPE_CHECKING = False  # typing's own constant, without importing typing before INIT (../logs.py)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


EXIT_OK, EXIT_MOUNT_FAILED = 0, 1
# While trio loads in a thread, the longest the session waits for the interpreter's lock
# before it asks the import to let go (Python's default is 5 ms): it bounds how late the
# daemon sees an unmount, or answers a request, during those 100-150 ms
EARLY_SWITCH_INTERVAL = 0.0005


def serve_native(cfg: Any, options: set[str], report: Callable[[str], None]) -> int:
    """Serve `cfg` over our own FUSE session.  `report` is called once: "OK" when the mount
    is live, or the reason it could not be made."""
    from ..serving import hold_signals, open_stack

    opened = open_stack(cfg, report)
    if opened is None:
        return EXIT_MOUNT_FAILED
    stack, writer = opened
    hold_signals()  # from the mount on, a signal must unmount, not just kill (serving.py)
    try:
        mounted = mount(cfg.mountpoint, options)
    except OSError as exc:
        report(f"layerfs: mounting {cfg.mountpoint} failed: {exc}")
        return EXIT_MOUNT_FAILED
    try:
        want = Wanted(
            writeback=cfg.writeback and writer is not None,
            read_only=writer is None,
            passthrough=cfg.passthrough and writer is not None and os.geteuid() == 0,
            posix_acl=cfg.acl,
        )
        conn = handshake(mounted.fd, want)
    except (InitFailed, OSError) as exc:
        mounted.unmount()
        report(f"layerfs: mounting {cfg.mountpoint} failed: {exc}")
        return EXIT_MOUNT_FAILED
    log.debug("INIT: %s", conn.describe())
    report("OK")
    try:
        return _serve(cfg, stack, writer, conn, mounted)
    finally:
        mounted.unmount()
        log.debug("unmounted %s", cfg.mountpoint)


def _serve(cfg: Any, stack: Any, writer: Any, conn: Any, mounted: Any) -> int:
    from ..operations import Attrs, UnionOperations
    from ..serving import listen_control
    from .bridge import Bridge, readdir_reply
    from .session import Session

    ops = UnionOperations(
        stack,
        writer,
        debug=cfg.debug,
        writeback=bool(conn.flags & wire.WRITEBACK_CACHE),
        readdir_reply=readdir_reply,
        owners=cfg.owners,
        volatile=cfg.volatile,
        attrs_type=Attrs,
    )
    ops.init()
    bridge = Bridge(ops, conn, mounted.fd)
    session = Session(mounted.fd, conn, bridge, spin_us=int(os.environ.get("LAYERFS_SPIN_US", 0)))
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        # before any request is answered: a client that saw the mount answer can freeze it
        listener = listen_control(writer) if writer is not None else None
    except OSError as exc:
        log.error("layerfs: cannot make the control socket: %s", exc)
        return EXIT_MOUNT_FAILED
    # trio, in a thread, while the first requests are answered (started last: until then
    # the handlers' own imports would share the interpreter's lock with it)
    loading = _Loading()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(EARLY_SWITCH_INTERVAL)
    first = session.serve_early(loading.done, loading.wake_fd)
    if session.unmounted_early:
        # Unmounted before trio was needed: end now, not after the import.  Kernel overlayfs
        # lets `umount MNT; umount UPPERFS` run back to back, and what pins the work dir's
        # filesystem (the bound control socket, a log file there) goes with the process;
        # every Python step would first wait for the interpreter's lock, which the import
        # holds (the thread goes with the process too).
        if cfg.debug:
            log.debug("requests: %s", _counts(session.counts))
        os._exit(EXIT_OK)
    sys.setswitchinterval(interval)
    loading.close()
    import trio  # loaded: `close` waited for the thread

    try:
        trio.run(_main, trio, ops, session, bridge, cfg.mountpoint, first, listener)
    except BaseException:
        log.exception("layerfs: main loop failed")
        return EXIT_MOUNT_FAILED
    if cfg.debug:
        log.debug("requests: %s", _counts(session.counts))
    return EXIT_OK


class _Loading:
    """trio being imported in a thread while the session answers what it can without it
    (`Session.serve_early`).  The import takes 100-150 ms here, and a request that came
    meanwhile used to wait for all of it: podman's first requests come ~30 ms after INIT."""

    def __init__(self) -> None:
        import _thread as thread  # a bare thread and lock: nothing for threading to track

        self._loaded = False
        self._running = thread.allocate_lock()
        self._running.acquire()  # released by the thread as it ends
        self._read_fd, self._write_fd = os.pipe()
        self.wake_fd = self._read_fd  # readable once the import has ended
        thread.start_new_thread(self._run, ())

    def _run(self) -> None:
        try:
            import trio  # noqa: F401
        except BaseException:  # noqa: BLE001 - the main thread's own import reports it
            pass
        finally:
            os.write(self._write_fd, b"x")
            self._loaded = True
            self._running.release()

    def done(self) -> bool:
        return self._loaded

    def close(self) -> None:
        """Wait for the thread to end, then close the pipe."""
        with self._running:
            os.close(self._read_fd)
            os.close(self._write_fd)


async def _main(
    trio: Any,
    ops: Any,
    session: Any,
    bridge: Any,
    mountpoint: str,
    first: bytes | None,
    listener: Any,
) -> None:
    from ..serving import serve_mount

    async def loop() -> None:
        await session.serve(first)
        await bridge.close()

    await serve_mount(trio, ops, mountpoint, loop, session.terminate, listener)


def _counts(counts: dict[int, int]) -> str:
    from .opcodes import NAMES

    return ", ".join(f"{NAMES.get(k, k)}={v}" for k, v in sorted(counts.items()))
