"""Options shared by the image commands (`--root`, `--format`, `-q`), as decorators."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from imagestore.store import Store


def root_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--root",
        envvar="LAYER_ROOT",
        type=click.Path(file_okay=False),
        default=None,
        help="Store root (env LAYER_ROOT; default /var/lib/layer as root, else "
        "$XDG_DATA_HOME/layer).",
    )(fn)


def format_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(["table", "json"]),
        default="table",
        help="Output format.",
    )(fn)


def quiet_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("-q", "--quiet", is_flag=True, help="Print only the essential.")(fn)


def open_store(root: str | None) -> Store:
    return Store.open(root)
