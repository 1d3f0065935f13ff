"""`Console`: where commands write, results to stdout, warnings and errors to stderr.

Its own module so that commands and main.py share it without importing each other (main.py
registers the commands; each command receives a Console through `click.pass_obj`).
"""

from __future__ import annotations

import click


class Console:
    """Where commands write: results to stdout, warnings and errors to stderr."""

    def say(self, text: str = "") -> None:
        click.echo(text)

    def heading(self, text: str) -> None:
        click.echo()
        click.echo(click.style(f"== {text}", bold=True))

    def warn(self, text: str) -> None:
        click.echo(f"layer: warning: {text}", err=True)

    def error(self, text: str) -> None:
        click.echo(f"layer: error: {text}", err=True)
