"""`layer umount`: unmount a layerfs (or any FUSE) mount."""

from __future__ import annotations

import click

from . import mounts


@click.command("umount")
@click.argument("mountpoint", type=click.Path())
def umount(mountpoint: str) -> None:
    """Unmount MOUNTPOINT (fusermount3 -u); the daemon then exits."""
    mounts.unmount(mountpoint)
