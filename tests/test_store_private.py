"""Issue 12, items 16 and 18: the store root is 0700, so another user cannot read what an
image whites out under layers/<id>/diff; `layer mount` mounts nosuid,nodev, and without a
MOUNTPOINT on ROOT/mounts/NAME/merged, which other users cannot reach.  The unprivileged user
is nobody (setpriv), so these tests need root."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from imagestore.store import Store
from tests import imagedata
from tests.mounts import open_path_to
from tests.test_mount_records import clean_error, ok, run, unmount


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("switching to another user needs root")


def as_nobody(*cmd: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd],
        capture_output=True,
        timeout=30,
    )


def test_new_store_is_0700_and_an_old_one_is_narrowed(tmp_path):
    store = Store.open(tmp_path / "new")
    assert stat.S_IMODE(os.stat(store.root).st_mode) == 0o700
    old = tmp_path / "old"
    old.mkdir(mode=0o755)
    os.chmod(old, 0o755)
    Store.open(old)
    assert stat.S_IMODE(os.stat(old).st_mode) == 0o700


def test_other_users_cannot_read_whited_out_files(tmp_path):
    need_root()
    imagedata.write_oci_layout(tmp_path / "lay")
    root = tmp_path / "store"
    ok(root, "pull", "-q", f"oci:{tmp_path / 'lay'}", "--name", "base")
    open_path_to(tmp_path)
    motd = [p for p in (root / "layers").glob("*/diff/etc/motd")]
    assert motd, "the base layer holds etc/motd (the next layer whites it out)"
    got = as_nobody("cat", str(motd[0]))
    assert got.returncode != 0 and b"Permission denied" in got.stderr
    assert as_nobody("ls", str(root)).returncode != 0


@pytest.mark.mount
def test_layer_mount_is_nosuid_nodev_and_private_by_default(tmp_path, fuse):
    imagedata.write_oci_layout(tmp_path / "lay")
    root = tmp_path / "store"
    ok(root, "pull", "-q", f"oci:{tmp_path / 'lay'}", "--name", "base")
    (tmp_path / "pub").mkdir()
    merged = root / "mounts" / "base" / "merged"
    try:
        assert ok(root, "mount", "base").strip() == "base"  # the name comes from the image
        assert ok(root, "mount", "base", str(tmp_path / "pub"), "--name", "pub").strip() == "pub"
        for mnt in (merged, tmp_path / "pub"):
            line = next(x for x in open("/proc/self/mountinfo") if x.split()[4] == str(mnt))
            flags = line.split()[5].split(",")
            assert "nosuid" in flags and "nodev" in flags, line
        assert (merged / "etc" / "hostname").read_text() == "top\n"
        if os.geteuid() == 0:
            open_path_to(tmp_path)
            hidden = as_nobody("cat", str(merged / "etc" / "hostname"))
            assert hidden.returncode != 0 and b"Permission denied" in hidden.stderr
            shown = as_nobody("cat", str(tmp_path / "pub" / "etc" / "hostname"))
            assert shown.returncode == 0 and shown.stdout == b"top\n", shown.stderr
        again = clean_error(run(root, "mount", "base"))
        assert "base is live" in again
        ok(root, "umount", "base")
        ok(root, "umount", "pub")
    finally:
        unmount(merged, tmp_path / "pub")


def test_layers_and_mounts_are_tops_of_unrelated_trees(tmp_path):
    """Each directory in layers/ and mounts/ is a tree of its own: the store marks both
    FS_TOPDIR_FL (`chattr +T`), so ext4 spreads them over block groups instead of crowding
    one (creates in a crowded group cost 20× as much).  Blobs are files: not marked."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    if subprocess.run(["chattr", "+T", str(scratch)], capture_output=True).returncode:
        pytest.skip("this filesystem has no FS_TOPDIR_FL")
    store = Store.open(tmp_path / "s")

    def flags(path: os.PathLike[str]) -> str:
        out = subprocess.run(["lsattr", "-d", str(path)], capture_output=True, text=True)
        return out.stdout.split()[0]

    assert "T" in flags(store.layers) and "T" in flags(store.mounts)
    assert "T" not in flags(store.blobs)
    subprocess.run(["chattr", "-T", str(store.layers)], check=True)
    Store.open(store.root)  # an older store gets it at its next open
    assert "T" in flags(store.layers)
