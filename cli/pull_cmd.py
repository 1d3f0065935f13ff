"""`layer pull SOURCE`: bring an image into the store; prints its manifest digest last."""

from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING

import click

from imagestore.media import Descriptor
from imagestore.pull import pull as do_pull
from imagestore.transfer import Limits

from .options import human_size, open_store, parse_creds, quiet_option, root_option

if TYPE_CHECKING:
    from .console import Console


class StderrProgress:
    """Per-layer lines with bytes and rate on stderr (only on a terminal, never with -q)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started: dict[int, float] = {}
        self.last: dict[int, float] = {}

    def layer(self, index: int, desc: Descriptor, state: str) -> None:
        with self.lock:
            self.started.setdefault(index, time.monotonic())
            click.echo(
                f"layer {index + 1} {desc.digest.short} ({human_size(desc.size)}): {state}",
                err=True,
            )

    def progress(self, index: int, done: int, total: int | None) -> None:
        now = time.monotonic()
        with self.lock:
            if now - self.last.get(index, 0) < 0.5 and done != total:
                return
            self.last[index] = now
            rate = done / max(now - self.started.get(index, now), 1e-6)
            of = f"/{human_size(total)}" if total else ""
            click.echo(
                f"\r  layer {index + 1}: {human_size(done)}{of}  {human_size(int(rate))}/s",
                err=True,
                nl=done == total,
            )


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
    report = StderrProgress() if sys.stderr.isatty() and not quiet else None
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
    if not quiet and not sys.stderr.isatty():
        click.echo(f"pulled {result.name} ({len(result.diff_ids)} layers)", err=True)
    console.say(str(result.manifest_digest))
