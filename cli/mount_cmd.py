"""`layer mount`: mount an image (writable, its upper kept under the store's mounts/NAME),
or a stack of directories given with --lower (lowers top-first, as lowerdir).

Every image mount, read-only ones too, has a record under mounts/NAME that pins the image by
manifest digest (gc keeps it until `layer rm`, whatever happens to its tag) and names the
daemon serving it.  A NAME is unique while its mount is live (or dead: mounted, its daemon
gone); the per-name claim makes the check and the mount one step for concurrent commands."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

import click

from imagestore import mountrecords
from imagestore.pull import descriptor_layers
from imagestore.store import Store

from . import mounts
from .errors import AlreadyMounted, BadInput
from .options import open_store, root_option

if TYPE_CHECKING:
    from .console import Console

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
@click.option(
    "-o",
    "--option",
    "options",
    multiple=True,
    metavar="OPT[,OPT...]",
    help="More layerfs options (`layerfs -o`: spin=0, passthrough=0, redirect_dir=on, ...); "
    "the layers come from the options above, and the mount is always nosuid,nodev.",
)
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
    options: tuple[str, ...],
    args: tuple[str, ...],
) -> None:
    """Mount IMAGE on MOUNTPOINT (`layer mount IMAGE [MOUNTPOINT]`), or the union of --lower
    directories (`layer mount --lower A --lower B MOUNTPOINT`).

    Without a MOUNTPOINT, the mount goes on ROOT/mounts/NAME/merged, inside the store (0700):
    other users cannot reach it.  Mounts are nosuid,nodev.  Prints the mount's name; returns
    once the mount is live; the layerfs daemon serves it until `layer umount`."""
    mountpoint: str | None
    extra = mounts.extra_options(options)
    if lowers:
        if len(args) != 1:
            raise BadInput("with --lower, give only the MOUNTPOINT")
        mountpoint = _existing_dir(args[0])
        mounts.mount(list(lowers), mountpoint, upper=upper, work=work, extra=extra)
        return
    if upper or work:
        raise BadInput("--upper/--work go with --lower; an image mount keeps its own upper")
    if len(args) not in (1, 2):
        raise BadInput("usage: layer mount IMAGE [MOUNTPOINT] [--name NAME]")
    image = args[0]
    mountpoint = _existing_dir(args[1]) if len(args) == 2 else None
    if name is None:
        name = os.path.basename(os.path.abspath(mountpoint)) if mountpoint else _name_for(image)
    name = mountrecords.check_name(name)
    store = open_store(root)
    with store.in_use(), mountrecords.claim(store, name):  # gc waits; the name is ours
        old = _check_free(store, name)
        if mountpoint is None:
            mountpoint = _default_mountpoint(store, name)
        if old is not None and not old.read_only and image in (old.image_name, old.digest):
            desc, image_name = old.image, old.image_name  # a writable mount keeps its image
        else:
            desc, image_name = mountrecords.resolve(store, image), image
        # an image may hold one layer twice (the same diff_id: two steps that made the same
        # change), unpacked once, which layerfs, as the kernel, refuses as a lower dir given
        # twice; the topmost one shows all that either would (every name of the lower one
        # is a name of the upper one)
        lowers_top_first = list(
            dict.fromkeys(str(p) for p in reversed(descriptor_layers(store, desc, image)))
        )
        where = os.path.abspath(mountpoint)
        with store.transaction():  # the record pins the image before the mount uses it
            rec = mountrecords.save(store, name, image_name, desc, where, read_only)
        try:
            if read_only:
                mounts.mount(lowers_top_first, mountpoint, extra=extra)
            else:
                mounts.mount(
                    lowers_top_first, mountpoint, str(rec.upper), str(rec.work), extra=extra
                )
        except BaseException:
            if read_only:  # nothing to keep
                with store.transaction():
                    mountrecords.remove(store, name)
            raise
        daemon = mounts.daemon_of(mountpoint)
        with store.transaction():
            mountrecords.save(store, name, image_name, desc, where, read_only, daemon)
    console.say(name)


def _check_free(store: Store, name: str) -> mountrecords.MountRecord | None:
    """The stopped record NAME, or None; AlreadyMounted when its mount is live or dead."""
    old = mountrecords.load(store, name)
    if old is not None:
        st = mounts.state(old.mountpoint, old.daemon)
        if st != mounts.STOPPED:
            hint = "`layer umount` it first" if st == mounts.DEAD else "use another --name"
            raise AlreadyMounted(f"mount {name} is {st} on {old.mountpoint}; {hint}")
    return old


def _name_for(image: str) -> str:
    """A mount name from an image reference: its last component, `repo:tag` → `repo-tag`."""
    base = image.rsplit("/", 1)[-1].replace(":", "-").replace("@", "-")
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", base).lstrip("_.-")[:128]
    return base or "mount"


def _default_mountpoint(store: Store, name: str) -> str:
    """ROOT/mounts/NAME/merged: under the 0700 store, so no other user reaches the mount."""
    path = store.mounts / name / "merged"
    path.mkdir(parents=True, exist_ok=True)
    return _existing_dir(str(path))


def _existing_dir(path: str) -> str:
    """`path`, a directory that nothing is mounted on.  The mount table is read first: a
    stat of a hung FUSE mountpoint would hang."""
    typ = mounts.fstype(mounts.canonical_mountpoint(path))
    if typ is not None:
        raise AlreadyMounted(f"{path} is already mounted ({typ}); unmount it first")
    if not os.path.isdir(path):
        raise BadInput(f"{path}: not a directory")
    return path
