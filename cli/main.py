"""`layer`: the command-line entry point, and the only place that prints or picks exit codes.

Commands live one per module (`*_cmd.py`) and are registered below.  They receive the
`Console` (via `click.pass_obj`) for their output and raise on failure; `LayerGroup.invoke`
turns whatever they raise into `layer: error: ...` and an exit code from `errors.describe`.
Click's own usage errors keep click's format and exit 2.
"""

from __future__ import annotations

import traceback
from typing import Any

import click

from . import (
    commit_cmd,
    demo_cmd,
    df_cmd,
    errors,
    fsck_cmd,
    gc_cmd,
    images_cmd,
    inspect_cmd,
    mount_cmd,
    pull_cmd,
    tag_cmd,
    umount_cmd,
    which_cmd,
)


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


class LayerGroup(click.Group):
    """A click group that reports a command's exception cleanly and exits with its code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - the one place that maps every failure
            ctx.exit(report(ctx.ensure_object(Console), exc))


def report(console: Console, exc: BaseException) -> int:
    code, message, want_traceback = errors.describe(exc)
    if want_traceback:
        click.echo("".join(traceback.format_exception(exc)).rstrip(), err=True)
    if message:
        console.error(message)
    return code


@click.group(cls=LayerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="layer", prog_name="layer")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """layer: a union filesystem in userspace (layerfs) and the tools around it."""
    ctx.obj = Console()


cli.add_command(mount_cmd.mount)
cli.add_command(umount_cmd.umount)
cli.add_command(demo_cmd.demo)
cli.add_command(pull_cmd.pull)
cli.add_command(images_cmd.images)
cli.add_command(inspect_cmd.inspect)
cli.add_command(tag_cmd.tag)
cli.add_command(tag_cmd.rmi)
cli.add_command(gc_cmd.gc)
cli.add_command(umount_cmd.ps)
cli.add_command(umount_cmd.rm)
cli.add_command(commit_cmd.diff)
cli.add_command(commit_cmd.commit)
cli.add_command(commit_cmd.push)
cli.add_command(fsck_cmd.fsck_command)
cli.add_command(which_cmd.which)
cli.add_command(df_cmd.df)


if __name__ == "__main__":
    cli()
