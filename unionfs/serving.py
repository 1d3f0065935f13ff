"""What both transports do around serving: open the layers, run the mount's life, flush it.

`open_stack` builds the LayerStack and Writer of a MountConfig (or reports why it cannot);
`serve_mount` is the life of a mount (signals, the control socket, the transport's loop);
`flush_mount` syncs a writable mount before a signal unmounts it.  Used by daemon.py (the
pyfuse3 transport) and fuse/run.py (the native one), which both import this module and
nothing of each other.  The heavy modules (stack, writer) are imported inside open_stack, so
the native transport can mount before it loads them.
"""

from __future__ import annotations

import os
import signal

from .errors import UnionError, WorkDirUnusable
from .logs import log
from .options import VOLATILE_MARKER, MountConfig

TYPE_CHECKING = False  # typing's own constant, without importing typing before INIT (logs.py)
if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from typing import Any


SIGNAL_FLUSH_TIMEOUT = 30.0  # seconds a signal waits for the mount's dirty pages (a freeze)
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # each unmounts and ends the daemon
_early: list[int] = []  # signals that came before serve_mount listened (hold_signals)


def signalled() -> bool:
    """Has a signal been noted since `hold_signals`, before serve_mount listened?"""
    return bool(_early)


def hold_signals() -> None:
    """Until serve_mount listens for them, note SIGTERM/SIGINT/SIGHUP instead of dying by
    them: called just before mounting, since the daemon mounts first and loads its handlers
    after, and trio (100-200 ms) after that or only once it is needed (fuse/run.py), and one
    killed in between would leave its mount dead ("Transport endpoint is not connected")
    until somebody unmounts it.  A signal noted here wakes the native transport's early
    phase; serve_mount then flushes and unmounts at once (requests may have been answered
    before trio was loaded, writes included)."""

    def note(signum: int, frame: object) -> None:
        _early.append(signum)

    for signum in SIGNALS:
        signal.signal(signum, note)


# Run as soon as the mount is gone, before the daemon's slower teardown: they close what pins
# a layer's filesystem (a log file in the work dir).  Kernel overlayfs lets go of its layers
# when umount(2) returns; a FUSE daemon can only come close, since umount does not wait for it
# (and `umount MNT; umount UPPERFS` is what scripts, and unionmount-testsuite, do).
_at_unmount: list[Callable[[], None]] = []


def at_unmount(fn: Callable[[], None]) -> None:
    """Have `fn` run the moment this process's mount ends (see `_at_unmount`)."""
    _at_unmount.append(fn)


def run_at_unmount() -> None:
    while _at_unmount:
        try:
            _at_unmount.pop()()
        except Exception:  # noqa: BLE001 - letting go must go on
            log.exception("releasing after unmount failed")


# The cyclic garbage collector's first threshold in the daemon: a collection of the young
# generation after this many new container objects, where CPython's default is 700.  A tree
# walk makes a node, an entry and a reply for every name and keeps them all (the kernel
# holds the nodes): with 700, collections that free nothing took a fifth of the handlers'
# time of a cold `find` (in process, the session driven over /usr/share's 55,000 names:
# 1.5-1.7 s against 1.25-1.35 s with 50,000; the daemon's CPU in a cold `find -ls` through
# the mount, medians of 3: 1,440 against 1,290 ms).  Cyclic garbage (trio's, a traceback's)
# still goes, a little later: at most this many objects wait for it.
GC_YOUNG = 50_000


def tune_gc() -> None:
    """Set the collector's young-generation threshold for serving (GC_YOUNG), once the
    handlers are imported; the older generations keep their defaults."""
    import gc

    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])


def open_stack(cfg: MountConfig, report: Callable[[str], None]) -> tuple[Any, Any] | None:
    """The LayerStack and Writer of `cfg` (one place for both transports), or None after
    reporting why they cannot be opened."""
    from . import markers, origin
    from .fsat import Roots
    from .stack import LayerStack
    from .writer import Writer

    if cfg.userxattr:
        markers.use_user_xattrs()
        origin.use_user_xattrs()

    try:
        stack = LayerStack(
            cfg.lowers,
            cfg.upper,
            index=cfg.index,
            follow_redirects=cfg.follow_redirects,
            fs=Roots(shadow=os.fsencode(cfg.mountpoint)),
            metacopy=cfg.metacopy,
            data_layers=cfg.data_layers,
        )
        writer = None
        if cfg.work is not None:
            try:
                writer = Writer(
                    stack,
                    cfg.work,
                    create_redirects=cfg.create_redirects,
                    mountpoint=cfg.mountpoint,
                    sync_copies=not cfg.volatile,
                    uuid=cfg.uuid,
                )
            except WorkDirUnusable as exc:
                # as kernel overlayfs (ovl_workdir_create): the layers are still shown, so
                # what is on a full disk can be read; the mount is read-only (readonly_options)
                log.warning("cannot make the work directory %s: %s; mounting read-only",
                            exc.filename, exc.strerror)  # fmt: skip
        if cfg.volatile and writer is not None and cfg.work is not None:
            # as the kernel: the marker stays after the mount ends, so that the upper of a
            # volatile mount is not taken for a synced one (options._check_volatile)
            marker = os.path.join(cfg.work, VOLATILE_MARKER)
            os.makedirs(marker, exist_ok=True)
            with open(os.path.join(marker, "dirty"), "a"):
                pass
    except UnionError as exc:
        report(f"layerfs: {exc}")
        return None
    except OSError as exc:
        report(f"layerfs: cannot open layers: {exc}")
        return None
    return stack, writer


