"""`layer diff NAME`, `layer commit NAME IMAGE` and `layer push IMAGE DEST`.

diff and commit work on a mount made by `layer mount IMAGE MNT --name NAME`: its upper (kept
under the store's mounts/NAME) against the layers of the image its record pins (by manifest
digest: whatever happened to the tag since).  A commit writes its tag last, only after the
daemon confirmed the thaw: a daemon that died during the commit fails it, and nothing of it
stays.  Committing a live mount freezes
it through the daemon's control socket while the upper is read, so the snapshot is
consistent (as `docker commit` pauses the container); an unmounted NAME needs no daemon.
Nothing here reads through the mount while it is frozen: with the kernel's writeback cache,
closing a file that has dirty pages waits for WRITE requests the frozen daemon holds (see
unionfs/control.py), so `--verify` compares with the union of the frozen upper and the
image's layers, computed by the daemon's own model (`LayerStack`).
The registry client (`imagestore.push`: httpx, trio) and the control-socket client are
imported where they are needed, not here: a commit of an unmounted NAME starts without them.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import click

from imagestore import mountrecords
from imagestore.changeset import changes as compute_changes
from imagestore.commit import CommitOptions
from imagestore.commit import commit as do_commit
from imagestore.errors import StoreError
from imagestore.pull import descriptor_layers
from imagestore.store import Store

from . import mounts, progress
from .errors import BadInput, CliError
from .options import format_option, open_store, parse_creds, quiet_option, root_option

if TYPE_CHECKING:
    from unionfs import control

    from .console import Console


def _record(store: Store, name: str) -> mountrecords.MountRecord:
    rec = mountrecords.load(store, name)
    if rec is None:
        raise StoreError(f"no mount named {name} (see `layer ps`)")
    return rec


@contextlib.contextmanager
def _consistent(rec: mountrecords.MountRecord) -> Iterator[control.Freeze | None]:
    """The mount held still: frozen through its daemon when live, refused when dead (its
    upper may hold a half-done operation: `layer umount` it first)."""
    st = mounts.state(rec.mountpoint, rec.daemon)
    if st == mounts.DEAD:
        raise CliError(
            f"mount {rec.name} is dead (its layerfs daemon is gone); "
            f"`layer umount {rec.name}` first"
        )
    if st == mounts.LIVE:
        from unionfs import control  # only a live mount needs it

        with control.frozen(rec.work) as hold:
            yield hold
    else:
        yield None


@click.command("diff")
@root_option
@format_option
@click.argument("name")
@click.pass_obj
def diff(console: Console, root: str | None, fmt: str, name: str) -> None:
    """The changes of mount NAME against its image: `A path`, `C path`, `D path`."""
    store = open_store(root)
    rec = _record(store, name)
    with store.in_use():  # gc waits: the layers may be unpacked on demand
        lowers = descriptor_layers(store, rec.image)
        with _consistent(rec):
            found = compute_changes(rec.upper, lowers)
    if fmt == "json":
        console.say(json.dumps(found.to_json(), indent=2))
    else:
        for line in found.lines():
            console.say(line)


@click.command("commit")
@root_option
@click.option("-m", "--message", help="Commit message (history comment).")
@click.option("--author", help="Author of the new layer.")
@click.option(
    "--change",
    "changes",
    multiple=True,
    help="Dockerfile-style config edit: CMD, ENTRYPOINT, ENV, WORKDIR, LABEL, USER.",
)
@click.option(
    "--compress", type=click.Choice(["gzip", "zstd", "none"]), default="gzip", show_default=True
)
@click.option(
    "--verify",
    is_flag=True,
    help="Apply the new layer in a temp dir and compare with the mount's view of the upper.",
)
@quiet_option
@click.argument("name")
@click.argument("image")
@click.pass_obj
def commit(
    console: Console,
    root: str | None,
    message: str | None,
    author: str | None,
    changes: tuple[str, ...],
    compress: str,
    verify: bool,
    quiet: bool,
    name: str,
    image: str,
) -> None:
    """Turn mount NAME's changes into a new layer and tag the new image IMAGE."""
    store = open_store(root)
    rec = _record(store, name)
    sde = os.environ.get("SOURCE_DATE_EPOCH")
    try:
        epoch = int(sde) if sde else None
    except ValueError:
        raise BadInput(f"SOURCE_DATE_EPOCH={sde!r} is not a number") from None
    bar = progress.PhaseBar() if progress.wanted(quiet) else None
    with store.in_use():  # gc waits: blobs and layers no tag protects yet
        lowers = descriptor_layers(store, rec.image)  # unpacked before the mount is frozen
        if bar is not None:
            bar.start(f"commit {name}", None)
        with _consistent(rec) as hold:
            options = CommitOptions(
                message=message,
                author=author,
                changes=changes,
                compress=compress,
                source_date_epoch=epoch,
                verify=verify,
                before_tag=hold.thaw if hold is not None else None,  # the daemon held on
                progress=bar.advance if bar is not None else None,
            )
            digest = do_commit(store, rec.upper, lowers, rec.image, image, options)
        if bar is not None:
            bar.finish()
    console.say(str(digest))


@click.command("push")
@root_option
@click.option("--tls-verify", type=click.BOOL, default=True, show_default=True)
@click.option("--creds", metavar="USER:PASS")
@quiet_option
@click.argument("image")
@click.argument("dest")
@click.pass_obj
def push(
    console: Console,
    root: str | None,
    tls_verify: bool,
    creds: str | None,
    quiet: bool,
    image: str,
    dest: str,
) -> None:
    """Push IMAGE to DEST: docker://HOST/NAME:TAG, oci:DIR[:REF], oci-archive:FILE[:REF] or
    docker-archive:FILE[:NAME:TAG]."""
    from imagestore.push import push as do_push  # httpx: see the docstring

    user_pass = parse_creds(creds)
    store = open_store(root)
    bars = progress.LayerBars() if progress.wanted(quiet) else None
    try:
        with store.in_use():
            digest = do_push(
                store, image, dest, tls_verify=tls_verify, creds=user_pass, report=bars
            )
    finally:
        if bars is not None:
            bars.close()
    console.say(str(digest))
