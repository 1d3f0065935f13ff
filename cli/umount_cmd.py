"""`layer umount MOUNTPOINT|NAME`, `layer ps` and `layer rm NAME`: the life of mounts."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from imagestore import mountrecords

from . import mounts
from .errors import CliError
from .options import format_option, open_store, root_option

if TYPE_CHECKING:
    from .console import Console


@click.command("umount")
@root_option
@click.argument("target")  # never a click.Path: click would stat it
def umount(root: str | None, target: str) -> None:
    """Unmount MOUNTPOINT, or the mount named NAME (fusermount3 -u); the daemon then exits.
    A read-only image mount's record goes with it."""
    # the mount table first, never a stat: a hung FUSE mountpoint would hang it
    if mounts.fstype(mounts.canonical_mountpoint(target)) is None and "/" not in target:
        rec = mountrecords.load(open_store(root), target)
        if rec is not None:
            target = rec.mountpoint
    mounts.unmount(target)
    _forget_read_only(root, mounts.canonical_mountpoint(target))


def _forget_read_only(root: str | None, mountpoint: str) -> None:
    store = open_store(root)
    for rec in mountrecords.all_records(store):
        if rec.read_only and mounts.canonical_mountpoint(rec.mountpoint) == mountpoint:
            with mountrecords.claim(store, rec.name), store.transaction():
                again = mountrecords.load(store, rec.name)
                if again is not None and again.read_only and not mounts.is_live(mountpoint):
                    mountrecords.remove(store, rec.name)


@click.command("ps")
@root_option
@format_option
@click.pass_obj
def ps(console: Console, root: str | None, fmt: str) -> None:
    """List the image mounts: name, image, pinned digest, state, mountpoint.

    live: mounted and its daemon runs; dead: still mounted but its daemon is gone (`layer
    umount` it); stopped: not mounted (the upper and the pinned image stay until `layer rm`)."""
    recs = mountrecords.all_records(open_store(root))
    rows = [(r, mounts.state(r.mountpoint, r.daemon)) for r in recs]
    if fmt == "json":
        console.say(
            json.dumps(
                [
                    {
                        "name": r.name,
                        "image": r.image_name,
                        "digest": r.digest,
                        "mountpoint": r.mountpoint,
                        "read_only": r.read_only,
                        "state": st,
                        "live": st == mounts.LIVE,
                    }
                    for r, st in rows
                ],
                indent=2,
            )
        )
        return
    console.say(f"{'NAME':20} {'IMAGE':30} {'DIGEST':19} {'STATE':8} MOUNTPOINT")
    for r, st in rows:
        mode = " (ro)" if r.read_only else ""
        console.say(f"{r.name:20} {r.image_name:30} {r.digest[:19]:19} {st:8} {r.mountpoint}{mode}")


@click.command("rm")
@root_option
@click.argument("names", nargs=-1, required=True)
@click.pass_obj
def rm(console: Console, root: str | None, names: tuple[str, ...]) -> None:
    """Delete the mounts NAMES and their uppers (they must be unmounted); their images are
    no longer pinned."""
    store = open_store(root)
    for name in names:
        with mountrecords.claim(store, name), store.transaction():
            rec = mountrecords.load(store, name)
            if rec is None:
                raise CliError(f"no mount named {name}")
            st = mounts.state(rec.mountpoint, rec.daemon)
            if st != mounts.STOPPED:
                raise CliError(f"{name} is {st} on {rec.mountpoint}; `layer umount {name}` first")
            mountrecords.remove(store, name)
        console.say(f"removed {name}")
