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
