"""The native transport's `serve`: open the layers, mount, answer INIT, then import the rest.

Order matters for start-up time: the kernel queues requests until INIT is answered, so the
mount goes live (and the waiting `layerfs` parent is told "OK") before trio and the handlers
are imported (pyfuse3 never is: the handlers use fuseapi's stand-ins).  Then the session
answers, without trio, every request that would not become a task (`Session.serve_early`),
and trio is imported only once it is needed (`_before_trio`).  The layers are opened first,
so a mount that cannot work is refused with its reason, not mounted.
Shutdown: SIGTERM/SIGINT/SIGHUP sync a writable mount (its dirty pages), stop the session,
let requests in flight finish, then unmount lazily and close the device; an unmount from
outside (ENODEV) or DESTROY takes the same path.
Concurrency: one thread, blocking until trio is needed; then trio (see session.py).
"""

from __future__ import annotations

import faulthandler
import os
import signal

from .. import markers
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


def serve_native(cfg: Any, options: set[str], report: Callable[[str], None]) -> int:
    """Serve `cfg` over our own FUSE session.  `report` is called once: "OK" when the mount
    is live, or the reason it could not be made."""
    from ..atime import AtimePolicy
    from ..serving import hold_signals, open_stack, readonly_options

    opened = open_stack(cfg, report)
    if opened is None:
        return EXIT_MOUNT_FAILED
    stack, writer = opened
    options = readonly_options(options, writer, cfg)
    # before the mount: it resolves the mountpoint, which once mounted is ours to answer
    atime = AtimePolicy(cfg.mountpoint, cfg.fuse_options)
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
            # registering a backing file needs CAP_SYS_ADMIN in the host's user namespace,
            # as trusted xattrs do (markers.trusted, probed by the Writer): uid 0 of a user
            # namespace (rootless podman) asks for neither
            passthrough=cfg.passthrough and writer is not None and markers.privileged(),
            posix_acl=cfg.acl,
            opens=bool(cfg.data_layers),
        )
        conn = handshake(mounted.fd, want)
    except (InitFailed, OSError) as exc:
        mounted.unmount()
        report(f"layerfs: mounting {cfg.mountpoint} failed: {exc}")
        return EXIT_MOUNT_FAILED
    log.debug("INIT: %s", conn.describe())
    report("OK")
    try:
        return _serve(cfg, stack, writer, conn, mounted, atime)
    finally:
        mounted.unmount()
        log.debug("unmounted %s", cfg.mountpoint)


def _serve(cfg: Any, stack: Any, writer: Any, conn: Any, mounted: Any, atime: Any) -> int:
    from ..operations import Attrs, UnionOperations
    from ..serving import listen_control, tune_gc
    from .bridge import Bridge, keep, readdir_reply
    from .session import Session

    tune_gc()
    ops = UnionOperations(
        stack,
        writer,
        debug=cfg.debug,
        writeback=bool(conn.flags & wire.WRITEBACK_CACHE),
        readdir_reply=readdir_reply,
        owners=cfg.owners,
        volatile=cfg.volatile,
        attrs_type=Attrs,
        prefetch=cfg.prefetch,
        atime=atime,
        keep=keep,
    )
    ops.init()
    bridge = Bridge(ops, conn, mounted.fd)
    session = Session(mounted.fd, conn, bridge, spin_us=cfg.spin_us)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # before any request is answered: a client that saw the mount answer can freeze it
    listener = listen_control(writer) if writer is not None else None
    first = _before_trio(session, listener)
    if session.unmounted_early:
        # unmounted before trio was needed: let go of the layers now (kernel overlayfs lets
        # `umount MNT; umount UPPERFS` run back to back; the control socket pins the work
        # dir's filesystem)
        from ..serving import run_at_unmount

        if listener is not None:
            listener.close()
        run_at_unmount()
        if cfg.debug:
            log.debug("requests: %s", _counts(session.counts))
        return EXIT_OK
    import trio  # 100-150 ms here

    try:
        trio.run(_main, trio, ops, session, bridge, cfg.mountpoint, first, listener)
    except BaseException:
        log.exception("layerfs: main loop failed")
        return EXIT_MOUNT_FAILED
    if cfg.debug:
        log.debug("requests: %s", _counts(session.counts))
    return EXIT_OK


def _before_trio(session: Any, listener: Any) -> bytes | None:
    """Answer what needs no trio (`Session.serve_early`) until trio is needed: a request
    that must be a task, a control client connecting (`layer commit`), or a signal (noted
    by serving.hold_signals; its wake-up fd ends the wait).  Importing trio takes 100-150 ms
    here, and a request that came meanwhile used to wait for all of it: podman's first
    requests come ~30 ms after INIT, and a container that only reads may never need trio.
    Returns the request that ended the phase, if one did."""
    from .. import serving

    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    try:
        if serving.signalled():  # before the wake-up fd was set
            return None
        wake = [wake_r] if listener is None else [wake_r, listener.fileno()]
        return session.serve_early(wake)  # type: ignore[no-any-return]
    finally:
        signal.set_wakeup_fd(-1)  # trio sets its own
        os.close(wake_r)
        os.close(wake_w)


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
