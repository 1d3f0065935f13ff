"""`layer`: the command-line entry point, and the one place that picks exit codes.

Commands live in `*_cmd.py` modules (one per command or per group of related commands) and
are registered below by name (`COMMANDS`); a module is imported only when one of its commands
runs (or `--help` lists them all), so a command's start-up pays for its own imports only:
`layer commit` never loads the registry client (httpx and trio, ~200 ms) that `pull` and
`push` need.  They receive the `Console` (console.py, via `click.pass_obj`) for their output
and raise on failure; `LayerGroup.invoke` turns whatever they raise into
`layer: error: ...` and an exit code from `errors.describe`.
Click's own usage errors keep click's format and exit 2.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from . import errors
from .console import Console

# command name → (module in cli/, attribute): imported on first use
COMMANDS = {
    "mount": ("mount_cmd", "mount"),
    "umount": ("umount_cmd", "umount"),
    "demo": ("demo_cmd", "demo"),
    "pull": ("pull_cmd", "pull"),
    "images": ("images_cmd", "images"),
    "inspect": ("inspect_cmd", "inspect"),
    "tag": ("tag_cmd", "tag"),
    "rmi": ("tag_cmd", "rmi"),
    "gc": ("gc_cmd", "gc"),
    "ps": ("umount_cmd", "ps"),
    "rm": ("umount_cmd", "rm"),
    "diff": ("commit_cmd", "diff"),
    "commit": ("commit_cmd", "commit"),
    "push": ("commit_cmd", "push"),
    "fsck": ("fsck_cmd", "fsck_command"),
    "which": ("which_cmd", "which"),
    "df": ("df_cmd", "df"),
}


class LayerGroup(click.Group):
    """A click group that reports a command's exception cleanly and exits with its code, and
    imports a command's module only when the command is looked up (`COMMANDS`)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *self.commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            module, attr = COMMANDS[cmd_name]
            command = getattr(importlib.import_module(f"{__package__}.{module}"), attr)
            self.add_command(command, cmd_name)
        return self.commands.get(cmd_name)

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
        import traceback  # only for an internal error: ~4 ms otherwise paid by every run

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


if __name__ == "__main__":
    cli()
