"""`layer mount`: mount an image (writable, its upper kept under the store's mounts/NAME),
or a stack of directories given with --lower (lowers top-first, as lowerdir)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import click

from imagestore import mountrecords

from . import mounts
from .errors import BadInput
from .options import open_store, root_option

if TYPE_CHECKING:
    from .main import Console

_DIR = click.Path(exists=True, file_okay=False, dir_okay=True)


@click.command("mount")
@root_option
@click.option(
    "--lower",
    "lowers",
    multiple=True,
    type=_DIR,
    metavar="DIR",
    help="Directory mode: a read-only layer; repeat it, topmost first.",
)
@click.option("--upper", type=_DIR, metavar="DIR", help="Directory mode: the writable layer.")
@click.option("--work", type=_DIR, metavar="DIR", help="Directory mode: scratch dir for --upper.")
@click.option("--name", help="Image mode: the mount's name (default: the mountpoint's name).")
@click.option("--read-only", is_flag=True, help="Image mode: mount without an upper.")
@click.argument("args", nargs=-1, required=True)
@click.pass_obj
def mount(
    console: Console,
    root: str | None,
    lowers: tuple[str, ...],
    upper: str | None,
    work: str | None,
    name: str | None,
    read_only: bool,
    args: tuple[str, ...],
) -> None:
    """Mount IMAGE on MOUNTPOINT (`layer mount IMAGE MOUNTPOINT`), or the union of --lower
    directories (`layer mount --lower A --lower B MOUNTPOINT`).

    Returns once the mount is live; the layerfs daemon serves it until `layer umount`."""
    if lowers:
        if len(args) != 1:
            raise BadInput("with --lower, give only the MOUNTPOINT")
        mountpoint = _existing_dir(args[0])
        mounts.mount(list(lowers), mountpoint, upper=upper, work=work)
        return
    if upper or work:
        raise BadInput("--upper/--work go with --lower; an image mount keeps its own upper")
    if len(args) != 2:
        raise BadInput("usage: layer mount IMAGE MOUNTPOINT [--name NAME]")
    image, mountpoint = args[0], _existing_dir(args[1])
    from imagestore.pull import image_layers

    store = open_store(root)
    layer_dirs = image_layers(store, image)
    lowers_top_first = [str(p) for p in reversed(layer_dirs)]
    if read_only:
        mounts.mount(lowers_top_first, mountpoint)
        return
    name = mountrecords.check_name(name or os.path.basename(os.path.abspath(mountpoint)))
    desc = store.resolve(image)
    with store.lock():
        rec = mountrecords.save(store, name, image, desc, os.path.abspath(mountpoint), False)
    mounts.mount(lowers_top_first, mountpoint, upper=str(rec.upper), work=str(rec.work))
    console.say(name)


def _existing_dir(path: str) -> str:
    if not os.path.isdir(path):
        raise BadInput(f"{path}: not a directory")
    return path
