"""`layer tag IMAGE NAME` and `layer rmi NAME...`: names in index.json."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from .options import open_store, root_option

if TYPE_CHECKING:
    from .console import Console


@click.command("tag")
@root_option
@click.argument("image")
@click.argument("name")
def tag(root: str | None, image: str, name: str) -> None:
    """Give IMAGE another NAME."""
    store = open_store(root)
    with store.transaction() as txn:
        txn.tag(name, store.resolve(image))


@click.command("rmi")
@root_option
@click.argument("names", nargs=-1, required=True)
@click.pass_obj
def rmi(console: Console, root: str | None, names: tuple[str, ...]) -> None:
    """Remove image NAMES (their blobs go at the next `layer gc`)."""
    store = open_store(root)
    with store.transaction() as txn:
        for name in names:
            txn.untag(name)
            console.say(f"untagged {name}")
