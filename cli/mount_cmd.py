"""`layer mount`: mount a stack of directories with layerfs (lowers top-first, as lowerdir)."""

from __future__ import annotations

import click

from . import mounts

_DIR = click.Path(exists=True, file_okay=False, dir_okay=True)


@click.command("mount")
@click.option(
    "--lower",
    "lowers",
    multiple=True,
    required=True,
    type=_DIR,
    metavar="DIR",
    help="A read-only layer; repeat it, topmost first (like lowerdir=TOP:...:BOTTOM).",
)
@click.option("--upper", type=_DIR, metavar="DIR", help="The writable layer (needs --work).")
@click.option("--work", type=_DIR, metavar="DIR", help="Scratch dir on the same fs as --upper.")
@click.argument("mountpoint", type=_DIR)
def mount(lowers: tuple[str, ...], upper: str | None, work: str | None, mountpoint: str) -> None:
    """Mount the union of the --lower directories on MOUNTPOINT.

    Returns once the mount is live; the layerfs daemon keeps serving it in the background
    until `layer umount MOUNTPOINT`.  Without --upper the mount is read-only.
    """
    mounts.mount(list(lowers), mountpoint, upper=upper, work=work)
