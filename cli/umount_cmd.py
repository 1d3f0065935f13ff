"""`layer umount MOUNTPOINT|NAME`, `layer ps` and `layer rm NAME`: the life of mounts."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import click

from imagestore import mountrecords

from . import mounts
from .errors import CliError
from .options import format_option, open_store, root_option

if TYPE_CHECKING:
    from .main import Console


@click.command("umount")
@root_option
@click.argument("target", type=click.Path())
def umount(root: str | None, target: str) -> None:
    """Unmount MOUNTPOINT, or the mount named NAME (fusermount3 -u); the daemon then exits."""
    if not os.path.isdir(target) and "/" not in target:
        rec = mountrecords.load(open_store(root), target)
        if rec is not None:
            target = rec.mountpoint
    mounts.unmount(target)


@click.command("ps")
@root_option
@format_option
@click.pass_obj
def ps(console: Console, root: str | None, fmt: str) -> None:
    """List the image mounts: name, image, mountpoint, live or not."""
    recs = mountrecords.all_records(open_store(root))
    if fmt == "json":
        console.say(
            json.dumps(
                [
                    {
                        "name": r.name,
                        "image": r.image_name,
                        "digest": r.image["digest"],
                        "mountpoint": r.mountpoint,
                        "live": mounts.is_live(r.mountpoint),
                    }
                    for r in recs
                ],
                indent=2,
            )
        )
        return
    console.say(f"{'NAME':20} {'IMAGE':36} {'STATE':8} MOUNTPOINT")
    for r in recs:
        state = "live" if mounts.is_live(r.mountpoint) else "stopped"
        console.say(f"{r.name:20} {r.image_name:36} {state:8} {r.mountpoint}")


@click.command("rm")
@root_option
@click.argument("names", nargs=-1, required=True)
@click.pass_obj
def rm(console: Console, root: str | None, names: tuple[str, ...]) -> None:
    """Delete the mounts NAMES and their uppers (they must be unmounted)."""
    store = open_store(root)
    with store.lock():
        for name in names:
            rec = mountrecords.load(store, name)
            if rec is None:
                raise CliError(f"no mount named {name}")
            if mounts.is_live(rec.mountpoint):
                raise CliError(f"{name} is mounted on {rec.mountpoint}; `layer umount {name}`")
            mountrecords.remove(store, name)
            console.say(f"removed {name}")
