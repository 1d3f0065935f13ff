"""`layer diff`, a live `layer commit` of a mounted image, and `layer push` to files: the
committed image, unpacked by umoci, equals the tree the user saw through the mount."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests import imagedata, treecmp
from tests.mounts import is_mounted, lazy_unmount
from tests.test_pull import layer, need_tool, same_as_umoci, umoci_tree

pytestmark = pytest.mark.mount


def test_live_commit_and_push(tmp_path, fuse):
    need_tool("umoci")
    root = tmp_path / "store"
    layout = tmp_path / "layout"
    imagedata.write_oci_layout(layout)
    layer("pull", "-q", f"oci:{layout}", "--name", "base", root=root)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    layer("mount", "base", str(mnt), "--name", "work1", root=root)
    try:
        (mnt / "etc/hostname").write_text("committed\n")
        os.unlink(mnt / "etc/passwd")
        os.mkdir(mnt / "srv/new")
        (mnt / "srv/new/file").write_bytes(b"new file")
        os.rename(mnt / "usr/bin", mnt / "usr/sbin")
        out = layer("diff", "work1", root=root).stdout.splitlines()
        assert "C /etc/hostname" in out and "D /etc/passwd" in out
        assert "A /srv/new/file" in out and "D /usr/bin" in out
        js = json.loads(layer("diff", "--format", "json", "work1", root=root).stdout)
        assert "/srv/new" in js["added"]
        r = layer("commit", "-m", "a change", "--change", "ENV A=b", "--verify", "work1",
                  "new:1", root=root)
        digest = r.stdout.strip()
        assert digest.startswith("sha256:")
        view = treecmp.snapshot(mnt)
        (mnt / "after-commit").write_text("the mount goes on\n")  # not frozen any more
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30)
        if is_mounted(mnt):
            lazy_unmount(str(mnt))
    info = json.loads(layer("inspect", "new:1", root=root).stdout)
    assert "A=b" in info["config"]["config"]["Env"] and len(info["layers"]) == 4
    assert info["config"]["history"][-1]["comment"] == "a change"
    out = tmp_path / "pushed"
    layer("push", "new:1", f"oci:{out}:new", root=root)
    assert same_as_umoci(view, umoci_tree(tmp_path, out, "new")) == []
    archive = tmp_path / "new.tar"
    layer("push", "new:1", f"docker-archive:{archive}:new:1", root=root)
    layer("pull", "-q", f"docker-archive:{archive}", root=tmp_path / "store2")
