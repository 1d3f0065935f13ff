"""Issue 16: what `layer pull` imports.  Every command pays for its imports at each run (podman
runs the CLI per container), so a registry pull must not import trio, anyio or pygments (httpx
and httpcore probe for them; imagestore.httpclient hides them), and `layer` loads only the
module of the command it runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

PROBE = """
import sys
from cli.main import cli
cli.get_command(None, "pull")
import imagestore.registry_source
heavy = sorted(m for m in ("trio", "anyio", "pygments", "cli.commit_cmd", "cli.mount_cmd",
                           "unionfs.fuse", "imagestore.push") if m in sys.modules)
print(",".join(heavy))
import trio  # hidden only while httpx was imported
import imagestore.httpclient as h
print(h.httpx.Client.__name__, trio.__name__)
"""


def test_pull_imports_only_what_it_needs():
    out = subprocess.run(
        [sys.executable, "-c", PROBE], check=True, capture_output=True, text=True
    ).stdout.splitlines()
    assert out == ["", "Client trio"]


MOUNT_PROBE = """
import sys
from unionfs import daemon  # what `layerfs` imports before it forks
from unionfs.fuse import mount, run, session  # the child: mount(2) and the INIT handshake
from unionfs.options import parse_args
from unionfs.serving import open_stack

cfg = parse_args(["-o", "lowerdir={lo},upperdir={up},workdir={wk}", "{mnt}"])
assert open_stack(cfg, print) is not None
heavy = ("typing", "re", "logging", "trio", "pyfuse3", "dataclasses", "inspect", "shutil",
         "ctypes.util", "unionfs.idmap", "unionfs.operations")
print(",".join(sorted(m for m in heavy if m in sys.modules)))
"""


def test_a_mount_imports_only_what_it_needs_before_init(tmp_path):
    """Issue 11 (M1): podman runs `layerfs` at every container start, and the mount is live
    once INIT is answered; what the daemon imports before that is its start-up time.  trio,
    logging and the handlers come after INIT (fuse/run.py); typing and re (~5 ms: 45.8 →
    40.1 ms a mount, medians of 15) are imported only for mypy, and idmap only when an id
    map is given."""
    dirs = {name: tmp_path / name for name in ("lo", "up", "wk", "mnt")}
    for d in dirs.values():
        d.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", MOUNT_PROBE.format(**dirs)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert out == [""]


HANDLERS_PROBE = """
import sys
from unionfs import control, gate, operations, serving
from unionfs.fuse import bridge, run, session
print("trio" in sys.modules)
"""


def test_the_handlers_load_without_trio():
    """Issue 11: the native daemon answers its first requests while trio (100-150 ms) is
    still being imported in a thread (`Session.serve_early`); that needs the handlers, the
    freeze gate and the control socket to import without it."""
    out = subprocess.run(
        [sys.executable, "-c", HANDLERS_PROBE], check=True, capture_output=True, text=True
    ).stdout.splitlines()
    assert out == ["False"]
