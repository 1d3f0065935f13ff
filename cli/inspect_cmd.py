"""`layer inspect IMAGE`: manifest, config and layers as JSON (`--raw`: the manifest bytes)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from imagestore.images import inspect as do_inspect
from imagestore.images import raw_manifest

from .options import open_store, root_option

if TYPE_CHECKING:
    from .console import Console


@click.command("inspect")
@root_option
@click.option("--raw", is_flag=True, help="Print the manifest exactly as stored.")
@click.argument("image")
@click.pass_obj
def inspect(console: Console, root: str | None, raw: bool, image: str) -> None:
    """Show IMAGE (a name in the store, or its digest)."""
    store = open_store(root)
    if raw:
        console.say(raw_manifest(store, image).decode())
    else:
        console.say(json.dumps(do_inspect(store, image), indent=2))
