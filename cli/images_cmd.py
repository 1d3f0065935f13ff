"""`layer images`: the images in the store (table, `--format json`, or `-q` digests)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from imagestore.images import list_images

from .options import format_option, human_size, open_store, quiet_option, root_option

if TYPE_CHECKING:
    from .console import Console


@click.command("images")
@root_option
@format_option
@quiet_option
@click.pass_obj
def images(console: Console, root: str | None, fmt: str, quiet: bool) -> None:
    """List the images in the store."""
    found = list_images(open_store(root))
    if quiet:
        for i in found:
            console.say(str(i.digest))
    elif fmt == "json":
        console.say(
            json.dumps(
                [
                    {
                        "name": i.name,
                        "digest": str(i.digest),
                        "size": i.size,
                        "layers": i.layers,
                        "created": i.created,
                        "mediaType": i.media_type,
                    }
                    for i in found
                ],
                indent=2,
            )
        )
    else:
        console.say(f"{'NAME':40} {'DIGEST':14} {'LAYERS':>6} {'SIZE':>9}  CREATED")
        for i in found:
            console.say(
                f"{i.name:40} {i.digest.short:14} {i.layers:>6} {human_size(i.size):>9}  "
                f"{i.created or '-'}"
            )
