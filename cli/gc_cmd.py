"""`layer gc`: delete blobs and unpacked layers that no image or mount references."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from imagestore.images import gc as do_gc

from .options import human_size, open_store, root_option

if TYPE_CHECKING:
    from .console import Console


@click.command("gc")
@root_option
@click.pass_obj
def gc(console: Console, root: str | None) -> None:
    """Remove unreferenced blobs and layers; report what was freed."""
    blobs, layers, freed = do_gc(open_store(root))
    console.say(f"removed {blobs} blobs and {layers} unpacked layers, freed {human_size(freed)}")
