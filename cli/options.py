"""Options shared by the image commands (`--root`, `--format`, `-q`), as decorators."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from imagestore.store import Store

from .errors import BadInput, note_store


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
    store = Store.open(root)
    note_store(str(store.root))
    return store


def parse_creds(creds: str | None) -> tuple[str, str] | None:
    """`--creds USER:PASS` as a pair; a value without a user or a colon is bad input."""
    if creds is None:
        return None
    user, sep, password = creds.partition(":")
    if not sep or not user:
        raise BadInput("--creds wants USER:PASS")
    return user, password


def human_size(n: int | None) -> str:
    value = float(n or 0)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1000
    return f"{value}"
