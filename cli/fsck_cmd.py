"""`layer fsck [IMAGE...] [--repair [--force]] [--json] [-q]`: check the store (imagestore.fsck)
and optionally repair damaged layers (imagestore.fsck_repair).

Output: one line per problem on stdout, then notes (`note: ...`) and a summary; `-q` prints
only the problems, `--json` one JSON document.  Exit 1 when a problem remains (a repaired one
does not count), 0 otherwise.  Progress bars only on a terminal (cli.progress).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from imagestore import fsck, fsck_repair, media, mountrecords
from imagestore.digest import Digest
from imagestore.store import Store

from . import mounts, progress
from .errors import EXIT_FAILURE
from .options import human_size, open_store, quiet_option, root_option

if TYPE_CHECKING:
    from .console import Console


def _state(rec: mountrecords.MountRecord) -> str:
    return mounts.state(rec.mountpoint, rec.daemon)


def _live_users(store: Store) -> fsck_repair.Users:
    """Which live mounts stack a given layer, as "NAME on MOUNTPOINT"."""

    def users(diff_id: Digest) -> list[str]:
        out = []
        for rec in mountrecords.all_records(store):
            if _state(rec) != mounts.LIVE:
                continue
            try:
                data = store.read_blob(rec.image.digest, verify=False)
                m = media.parse_manifest(data, media.media_type_of(data, rec.image.media_type))
                ids = media.diff_ids(store.read_blob(m.config.digest, verify=False))
            except Exception:  # noqa: BLE001 - a damaged image: count the mount as a user
                ids = [diff_id]
            if diff_id in ids:
                out.append(f"{rec.name} on {rec.mountpoint}")
        return out

    return users


@click.command("fsck")
@root_option
@click.option("--repair", is_flag=True, help="Re-unpack damaged layers from their verified blobs.")
@click.option("--force", is_flag=True, help="With --repair: also swap layers that live mounts use.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@quiet_option
@click.argument("images", nargs=-1)
@click.pass_context
def fsck_command(
    ctx: click.Context,
    root: str | None,
    repair: bool,
    force: bool,
    as_json: bool,
    quiet: bool,
    images: tuple[str, ...],
) -> None:
    """Check blobs against their digests, unpacked layers against their fingerprints, the
    index and tags against the blobs, and mount records against the mounts (all of the
    store, or what IMAGE... use).  Exit 1 when problems are found."""
    console: Console = ctx.obj
    store = open_store(root)
    bars = progress.PhaseBar() if progress.wanted(quiet, as_json) else None
    report = fsck.check(store, list(images) or None, bars, _state)
    repairs: list[fsck_repair.Repair] = []
    if repair:
        repairs = fsck_repair.repair(store, report, _live_users(store), force)
        fixed = {str(r.diff_id) for r in repairs if r.done}
        report.problems = [
            p for p in report.problems if not (p.layer_fix and str(p.layer_fix) in fixed)
        ]
        report.notes = [p for p in report.notes if not (p.layer_fix and str(p.layer_fix) in fixed)]
        for r in repairs:
            if not r.done:
                report.problems.append(fsck.Problem("repair", str(r.diff_id), r.message))
    if as_json:
        out = report.to_json()
        out["repairs"] = [r.to_json() for r in repairs]
        console.say(json.dumps(out, indent=2))
    else:
        _print(console, report, repairs, quiet)
    if report.problems:
        ctx.exit(EXIT_FAILURE)


def _print(
    console: Console, report: fsck.Report, repairs: list[fsck_repair.Repair], quiet: bool
) -> None:
    for p in report.problems:
        console.say(p.message)
    if quiet:
        return
    for r in repairs:
        if r.done:
            console.say(f"repaired: {r.message}")
    for p in report.notes:
        console.say(f"note: {p.message}")
    c = report.checked
    console.say(
        f"{len(report.problems) or 'no'} problem{'s' * (len(report.problems) != 1)}: "
        f"{c['blobs']} blobs ({human_size(c['blob_bytes'])}), {c['images']} images, "
        f"{c['layers']} layers ({c['entries']} entries, {human_size(c['content_bytes'])}), "
        f"{c['mounts']} mounts checked"
    )
