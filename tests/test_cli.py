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


@pytest.mark.mount
def test_mount_passes_layerfs_options(tmp_path, fuse):
    """`layer mount -o`: more layerfs options (each -o a comma-separated list) reach the
    daemon; a bad one is layerfs's own error, and nothing is mounted; the options `layer
    mount` sets itself (the layer dirs, nosuid,nodev) are refused with the one to use."""
    from cli import mounts as cli_mounts

    write(tmp_path / "a/x", b"top")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    base = [LAYER, "mount", "--lower", str(tmp_path / "a")]
    r = subprocess.run(
        [*base, "-o", "spin=0,passthrough=0", "-o", "redirect_dir=on", str(mnt)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        assert r.returncode == 0, r.stderr
        assert (mnt / "x").read_bytes() == b"top"
        daemon = cli_mounts.daemon_of(str(mnt))
        assert daemon is not None
        argv = Path(f"/proc/{daemon['pid']}/cmdline").read_bytes().split(b"\0")
        opts = argv[argv.index(b"-o") + 1].split(b",")
        for opt in (b"spin=0", b"passthrough=0", b"redirect_dir=on", b"nosuid", b"nodev"):
            assert opt in opts
    finally:
        subprocess.run([LAYER, "umount", str(mnt)], capture_output=True, timeout=60)
    assert not is_mounted(mnt)
    r = subprocess.run(
        [*base, "-o", "bogus=1", str(mnt)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "unknown option bogus=1" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not is_mounted(mnt)
    runner = CliRunner()
    for opt, says in (("upperdir=/x", "--upper"), ("workdir=/x", "--work"), ("suid", "nosuid")):
        result = runner.invoke(cli, ["mount", "--lower", str(tmp_path / "a"), "-o", opt, str(mnt)])
        assert result.exit_code == 2 and says in result.output, result.output
        assert "Traceback" not in result.output
    assert not is_mounted(mnt)


def test_bad_input_is_a_clean_error(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["mount", "--lower", str(tmp_path / "nope"), str(tmp_path)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    r = subprocess.run([LAYER, "umount", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "layer: error:" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.mount
def test_an_image_holding_one_layer_twice_mounts(tmp_path, fuse):
    """One layer twice in an image (two build steps that made the same change) is unpacked
    once, and kernel overlayfs and layerfs refuse a lower dir given twice: `layer mount`
    stacks it once, at its topmost place, which shows what both would."""
    from tests import imagedata

    same = [("etc/", "dir", None), ("etc/same", "file", b"same\n")]
    middle = [("etc/", "dir", None), ("etc/same", "file", b"middle\n"), ("etc/mid", "file", b"m")]
    imagedata.write_oci_layout(tmp_path / "src", layers=[same, middle, same])
    root, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()

    def layer(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([LAYER, args[0], "--root", str(root), *args[1:]],
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    pulled = layer("pull", f"oci:{tmp_path / 'src'}:latest", "--name", "twice")
    assert pulled.returncode == 0, pulled.stderr
    r = layer("mount", "twice", str(mnt))
    try:
        assert r.returncode == 0, r.stderr
        assert sorted(os.listdir(mnt / "etc")) == ["mid", "same"]
        assert (mnt / "etc/same").read_bytes() == b"same\n"
    finally:
        u = layer("umount", str(mnt))
    assert u.returncode == 0, u.stderr
    assert not is_mounted(mnt)
