"""`layer df [--json]`: where the store's disk space goes (imagestore.usage), like
`podman system df -v`: the parts of the store (they add up to `du -x -B1 ROOT`), each image's
unique and shared bytes, each mount's upper, and what a deduplicating store would save."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from imagestore.usage import usage

from .options import human_size, open_store, root_option

if TYPE_CHECKING:
    from .main import Console


@click.command("df")
@root_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout (bytes).")
@click.pass_obj
def df(console: Console, root: str | None, as_json: bool) -> None:
    """Show the disk space used by blobs, unpacked layers, uppers and ingest debris, per
    image (unique and shared) and per mount, and the bytes duplicated across layers."""
    u = usage(open_store(root))
    if as_json:
        console.say(json.dumps(u.to_json(), indent=2))
        return
    console.say(f"{'PART':10} {'SIZE':>10}")
    for part in ("blobs", "layers", "uppers", "ingest", "other"):
        console.say(f"{part:10} {human_size(u.parts[part]):>10}")
    console.say(f"{'total':10} {human_size(u.total):>10}")
    if u.images:
        console.say()
        console.say(f"{'IMAGE':40} {'LAYERS':>6} {'UNIQUE':>10} {'SHARED':>10}")
        for im in u.images:
            console.say(
                f"{im['name'][:40]:40} {im['layers']:>6} {human_size(im['unique']):>10} "
                f"{human_size(im['shared']):>10}"
            )
    if u.mounts:
        console.say()
        console.say(f"{'MOUNT':24} {'IMAGE':32} {'UPPER':>10}")
        for m in u.mounts:
            upper = "read-only" if m["read_only"] else human_size(m["upper"])
            console.say(f"{m['name'][:24]:24} {m['image'][:32]:32} {upper:>10}")
    console.say()
    note = (
        f" ({u.layers_without_fingerprints} layers without fingerprints not counted)"
        if u.layers_without_fingerprints
        else ""
    )
    console.say(
        f"duplicated across layers: {u.duplicate_files} files, "
        f"{human_size(u.duplicate_bytes)} a deduplicating store would save{note}"
    )
