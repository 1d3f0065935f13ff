"""The `layer` command: the demo (the README's main job), mount/umount, clean errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from tests.layerdata import write
from tests.mounts import is_mounted, mounts

LAYER = str(Path(sys.executable).parent / "layer")


def test_demo_runs_and_leaves_nothing_mounted(tmp_path, fuse):
    # the demo works in a fresh temp dir: under our tmp_path, so that the check below sees
    # only its mounts (other test runs on this machine mount and unmount meanwhile)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    r = subprocess.run([LAYER, "demo"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "etc/os-release was copied up" in r.stdout and "FAIL" not in r.stdout
    assert "the change was copied up into the mount's upper" in r.stdout
    ours = [mp for mp, _ in mounts() if mp.startswith(str(tmp_path) + "/")]
    assert ours == []
    assert list(tmp_path.iterdir()) == []  # and its temp dir is gone


@pytest.mark.mount
def test_mount_and_umount(tmp_path, fuse):
    write(tmp_path / "a/x", b"top")
    write(tmp_path / "b/y", b"bottom")
    for d in ("up", "wk", "mnt"):
        (tmp_path / d).mkdir()
    r = subprocess.run(
        [
            LAYER,
            "mount",
            "--lower",
            str(tmp_path / "a"),
            "--lower",
            str(tmp_path / "b"),
            "--upper",
            str(tmp_path / "up"),
            "--work",
            str(tmp_path / "wk"),
            str(tmp_path / "mnt"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        assert r.returncode == 0, r.stderr
        assert sorted(os.listdir(tmp_path / "mnt")) == ["x", "y"]
        (tmp_path / "mnt/z").write_bytes(b"new")
        assert (tmp_path / "up/z").read_bytes() == b"new"
    finally:
        u = subprocess.run(
            [LAYER, "umount", str(tmp_path / "mnt")], capture_output=True, text=True, timeout=60
        )
    assert u.returncode == 0, u.stderr
    assert not is_mounted(tmp_path / "mnt")


def test_bad_input_is_a_clean_error(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["mount", "--lower", str(tmp_path / "nope"), str(tmp_path)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    r = subprocess.run([LAYER, "umount", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "layer: error:" in r.stderr and "Traceback" not in r.stderr
