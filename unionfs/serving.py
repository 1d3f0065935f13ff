"""What both transports do before and after serving: open the layers, flush the mount.

`open_stack` builds the LayerStack and Writer of a MountConfig (or reports why it cannot);
`flush_mount` syncs a writable mount before a signal unmounts it.  Used by daemon.py (the
pyfuse3 transport) and fuse/run.py (the native one), which both import this module and
nothing of each other.  The heavy modules (stack, writer) are imported inside open_stack, so
the native transport can mount before it loads them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from .errors import UnionError
from .options import VOLATILE_MARKER, MountConfig

log = logging.getLogger("layerfs")

SIGNAL_FLUSH_TIMEOUT = 30.0  # seconds a signal waits for the mount's dirty pages (a freeze)


def open_stack(cfg: MountConfig, report: Callable[[str], None]) -> tuple[Any, Any] | None:
    """The LayerStack and Writer of `cfg` (one place for both transports), or None after
    reporting why they cannot be opened."""
    from .fsat import Roots
    from .stack import LayerStack
    from .writer import Writer

    try:
        stack = LayerStack(
            cfg.lowers,
            cfg.upper,
            index=cfg.index,
            follow_redirects=cfg.follow_redirects,
            fs=Roots(shadow=os.fsencode(cfg.mountpoint)),
        )
        writer = (
            Writer(stack, cfg.work, create_redirects=cfg.create_redirects)
            if cfg.work is not None
            else None
        )
        if cfg.volatile and cfg.work is not None:
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