def readonly_options(options: set[str], writer: Any, cfg: MountConfig) -> set[str]:
    """The FUSE mount options, read-only where an upper was given but no Writer could be
    made (open_stack's fallback)."""
    if writer is None and cfg.upper is not None:
        return (options - {"rw"}) | {"ro"}
    return options


def listen_control(writer: Any) -> Any:
    """The control socket of a writable mount, bound and listening (control.listen); None
    when it cannot be made, which is logged: the mount goes on without it (it cannot be
    frozen for `layer commit --live`).  It is made once the mount is live, and ending the
    mount for it unmounted what was already in use (the work dir's filesystem shut down right
    after the mount: xfstests overlay/078's set-up), where the kernel's stays mounted."""
    from . import control

    try:
        return control.listen(os.fsencode(control.socket_path(writer.workdir)))
    except OSError as exc:
        log.error("layerfs: cannot make the control socket (the mount cannot be frozen): %s",
                  exc)  # fmt: skip
        return None


async def flush_mount(trio, mountpoint: bytes) -> None:  # type: ignore[no-untyped-def]
    """syncfs on our own mount, from a worker thread while the session loop still serves the
    WRITE requests it causes; bounded, since a frozen mount holds them until it thaws."""
    from .fsutil import syncfs

    with trio.move_on_after(SIGNAL_FLUSH_TIMEOUT) as scope:
        try:
            await trio.to_thread.run_sync(syncfs, mountpoint, abandon_on_cancel=True)
        except OSError as exc:
            log.warning("syncing %s before unmounting failed: %s", os.fsdecode(mountpoint), exc)
    if scope.cancelled_caught:
        log.warning("unmounting without syncing %s: it stayed frozen", os.fsdecode(mountpoint))


async def serve_mount(  # type: ignore[no-untyped-def]
    trio,
    ops: Any,
    mountpoint: str,
    loop: Callable[[], Awaitable[None]],
    terminate: Callable[[], None],
    listener: Any = None,
) -> None:
    """Run one mount until its transport's `loop` returns: SIGTERM/SIGINT/SIGHUP flush a
    writable mount and `terminate` the loop; a writable mount also serves its control socket
    (freeze/thaw for `layer diff`/`commit`) beside the upper.  The control session syncs the
    upper through an fd when the mountpoint shadows it (a mount over its own layer).
    `listener`: that socket (`listen_control`, made by the transport before it serves; None
    for a read-only mount, or where it could not be made)."""
    from . import control

    async def on_signals(task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
        with trio.open_signal_receiver(*SIGNALS) as sigs:
            task_status.started()  # the loop then starts: a flush needs it
            if _early:  # came during start-up, maybe after requests were answered
                signum = _early[0]
            else:
                async for signum in sigs:  # noqa: B007 - the first one is acted on
                    break
            log.info("signal %d: unmounting", signum)
            if ops.writer is not None:
                await flush_mount(trio, os.fsencode(mountpoint))
            terminate()

    def describe(ino: int) -> str:
        """An inode's path in the mount, for the control socket's errors."""
        node = ops.stack.known(ino)
        if node is None:
            return f"inode {ino}"
        return os.path.join(str(mountpoint), os.fsdecode(ops.stack.merged_path(node)))

    async with trio.open_nursery() as nursery:
        await nursery.start(on_signals)
        if listener is not None:
            await nursery.start(
                control.serve,
                listener,
                ops.gate,
                ops.stack.fs.handle(ops.stack.layers[0]),  # an fd if under the mount
                os.fsencode(mountpoint),
                describe,
            )
        await loop()
        nursery.cancel_scope.cancel()  # the control socket closes with its task
    run_at_unmount()
