"""`layer pull SOURCE`: bring an image into the store; prints its manifest digest last."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from imagestore.pull import pull as do_pull
from imagestore.transfer import Limits

from . import progress
from .options import open_store, parse_creds, quiet_option, root_option

if TYPE_CHECKING:
    from .main import Console


@click.command("pull")
@root_option
@click.option("--platform", help="os/arch[/variant] to pick from an index (default: this host).")
@click.option(
    "--tls-verify",
    type=click.BOOL,
    default=True,
    show_default=True,
    help="Require HTTPS with verified certificates (false also allows plain HTTP).",
)
@click.option("--creds", metavar="USER:PASS", help="Registry credentials.")
@click.option("--name", help="Tag for the image in the store (default: from SOURCE).")
@click.option(
    "--stall-timeout",
    type=click.FloatRange(min=0.1, max=1e6),
    help="Give up on a transfer that gets under 1 KiB in this many seconds "
    "(it is retried, resuming; default 30, or $LAYER_STALL_TIMEOUT).",
)
@click.option(
    "--deadline",
    type=click.FloatRange(min=0.1, max=1e9),
    help="Give the whole pull up after this many seconds (default none, or $LAYER_DEADLINE).",
)
@quiet_option
@click.argument("source")
@click.pass_obj
def pull(
    console: Console,
    root: str | None,
    platform: str | None,
    tls_verify: bool,
    creds: str | None,
    name: str | None,
    stall_timeout: float | None,
    deadline: float | None,
    quiet: bool,
    source: str,
) -> None:
    """Pull SOURCE: docker://HOST/NAME[:TAG|@DIGEST] (or NAME[:TAG]), oci:DIR[:REF],
    oci-archive:FILE[:REF] or docker-archive:FILE[:NAME:TAG]."""
    user_pass = parse_creds(creds)
    env = Limits.from_env()
    limits = Limits(stall_timeout or env.stall, deadline or env.deadline)
    store = open_store(root)
    report = progress.LayerBars() if progress.wanted(quiet) else None
    try:
        result = do_pull(
            store,
            source,
            name=name,
            platform=platform,
            tls_verify=tls_verify,
            creds=user_pass,
            report=report,
            limits=limits,
        )
    finally:
        if report is not None:
            report.close()
    if not quiet and not sys.stderr.isatty():
        click.echo(f"pulled {result.name} ({len(result.diff_ids)} layers)", err=True)
    console.say(str(result.manifest_digest))
