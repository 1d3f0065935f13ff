"""The native transport's `serve`: open the layers, mount, answer INIT, then import the rest.

Order matters for start-up time: the kernel queues requests until INIT is answered, so the
mount goes live (and the waiting `layerfs` parent is told "OK") before trio and the handlers
are imported (pyfuse3 never is: the handlers use fuseapi's stand-ins); requests that arrive
meanwhile wait in the kernel.  The layers are
opened first, so a mount that cannot work is refused with its reason, not mounted.
Shutdown: SIGTERM/SIGINT/SIGHUP sync a writable mount (its dirty pages), stop the session,
let requests in flight finish, then unmount lazily and close the device; an unmount from
outside (ENODEV) or DESTROY takes the same path.
Concurrency: blocking until INIT is answered; then one trio thread (see session.py).
"""

from __future__ import annotations

import faulthandler
import os
import signal

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
    import trio

    from ..operations import Attrs, UnionOperations
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
        trio.run(_main, trio, ops, session, bridge, cfg.mountpoint)
    except BaseException:
        log.exception("layerfs: main loop failed")
        return EXIT_MOUNT_FAILED
    if cfg.debug:
        log.debug("requests: %s", _counts(session.counts))
    return EXIT_OK


async def _main(trio: Any, ops: Any, session: Any, bridge: Any, mountpoint: str) -> None:
    from ..serving import serve_mount

    async def loop() -> None:
        await session.serve()
        await bridge.close()

    await serve_mount(trio, ops, mountpoint, loop, session.terminate)


def _counts(counts: dict[int, int]) -> str:
    from .opcodes import NAMES

    return ", ".join(f"{NAMES.get(k, k)}={v}" for k, v in sorted(counts.items()))
